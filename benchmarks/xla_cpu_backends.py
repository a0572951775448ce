"""XLA:CPU dot backends on config S, in one process: the same lowered programs (reference log-probs
and the gradient of their sum) compiled with the default options and with YNNPACK fusions off
(dots then go to Eigen), called alternately; the minimum of `--rounds` calls is reported. One
process and interleaved calls keep the comparison fair on a shared, noisy machine.

    .venv/bin/python benchmarks/xla_cpu_backends.py [--rounds 4]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import build_pair, emit  # noqa: E402
from train_step import make_pairs  # noqa: E402

VARIANTS = {"ynnpack_default": {}, "eigen_ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=4)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from specs_jax.training import batches, forward, steps

  _, model, params = build_pair("S")
  pairs = make_pairs("S", model.config, 2, 256, 256)
  batch = batches.collate_dpo(pairs, model.config, batches.BatchBuckets.make([256], [256], [256], [2]), pad_id=0,
                              num_pairs=2)
  arrays, prompt_len = forward.select_batch(batch, ())
  logps = steps.make_logps_fn(model, copies=2).jitted

  def grad_fn(p, b):
    return jax.grad(lambda q: jnp.sum(logps(q, b, prompt_len)["logps"]))(p)

  lowered = {"reference_logps": logps.lower(params, arrays, prompt_len),
             "logps_gradient": jax.jit(grad_fn).lower(params, arrays)}
  programs = {(v, name): low.compile(compiler_options=opts) if opts else low.compile()
              for v, opts in VARIANTS.items() for name, low in lowered.items()}
  times = {key: [] for key in programs}
  for _ in range(args.rounds):
    for key, fn in programs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, arrays))
      times[key].append(time.perf_counter() - t0)
  for (variant, name), ts in times.items():
    emit(benchmark="xla_cpu_backends", config="S", program=name, variant=variant, seconds=round(min(ts), 3))


if __name__ == "__main__":
  main()
