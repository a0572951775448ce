"""Pieces every stage uses: loading a policy from an HF dir, prompts, a generic resumable train loop.

Stages stay short and never import each other; what they share lives here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from specs_jax import data as data_lib
from specs_jax.models import qwen2_5_vl
from specs_jax.processing import chat
from specs_jax.processing import image as image_lib
from specs_jax.training import checkpoint as ckpt_lib
from specs_jax.training import metrics as metrics_lib

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Policy:
  model: qwen2_5_vl.Qwen2_5_VL
  params: Any
  tokenizer: Any
  image_config: image_lib.ImageConfig
  hf_dir: str


def image_config(config: ml_collections.ConfigDict) -> image_lib.ImageConfig:
  return image_lib.ImageConfig(min_pixels=int(config.data.min_pixels), max_pixels=int(config.data.max_pixels))


def load_policy(hf_dir: str, config: ml_collections.ConfigDict) -> Policy:
  """Model, params, tokenizer and image config from a local HF directory."""
  from transformers import AutoTokenizer

  m = config.model
  model, params = qwen2_5_vl.from_pretrained(hf_dir, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
                                             attention_impl=m.attention_impl, remat=m.remat,
                                             scan_layers=m.scan_layers)
  tok = AutoTokenizer.from_pretrained(hf_dir)
  pre = os.path.join(hf_dir, "preprocessor_config.json")
  icfg = image_lib.ImageConfig.from_preprocessor_config(pre) if os.path.exists(pre) else image_config(config)
  return Policy(model, params, tok, icfg, hf_dir)


def starting_hf_dir(config: ml_collections.ConfigDict, wd, stage: str) -> str:
  """The base policy: config.model.hf_dir, or the demo's base stage output."""
  from specs_jax.pipeline import require

  if config.model.hf_dir:
    return require(config.model.hf_dir, "the starting HF checkpoint (config.model.hf_dir)", stage)
  return require(wd.hf("base"), "the base model (run the base stage, or set config.model.hf_dir)", stage)


def system_prompt(config: ml_collections.ConfigDict) -> str | None:
  return config.data.system_prompt or None


def rl_examples(config: ml_collections.ConfigDict, split: str, n: int, seed_offset: int = 0) -> list[data_lib.Example]:
  """RL prompt pool (split "train") or an evaluation split, from the synthetic tasks or local files."""
  d = config.data
  if d.source == "synthetic":
    fams = tuple(d.families) if d.families and split != "eval_ood_task" else None
    return data_lib.make_split(split, n, seed=config.seed + seed_offset, levels=tuple(d.levels),
                               image_size=(int(d.image_min), int(d.image_max)), families=fams)
  if d.source == "files":
    if split != "train":
      raise ValueError(f"data.source='files' has no split {split!r}; evaluate with config.eval.benchmarks")
    res = data_lib.read_rl_prompts(d.rl_prompts, image_root=d.rl_image_root or None, on_error=d.on_error)
    log.info("%s", res.summary())
    return list(res.examples)[:n]
  raise ValueError(f"data.source must be 'synthetic' or 'files', got {d.source!r}")


def encode_examples(policy: Policy, examples: Sequence[data_lib.Example], config) -> list:
  """Examples → `rollout.RLPrompt`s (prompt ids + images + gold)."""
  from specs_jax.training.rollout import RLPrompt

  out = []
  for ex in examples:
    enc = chat.encode_prompt(policy.tokenizer, ex.messages, ex.load_images(), policy.image_config,
                             system_prompt=system_prompt(config))
    out.append(RLPrompt(prompt=enc, gold=ex.gold, uid=ex.id))
  return out


def export(policy_params, policy: Policy, out_dir: str) -> str:
  """HF-format export of a stage's policy, with the tokenizer and preprocessor files."""
  tmp = out_dir + ".tmp"
  if os.path.exists(tmp):
    import shutil

    shutil.rmtree(tmp)
  qwen2_5_vl.save_pretrained(jax.device_get(policy_params), policy.model.config, tmp, copy_files_from=policy.hf_dir)
  if os.path.exists(out_dir):
    import shutil

    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


