r"""Time per phase of one GRPO step: sample, reward, pack, old log-probs, update.

    .venv/bin/python benchmarks/grpo_step.py [--configs T,S] [--prompts 4] [--n 8] [--new T:64,S:128]

For each config (PERFORMANCE.md "T": small, overhead-dominated; "S": the larger CPU config): B
prompts of 128 tokens with one image each, n samples per prompt at temperature 1 (EOS disabled, so
every response has exactly --new tokens and the work is the same every run), rewarded by the
recipe's reward (0.5·format + 1.0·accuracy) in a 2-worker process pool on synthetic
`<think>…</think><answer>…</answer>` texts built from the sampled ids (the random model has no
tokenizer), then one GRPO update (1 epoch × 1 minibatch, the recipe's schedule) with the old
log-prob pass forced on (`recompute_old_logps=True`; the recipe's 1 × 1 schedule skips it, see
`training/grpo_step.py`). Step 1 compiles; the figures are the median over --steps - 1 further
steps. One JSON line per figure:

- phase lines ("sample", "reward", "pack", "logps", "update"): seconds, share of the step, and
  for the model phases tokens/s and MFU against a matmul peak measured in the same run (both count
  the B·n separate rows; with `--share-prompt` on, the default, each group's prompt is computed once,
  so these are effective figures);
- "step": the total and the phase that dominates;
- "compile": extra seconds of step 1 over a steady step (jit of sampler, logps and update).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import CONFIGS, build_pair, emit, mm_prompt_batch  # noqa: E402


class _IdText:
  """Stands in for a tokenizer: ids → a SPECS-format response whose answer is the last id mod 10."""

  def decode(self, ids, skip_special_tokens=True):
    answer = ids[-1] % 10 if ids else 0
    return f"<think> {' '.join(map(str, ids[:-1]))} </think> <answer> $\\boxed{{{answer}}}$ </answer>"


def _prompts(name: str, b: int, prompt_len: int):
  from specs_jax.processing import chat
  from specs_jax.training import rollout

  batch = mm_prompt_batch(name, b, prompt_len)
  per = batch["pixel_values"].shape[0] // b
  out = []
  for i in range(b):
    grid = batch["image_grid_thw"][i:i + 1].astype(np.int32)
    p = chat.EncodedPrompt(input_ids=batch["input_ids"][i].astype(np.int32),
                           pixel_values=batch["pixel_values"][i * per:(i + 1) * per],
                           image_grid_thw=grid, num_image_tokens=grid.prod(-1) // 4, text="")
    out.append(rollout.RLPrompt(p, gold=str(i % 10), uid=str(i)))
  return out


def run(name: str, b: int, n: int, new: int, steps_n: int, prompt_len: int, peak: float, pool,
        share_prompt: str = "auto") -> None:
  import jax

  from specs_jax import sampling
  from specs_jax.training import grpo_step, metrics as metrics_lib, rollout, steps

  _, model, params = build_pair(name)
  cfg = grpo_step.GRPOConfig(group_size=n, prompts_per_step=b, max_response_len=new, learning_rate=1e-6,
                             filter_lower=None, filter_upper=None, recompute_old_logps=True, chunk_size=128,
                             share_prompt=share_prompt)
  sampler = sampling.Sampler(model)
  fns = grpo_step.make_grpo_functions(model, cfg)
  state, _ = steps.init_train_state(jax.tree.map(lambda x: x.copy(), params), cfg.optimizer_config(),
                                    jax.random.key(0))
  reward_fn = rollout.pool_reward_fn(pool)
  compiles_before = grpo_step.compile_counts() | {f"sampler_{k}": v for k, v in sampling.compile_counts().items()}
  items = _prompts(name, b, prompt_len)
  phases = ("sample", "reward", "pack", "logps", "update")
  times, totals = [], []
  for s in range(steps_n):
    t0 = time.perf_counter()
    batch = rollout.collect_rollouts(sampler, state.params, items, reward_fn, rng=jax.random.key(s), pad_id=0,
                                     eos_token_id=-1, tokenizer=_IdText(), prompt_buckets=(prompt_len,),
                                     completion_buckets=(new,), sampler_kwargs=dict(gen_buckets=(new,)),
                                     **cfg.rollout_kwargs())
    state, m = grpo_step.grpo_train_step(state, batch, cfg, jax.random.key(s), fns=fns)
    totals.append(time.perf_counter() - t0)
    mm = batch.metrics | m
    times.append({p: mm[f"time/{p}_s"] for p in phases})
  steady = {p: float(np.median([t[p] for t in times[1:]])) for p in phases}
  total = float(np.median(totals[1:]))
  rows, seq = b * n, prompt_len + new
  n_patches = int(batch.pixel_values.shape[0])
  flops = {
      # decode: one forward per new token over rows (KV-cache attention ≈ prompt + new/2 context)
      "sample": rows * new * metrics_lib.flops_per_token(model.config, prompt_len + new // 2, train=False)
      + b * prompt_len * metrics_lib.flops_per_token(model.config, prompt_len, train=False),
      "logps": metrics_lib.step_flops(model.config, rows=rows, seq_len=seq, num_patches=n_patches, train=False),
      "update": metrics_lib.step_flops(model.config, rows=rows, seq_len=seq, train=True),
  }
  toks = {"sample": rows * new, "logps": rows * seq, "update": rows * seq}
  common = dict(benchmark="grpo_step", config=name, prompts=b, n=n, rows=rows, prompt_len=prompt_len,
                new_tokens=new, steps_timed=steps_n - 1, share_prompt=fns.copies > 1)
  for p in phases:
    extra = {}
    if p in flops:
      extra = dict(tok_s=round(toks[p] / steady[p], 1), mfu=round(flops[p] / steady[p] / peak, 3))
    emit(**common, phase=p, seconds=round(steady[p], 3), share=round(steady[p] / total, 3), **extra)
  dominant = max(phases, key=lambda p: steady[p])
  emit(**common, phase="step", seconds=round(total, 3), dominant=dominant,
       other_s=round(total - sum(steady.values()), 3), peak_gflops=round(peak / 1e9, 1))
  compiles = grpo_step.compile_counts() | {f"sampler_{k}": v for k, v in sampling.compile_counts().items()}
  emit(**common, phase="compile", seconds=round(totals[0] - total, 2),
       compiles={k: v - compiles_before.get(k, 0) for k, v in compiles.items()})


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="T,S")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--new", default="T:64,S:128", help="new tokens per config, e.g. T:64,S:128")
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--steps", type=int, default=3, help="steps per config; the first compiles")
  ap.add_argument("--share-prompt", default="auto", choices=("auto", "true", "false"),
                  help="pack each group's completions after one copy of its prompt (GRPOConfig.share_prompt)")
  args = ap.parse_args()

  from specs_jax.rewards import RewardPool
  from specs_jax.training import metrics as metrics_lib

  new = {k: int(v) for k, v in (x.split(":") for x in args.new.split(","))}
  peak = metrics_lib.measure_matmul_peak(1024)
  with RewardPool(num_workers=2) as pool:
    pool.wait_ready(60.0)
    for name in args.configs.split(","):
      if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
      run(name, args.prompts, args.n, new.get(name, 64), args.steps, args.prompt_len, peak, pool,
          args.share_prompt)


if __name__ == "__main__":
  main()
