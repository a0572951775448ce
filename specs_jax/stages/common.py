"""Pieces every stage uses: loading a policy from an HF dir, prompts, a generic resumable train loop.

Stages stay short and never import each other; what they share lives here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from specs_jax import data as data_lib
from specs_jax.models import qwen2_5_vl
from specs_jax.parallel import mesh as mesh_lib
from specs_jax.parallel import sharding as sharding_lib
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


def stage_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
  """The ("data", "fsdp", "tensor") mesh of `config.mesh` over all devices (of every host), or None
  on a single device, where the stages run the plain unsharded path (bit-identical to before)."""
  sizes = mesh_lib.mesh_shape(config.mesh.to_dict(), jax.device_count())  # validates on one device too
  if jax.device_count() == 1:
    return None
  mesh = mesh_lib.make_mesh(sizes)
  if config.model.attention_impl == "splash":
    # The Pallas splash kernel cannot be partitioned automatically: it runs in a shard_map over the
    # context mesh (kernels/splash.py), so the stage's mesh becomes this thread's mesh.
    jax.set_mesh(mesh)
  return mesh


def to_mesh(batch: Any, mesh: Mesh | None) -> Any:
  """A collated numpy batch onto the mesh (rows split over the batch axes); unchanged without one.
  Every host collates the same global batch (batches are functions of the step index)."""
  return batch if mesh is None else mesh_lib.global_batch_to_mesh(batch, mesh)


def rows_sharding(mesh: Mesh | None, rows: int) -> jax.sharding.Sharding | None:
  """The sampler's `data_sharding` for `rows` prompts: split over the batch axes when they divide it."""
  if mesh is None or not mesh_lib.divisible_axes(rows, mesh_lib.BATCH_AXES, mesh):
    return None
  return jax.sharding.NamedSharding(mesh, mesh_lib.batch_partition_spec((rows,), mesh))


def load_policy(hf_dir: str, config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Policy:
  """Model, params, tokenizer and image config from a local HF directory. With a mesh, every tensor
  is placed sharded (by the logical-axis rules) as it is read."""
  from transformers import AutoTokenizer

  m = config.model
  runtime = dict(attention_impl=m.attention_impl, remat=m.remat, scan_layers=m.scan_layers)
  if mesh is not None:
    runtime["sharding_fn"] = sharding_lib.sharding_fn(mesh)
  model, params = qwen2_5_vl.from_pretrained(hf_dir, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
                                             **runtime)
  tok = AutoTokenizer.from_pretrained(hf_dir)
  pre = os.path.join(hf_dir, "preprocessor_config.json")
  icfg = image_lib.ImageConfig.from_preprocessor_config(pre) if os.path.exists(pre) else image_config(config)
  return Policy(model, params, tok, icfg, hf_dir)


def starting_hf_dir(config: ml_collections.ConfigDict, wd, stage: str) -> str:
  """The base policy: config.model.hf_dir, or the demo's base stage output."""
  from specs_jax.pipeline import require

  if config.model.hf_dir:
    return require(config.model.hf_dir, "the starting HF checkpoint (config.model.hf_dir)", stage)
  return require(wd.hf("base"), "the base model: set config.model.hf_dir to the starting HF checkpoint (e.g. "
                 "Qwen2.5-VL-7B-Instruct), or run the demo's base stage, which trains a tiny one", stage)


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
    paths = [d.rl_prompts] if isinstance(d.rl_prompts, str) else list(d.rl_prompts)
    if not paths:
      raise ValueError("data.source='files' needs data.rl_prompts: the ViRL39K / Orsta files or directories, "
                       "e.g. --config.data.rl_prompts=\"('/data/ViRL39K/39Krelease.parquet', '/data/Orsta')\"")
    res = data_lib.read_rl_prompts(paths, image_root=d.rl_image_root or None, on_error=d.on_error)
    log.info("%s", res.summary())
    if not res.examples:
      raise ValueError(f"data.rl_prompts {paths} hold no readable RL prompts ({res.summary()})")
    # A seeded shuffle before the cut: rows come file by file (ViRL39K, then Orsta), and a short run
    # must still see both.
    examples = list(res.examples)
    order = np.random.default_rng(config.seed + seed_offset).permutation(len(examples))
    return [examples[i] for i in order[:n]]
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


def prompt_sizes(policy: Policy, examples: Sequence[data_lib.Example], config) -> tuple[list[int], list[np.ndarray]]:
  """(prompt token counts, image grids) of `examples`, encoding one at a time and keeping no pixels:
  the sizing pass for `fixed_buckets`."""
  lengths, grids = [], []
  for ex in examples:
    enc = encode_examples(policy, [ex], config)[0].prompt
    lengths.append(len(enc.input_ids))
    grids.append(enc.image_grid_thw)
  return lengths, grids


def export(policy_params, policy: Policy, out_dir: str) -> str:
  """HF-format export of a stage's policy, with the tokenizer and preprocessor files."""
  if jax.process_count() > 1:  # gather the shards; one host writes (the workdir is shared storage)
    from jax.experimental import multihost_utils

    host_params = multihost_utils.process_allgather(policy_params, tiled=True)
    if jax.process_index() != 0:
      multihost_utils.sync_global_devices(f"export {out_dir}")
      return out_dir
  else:
    host_params = jax.device_get(policy_params)
  tmp = out_dir + ".tmp"
  if os.path.exists(tmp):
    import shutil

    shutil.rmtree(tmp)
  qwen2_5_vl.save_pretrained(host_params, policy.model.config, tmp, copy_files_from=policy.hf_dir)
  if os.path.exists(out_dir):
    import shutil

    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"export {out_dir}")
  return out_dir


