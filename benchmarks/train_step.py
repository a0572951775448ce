"""DPO(+SFT) train step and reference log-prob pass: specs_jax vs the same computation in HF PyTorch.

    .venv/bin/python benchmarks/train_step.py [--config S] [--pairs 2] [--prompt 256] [--completion 256]

Same weights, same batch: B pairs, each a prompt with one image (config S: 224 px, 64 image tokens)
and a chosen and a rejected completion; L = prompt + completion. HF side (what TRL does): one
forward over the 2B concatenated rows (images given for every row), log-softmax of the completion
positions, DPO+SFT loss, backward, AdamW step; vision frozen on both sides. The two alternate
`rounds` times in one process; medians are reported with tokens/s = 2B·L / step time and MFU
against a float32 matmul peak measured in the same run. One JSON line per figure. `--warmup`
untimed alternating rounds come first: the first few calls after compiling run 10-40% slower on
both sides (allocator and thread-pool warm-up), and one warm-up call left ours' median 10% high.

Our side packs each pair's chosen and rejected completions after one copy of the prompt (the
library default, `steps.make_dpo_step(share_prompt=...)`; `--share-prompt false` measures separate
rows). tok/s and MFU count the separate rows' tokens and FLOPs on both sides, so with packing ours
are effective figures for the same pairs; `ours_executed_mfu` counts the FLOPs our program runs.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import CONFIGS, build_pair, emit, matmul_peak_gflops  # noqa: E402


def make_pairs(name, model_config, b, p_len, c_len, seed=0):
  from specs_jax.processing import chat
  from specs_jax.training import batches

  rng = np.random.default_rng(seed)
  side = CONFIGS[name]["image"]
  g = side // 14
  n_img = g * g // 4
  vocab = CONFIGS[name]["text"]["vocab_size"]
  pairs = []
  for _ in range(b):
    ids = rng.integers(10, vocab, size=p_len).astype(np.int32)
    ids[1], ids[2:2 + n_img], ids[2 + n_img] = 3, model_config.image_token_id, 4
    prompt = chat.EncodedPrompt(input_ids=ids, pixel_values=rng.standard_normal((g * g, 1176)).astype(np.float32),
                                image_grid_thw=np.array([[1, g, g]], np.int32),
                                num_image_tokens=np.array([n_img], np.int32), text="")
    ch, rj = (rng.integers(10, vocab, size=c_len).astype(np.int32) for _ in range(2))
    pairs.append(batches.EncodedPair(prompt, ch, rj, -50.0, -60.0))
  return pairs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="S")
  ap.add_argument("--pairs", type=int, default=2)
  ap.add_argument("--prompt", type=int, default=256)
  ap.add_argument("--completion", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=3,
                  help="untimed alternating rounds per figure before the timed ones (allocators and "
                       "thread pools reach steady state; the first rounds after compiling run 10-40%% slow)")
  ap.add_argument("--share-prompt", default="auto", choices=("auto", "true", "false"))
  args = ap.parse_args()

  import jax
  import torch

  from specs_jax.training import batches, metrics, steps
  from specs_jax.training.state import OptimizerConfig

  torch.set_num_threads(os.cpu_count() or 2)
  hf, model, params = build_pair(args.config)
  cfg = model.config
  b, p_len, c_len = args.pairs, args.prompt, args.completion
  seq = p_len + c_len
  pairs = make_pairs(args.config, cfg, b, p_len, c_len)
  buckets = batches.BatchBuckets.make([p_len], [c_len], [256], [b])
  batch = batches.collate_dpo(pairs, cfg, buckets, pad_id=0, num_pairs=b)
  opt = OptimizerConfig(learning_rate=1e-6, schedule="constant", total_steps=1000, max_grad_norm=1.0)

  # ---- ours
  state, _ = steps.init_train_state(jax.tree.map(lambda x: x.copy(), params), opt, jax.random.key(0))
  share = None if args.share_prompt == "auto" else args.share_prompt == "true"
  dpo_step = steps.make_dpo_step(model, opt, beta=0.1, sft_weight=1.0, share_prompt=share)
  logps_fn = steps.make_logps_fn(model, copies=2, share_prompt=share)

  def ours_train():
    nonlocal state
    state, m = dpo_step(state, batch)
    jax.block_until_ready(m["loss"])

  def ours_logps():
    jax.block_until_ready(logps_fn(state.params, batch)["logps"])

  # ---- HF: same rows, images for every row
  ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
  mask = torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))
  cmask = torch.from_numpy(np.asarray(batch["completion_mask"], np.float32))
  pv_pairs = [p.prompt.pixel_values for p in pairs]
  pv = torch.from_numpy(np.concatenate(pv_pairs + pv_pairs))
  thw = torch.from_numpy(np.concatenate([p.prompt.image_grid_thw for p in pairs] * 2).astype(np.int64))
  mm = (ids == cfg.image_token_id).long()
  for n, p in hf.named_parameters():
    p.requires_grad_(not n.startswith("model.visual"))
  torch_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-6)
  ref = torch.tensor([-50.0] * b + [-60.0] * b)

  def hf_logps(grad: bool):
    with torch.set_grad_enabled(grad):
      logits = hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
                  mm_token_type_ids=mm).logits[:, :-1].float()
      lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
      return (lp * cmask[:, 1:]).sum(-1), cmask[:, 1:].sum(-1)

  def hf_train():
    torch_opt.zero_grad()
    s, n = hf_logps(True)
    pc, pr, rc, rr = s[:b], s[b:], ref[:b], ref[b:]
    loss = (-torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))) - pc / n[:b]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 1.0)
    torch_opt.step()

  def hf_ref():
    hf_logps(False)

  t0 = time.perf_counter()
  ours_train()
  ours_logps()
  compile_s = time.perf_counter() - t0
  hf_train()
  hf_ref()
  peak = matmul_peak_gflops() * 1e9
  tokens = 2 * b * seq
  train_flops = metrics.step_flops(cfg, rows=2 * b, seq_len=seq, num_patches=b * 256, train=True)
  fwd_flops = metrics.step_flops(cfg, rows=2 * b, seq_len=seq, num_patches=b * 256, train=False)
  # What our program executes: with packing, B rows of P + 2C tokens (the formula's dense
  # attention over them slightly overcounts the block attention), else the 2B rows.
  packed = steps.resolve_share_prompt(model, share)
  ex_rows, ex_len = (b, p_len + 2 * c_len) if packed else (2 * b, seq)
  executed = {True: metrics.step_flops(cfg, rows=ex_rows, seq_len=ex_len, num_patches=b * 256, train=True),
              False: metrics.step_flops(cfg, rows=ex_rows, seq_len=ex_len, num_patches=b * 256, train=False)}
  for what, ours_fn, hf_fn, flops, ex in (("dpo_train_step", ours_train, hf_train, train_flops, executed[True]),
                                          ("reference_logps", ours_logps, hf_ref, fwd_flops, executed[False])):
    for _ in range(args.warmup):
      hf_fn(); ours_fn()
    t_ours, t_hf = [], []
    for _ in range(args.rounds):
      s = time.perf_counter(); hf_fn(); t_hf.append(time.perf_counter() - s)
      s = time.perf_counter(); ours_fn(); t_ours.append(time.perf_counter() - s)
    to, th = float(np.median(t_ours)), float(np.median(t_hf))
    emit(benchmark=what, config=args.config, pairs=b, seq_len=seq, ours_tok_s=round(tokens / to, 1),
         hf_tok_s=round(tokens / th, 1), ratio=round(th / to, 2), ours_s=round(to, 3), hf_s=round(th, 3),
         ours_mfu=round(flops / to / peak, 3), hf_mfu=round(flops / th / peak, 3),
         ours_executed_mfu=round(ex / to / peak, 3),
         matmul_peak_gflops=round(peak / 1e9, 1), compile_s=round(compile_s, 1),
         share_prompt=steps.resolve_share_prompt(model, share))


if __name__ == "__main__":
  main()