@dataclasses.dataclass
class LoopResult:
  state: Any
  steps: int
  resumed_from: int | None


def train_loop(stage_dir: str, state, total_steps: int, step_fn: Callable[[Any, int], tuple[Any, dict]], *,
               checkpoint_every: int, progress: bool = True, data_state_fn: Callable[[int], dict] | None = None,
               extra: dict | None = None, on_step: Callable[[int, Any, dict], None] | None = None) -> LoopResult:
  """A resumable loop: restore the latest checkpoint, run `step_fn(state, step) -> (state, metrics)`
  from there to `total_steps`, log metrics (JSONL, TensorBoard, progress bar), save every
  `checkpoint_every` steps and at the end, and save on SIGTERM.

  Determinism: everything a step needs (data, RNG) must be a function of the step index (the
  stages derive batches and keys from it), so a resumed run equals an uninterrupted one.
  """
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), max_to_keep=2,
                               save_interval_steps=max(1, checkpoint_every))
  restored = ckpt.restore_latest(state)
  start = 0
  if restored is not None:
    state, _, _ = restored
    start = int(jax.device_get(state.step))
    log.info("%s: resumed at step %d", stage_dir, start)
  logger = metrics_lib.MetricsLogger(stage_dir, total_steps, start_step=start, progress=progress)
  current = {"state": state, "step": start}

  def save_now():
    ckpt.save(current["step"], current["state"], data_state_fn(current["step"]) if data_state_fn else {},
              extra, force=True)
    ckpt.wait_until_finished()

  guard = ckpt_lib.install_sigterm_handler(save_now)
  try:
    for step in range(start, total_steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, step)
      metrics = {k: float(v) for k, v in jax.device_get(dict(metrics)).items() if np.ndim(v) == 0}
      current["state"], current["step"] = state, step + 1
      logger.log(step + 1, metrics, step_time=time.perf_counter() - t0)
      if on_step is not None:
        on_step(step + 1, state, metrics)
      ckpt.save(step + 1, state, data_state_fn(step + 1) if data_state_fn else {}, extra,
                force=step + 1 == total_steps)
      guard.maybe_save_and_exit() if hasattr(guard, "maybe_save_and_exit") else None
  finally:
    guard.uninstall()
    logger.close()
    ckpt.close()
  return LoopResult(state=state, steps=total_steps, resumed_from=start if restored is not None else None)


def _round_up(n: int, m: int) -> int:
  return max(m, -(-int(n) // m) * m)


def fixed_buckets(prompt_lens: Sequence[int], completion_lens: Sequence[int], grids: Sequence[np.ndarray],
                  batch_size: int, merge: int = 2, completion_cap: int | None = None):
  """One bucket per dimension, sized from the whole dataset, so a stage's step compiles once:
  prompt and completion lengths (rounded up to 16), patches per image slot (the largest image,
  rounded up to a multiple of merge²·4) and image slots (batch × most images in one example)."""
  from specs_jax.training.batches import BatchBuckets

  p = _round_up(max(prompt_lens), 16)
  c = _round_up(max(completion_lens) if completion_lens else 16, 16)
  if completion_cap:
    c = min(c, _round_up(completion_cap, 16))
  sizes = [int(np.prod(g, axis=-1).max()) for g in grids if len(g)]
  q = _round_up(max(sizes), merge * merge * 4) if sizes else 16
  imgs = max((len(g) for g in grids), default=0)
  s = max(1, batch_size * imgs)
  return BatchBuckets.make([p], [c], [q], [s])


def cycle(items: Sequence[Any], batch: int, step: int, seed: int) -> list[Any]:
  """The batch of `step`: a deterministic epoch-wise shuffle of `items` (a pure function of step)."""
  n = len(items)
  if n == 0:
    raise ValueError("no items to draw batches from")
  per_epoch = max(1, n // batch)
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  idx = order[(k * batch) % n:(k * batch) % n + batch]
  if len(idx) < batch:
    idx = np.concatenate([idx, order[:batch - len(idx)]])
  return [items[i] for i in idx]