@dataclasses.dataclass
class LoopResult:
  state: Any
  steps: int
  resumed_from: int | None


def train_loop(stage_dir: str, state, total_steps: int, step_fn: Callable[[Any, int], tuple[Any, dict]], *,
               checkpoint_every: int, progress: bool = True, data_state_fn: Callable[[int], dict] | None = None,
               extra: dict | None = None, on_step: Callable[[int, Any, dict], None] | None = None,
               max_nonfinite_in_a_row: int | None = None) -> LoopResult:
  """A resumable loop: restore the latest checkpoint, run `step_fn(state, step) -> (state, metrics)`
  from there to `total_steps`, log metrics (JSONL, TensorBoard, progress bar), save every
  `checkpoint_every` steps and at the end, and save on SIGTERM.

  Determinism: everything a step needs (data, RNG) must be a function of the step index (the
  stages derive batches and keys from it), so a resumed run equals an uninterrupted one. The step
  index resumed from is the checkpoint's (the loop step it was saved at), not `state.step`, which
  counts optimizer calls (a GRPO step makes 0..ppo_epochs·minibatches of them).

  Non-finite updates (docs/reliability.md): the optimizer skips an update with a NaN / inf loss or
  gradient (`training.state.skip_nonfinite`) and the step reports `nonfinite_updates` /
  `nonfinite_in_a_row`. A step whose last update was skipped is logged without its non-finite
  values and is never checkpointed (nor on SIGTERM): every checkpoint ends with an applied update.
  After `max_nonfinite_in_a_row` (default `config.run.max_nonfinite_in_a_row`) skipped updates in a
  row, or a non-finite metric after an applied update, the loop raises `pipeline.NonFiniteError`
  without saving; the latest checkpoint stays the last good state, and a re-run resumes from it.
  """
  from specs_jax.config_defaults import base_config
  from specs_jax.pipeline import NonFiniteError
  from specs_jax.training import state as state_lib

  if max_nonfinite_in_a_row is None:
    max_nonfinite_in_a_row = int(base_config().run.max_nonfinite_in_a_row)
  name = os.path.basename(os.path.normpath(stage_dir))
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), max_to_keep=2,
                               save_interval_steps=max(1, checkpoint_every))
  latest = ckpt.latest_step()
  restored = ckpt.restore(latest, state) if latest is not None else None
  start = 0
  if restored is not None:
    state, _, _ = restored
    start = latest
    log.info("%s: resumed at step %d", stage_dir, start)
  logger = metrics_lib.MetricsLogger(stage_dir, total_steps, start_step=start, progress=progress)
  counts = jax.device_get(state_lib.nonfinite_counts(state)) if isinstance(state, state_lib.TrainState) else {}
  prev_total = int(counts.get("nonfinite_updates", 0))
  # What SIGTERM saves: the latest state, unless its last update was skipped ("good" False).
  current = {"state": state, "step": start, "good": True, "saved": start if restored is not None else None}
  streak_from = None

  def save_now():
    if not current["good"]:
      log.warning("%s: SIGTERM after a skipped non-finite update at step %d: not saved; the latest checkpoint "
                  "(step %s) is kept", name, current["step"], current["saved"])
      return
    if ckpt.save(current["step"], current["state"], data_state_fn(current["step"]) if data_state_fn else {},
                 extra, force=True):
      current["saved"] = current["step"]
    ckpt.wait_until_finished()

  guard = ckpt_lib.install_sigterm_handler(save_now)
  try:
    for step in range(start, total_steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, step)
      metrics = {k: float(v) for k, v in jax.device_get(dict(metrics)).items() if np.ndim(v) == 0}
      in_a_row = int(metrics.get("nonfinite_in_a_row", 0))
      total = int(metrics.get("nonfinite_updates", prev_total))
      if total > prev_total:  # an update of this step was skipped: its NaN / inf values are not logged
        bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        log.warning("%s: step %d: non-finite update skipped, params unchanged (%d in a row, %d in all; "
                    "non-finite: %s)", name, step + 1, in_a_row, total, bad or "-")
      prev_total = total
      streak_from = None if in_a_row == 0 else (streak_from or step + 1)
      current["state"], current["step"], current["good"] = state, step + 1, in_a_row == 0
      try:
        logger.log(step + 1, metrics, step_time=time.perf_counter() - t0)
      except FloatingPointError as e:
        raise NonFiniteError(f"stage {name}: {e}; the state of step {step + 1} was not saved, the latest checkpoint "
                             f"(step {current['saved']}) is kept and a re-run resumes from it") from e
      if in_a_row >= max_nonfinite_in_a_row:
        raise NonFiniteError(
            f"stage {name}: {in_a_row} non-finite updates in a row (NaN / inf loss or gradients) at steps "
            f"{streak_from}..{step + 1} (run.max_nonfinite_in_a_row={max_nonfinite_in_a_row}); they were skipped, "
            f"nothing since was saved, the latest checkpoint (step {current['saved']}) is kept and a re-run "
            "resumes from it")
      if on_step is not None:
        on_step(step + 1, state, metrics)
      if current["good"] and ckpt.save(step + 1, state, data_state_fn(step + 1) if data_state_fn else {}, extra,
                                       force=step + 1 == total_steps):
        current["saved"] = step + 1
      guard.maybe_save_and_exit()
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
