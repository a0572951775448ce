"""Decode throughput: specs_jax sampler vs HF `generate` on the same weights and prompts.

    .venv/bin/python benchmarks/sampler.py [--configs S,T] [--batches 8,32] [--new 128] [--rounds 2]
                                           [--modes greedy,sample]

For each (config, batch, mode): 128 new tokens (EOS disabled on both sides), prompt 128 tokens with
one image; "greedy" (HF `do_sample=False`; our tokens are checked against HF's) or "sample"
(temperature 1, top-p 0.9, no top-k; HF `do_sample=True, top_k=0`). The two implementations
alternate `rounds` times in one process; the median of each is reported. One JSON line per figure;
`ratio` = ours / HF new tokens per second.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import build_pair, emit, mm_prompt_batch  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="S,T")
  ap.add_argument("--batches", default="8,32")
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--modes", default="greedy")
  args = ap.parse_args()

  import torch

  from specs_jax import sampling

  torch.set_num_threads(os.cpu_count() or 2)
  for name in args.configs.split(","):
    hf, model, params = build_pair(name)
    sampler = sampling.Sampler(model)
    for b in (int(x) for x in args.batches.split(",")):
      if name == "T" and b != 8:
        continue  # PERFORMANCE.md: T is measured at B=8 only
      batch = mm_prompt_batch(name, b, args.prompt)
      for mode in args.modes.split(","):
        run(name, b, mode, batch, hf, sampler, params, args)


def run(name, b, mode, batch, hf, sampler, params, args):
  import jax
  import torch

  sample = mode == "sample"
  if mode not in ("greedy", "sample"):
    raise SystemExit(f"unknown mode {mode!r}: greedy or sample")
  temperature, top_p = (1.0, 0.9) if sample else (0.0, 1.0)
  calls = iter(range(10**6))

  def ours():
    out = sampler.generate(params, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           batch["image_grid_thw"], max_new_tokens=args.new, temperature=temperature, top_p=top_p,
                           eos_token_id=-1, prompt_buckets=(args.prompt,), gen_buckets=(args.new,),
                           rng=jax.random.key(next(calls)))
    assert (out.lengths == args.new).all()
    return out

  def theirs():
    kw = {k: torch.from_numpy(v) for k, v in batch.items()}
    mode_kw = dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0) if sample else dict(do_sample=False)
    with torch.no_grad():
      out = hf.generate(**kw, max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=2, pad_token_id=0,
                        **mode_kw)
    return out[:, args.prompt:].numpy()

  t0 = time.perf_counter()
  first = ours()  # compile
  compile_s = time.perf_counter() - t0
  ref = theirs()
  same = None if sample else float((first.tokens == ref).all(axis=1).mean())
  t_ours, t_hf = [], []
  for _ in range(args.rounds):
    t0 = time.perf_counter(); theirs(); t_hf.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); ours(); t_ours.append(time.perf_counter() - t0)
  ours_tps = b * args.new / float(np.median(t_ours))
  hf_tps = b * args.new / float(np.median(t_hf))
  n_params = sum(x.size for x in jax.tree.leaves(params["model"])) + params["lm_head"]["kernel"].size
  floor_ms = n_params * 4 / 24e9 * 1e3  # read all text weights once per step at ≈24 GB/s
  emit(benchmark="sampler_decode", config=name, batch=b, mode=mode, new_tokens=args.new, prompt=args.prompt,
       ours_new_tok_s=round(ours_tps, 1), hf_new_tok_s=round(hf_tps, 1), ratio=round(ours_tps / hf_tps, 2),
       ours_ms_per_step=round(1e3 * float(np.median(t_ours)) / args.new, 2),
       bandwidth_floor_ms_per_step=round(floor_ms, 2), compile_s=round(compile_s, 1),
       greedy_rows_identical_to_hf=same)


if __name__ == "__main__":
  main()
