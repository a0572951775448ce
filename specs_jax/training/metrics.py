"""Training metrics: JSONL (always), TensorBoard event files, a progress bar, throughput and MFU.

    logger = MetricsLogger(workdir / "coldstart", total_steps=140, peak_flops=measure_matmul_peak())
    for step ...:
      state, m = step_fn(state, batch)
      logger.log(step, jax.device_get(m), tokens=float(m["tokens"]),
                 flops=step_flops(cfg, rows=R, seq_len=L, num_patches=Nb))
    logger.close()

Each `log` call writes one JSON object to `<workdir>/metrics.jsonl`: {"step": int, <metric>: float, ...,
"step_time_s", "tokens_per_s", "flops_per_s", "mfu" (when tokens / flops / peak are known), "elapsed_s"}.
Only process 0 writes (files, TensorBoard, progress bar). A NaN or inf metric is written, then raises
`FloatingPointError` naming the metric and the step range since the last finite log (big_vision).

FLOPs (PERFORMANCE.md): forward text FLOPs per token = 2·(matmul params per token) + 4·L·hidden·layers
(attention scores and values over a length-L sequence: 4·L²·hidden·layers per sequence); vision ≈
2·(matmul params)·patches + attention; a training step costs 3× the forward (backward = 2× forward),
except for a frozen vision tower, which only runs forward. MFU = achieved FLOP/s / peak FLOP/s, with
the peak *measured* in the same run (`measure_matmul_peak`) or a datasheet number.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

__all__ = [
    "MetricsLogger",
    "flops_per_token",
    "measure_matmul_peak",
    "step_flops",
    "text_matmul_params",
    "vision_flops",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- FLOPs

def text_matmul_params(config: Qwen2_5_VLConfig) -> int:
  """Parameters that take part in a matmul for every text token: q, k, v, o, gate, up, down per
  layer, plus the LM head (the embedding lookup is not a matmul)."""
  t = config.text
  d, hd = t.hidden_size, t.head_dim
  attn = d * t.num_attention_heads * hd * 2 + d * t.num_key_value_heads * hd * 2      # q, o + k, v
  mlp = 3 * d * t.intermediate_size
  return t.num_hidden_layers * (attn + mlp) + d * t.vocab_size


def flops_per_token(config: Qwen2_5_VLConfig, seq_len: int, *, train: bool = True) -> float:
  """Text-decoder FLOPs per token of a length-`seq_len` sequence: 2·N_matmul + 4·L·hidden·layers
  forward (PERFORMANCE.md), ×3 for a training step (forward + 2× backward)."""
  t = config.text
  fwd = 2.0 * text_matmul_params(config) + 4.0 * seq_len * t.hidden_size * t.num_hidden_layers
  return 3.0 * fwd if train else fwd


def vision_flops(config: Qwen2_5_VLConfig, num_patches: int, *, train: bool = False) -> float:
  """Vision-tower FLOPs for `num_patches` patches: 2·(matmul params per patch)·patches plus the
  attention, counted as full attention over all patches (an upper bound for the window blocks);
  ×3 when the tower is trained, ×1 when frozen (forward only)."""
  v = config.vision
  dv, m2 = v.hidden_size, v.spatial_merge_size ** 2
  per_patch = (v.patch_dim * dv + v.depth * (4 * dv * dv + 3 * dv * v.intermediate_size)
               + (m2 * dv * m2 * dv + m2 * dv * v.out_hidden_size) / m2)     # the merger runs per m² patches
  fwd = 2.0 * per_patch * num_patches + 4.0 * num_patches * num_patches * dv * v.depth
  return 3.0 * fwd if train else fwd


def step_flops(config: Qwen2_5_VLConfig, *, rows: int, seq_len: int, num_patches: int = 0, train: bool = True,
               train_vision: bool = False) -> float:
  """Model FLOPs of one step over a padded batch: rows·L tokens of the decoder (+ the vision tower on
  `num_patches` patches). Padding is counted: this is the work the hardware does."""
  return (rows * seq_len * flops_per_token(config, seq_len, train=train)
          + (vision_flops(config, num_patches, train=train and train_vision) if num_patches else 0.0))


def measure_matmul_peak(n: int = 2048, dtype: Any = jnp.float32, iters: int = 5) -> float:
  """Achieved FLOP/s of a jitted [n, n] @ [n, n] matmul on the default device (best of `iters`):
  the "measured peak" MFU is reported against. On CPU use n ≈ 1024–2048; on an accelerator use
  bf16 and n ≥ 8192."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = math.inf
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


# ------------------------------------------------------------------------------------ logger

def _scalar(v: Any) -> float | int | None:
  try:
    a = np.asarray(v)
  except Exception:  # noqa: BLE001 - anything not array-like is skipped
    return None
  if a.size != 1 or a.dtype.kind not in "biuf":
    return None
  x = a.reshape(()).item()
  return x if isinstance(x, int) and not isinstance(x, bool) else float(x)


def _truncate_after(path: str, step: int) -> None:
  """Drops the JSONL records of steps after `step` (and a torn last line): a run resumed from the
  checkpoint of `step` re-does those steps, and the file then holds each step once, as an
  uninterrupted run's does."""
  if not os.path.exists(path):
    return
  keep, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        dropped += 1
        continue
      if isinstance(rec, dict) and int(rec.get("step", 0)) > step:
        dropped += 1
        continue
      keep.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, path)


class MetricsLogger:
  """Writes per-step metrics to JSONL, TensorBoard and a tqdm progress bar (process 0 only).

  Args:
    workdir: the stage directory; `metrics.jsonl` and `tensorboard/` go there.
    total_steps: the number of steps of the stage (progress bar and ETA).
    start_step: the step a resumed run starts from (its bar starts there; JSONL is appended to).
    peak_flops: FLOP/s that MFU is relative to (e.g. `measure_matmul_peak()`); None: no MFU.
    tensorboard: write TensorBoard event files (tensorboardX).
    progress: show a progress bar with loss, tokens/s and ETA.
    progress_file: where the bar goes (default stderr).
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int, *, start_step: int = 0,
               peak_flops: float | None = None, tensorboard: bool = True, progress: bool = True,
               progress_file: IO[str] | None = None, filename: str = "metrics.jsonl"):
    self.workdir = os.fspath(workdir)
    self.total_steps = int(total_steps)
    self.peak_flops = peak_flops
    self.is_writer = jax.process_index() == 0
    self._t_start = self._t_last = time.perf_counter()
    self._last_step = self._last_finite = int(start_step)
    self._file = self._tb = self._bar = None
    if not self.is_writer:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self.path = os.path.join(self.workdir, filename)
    _truncate_after(self.path, int(start_step))
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=self.total_steps, initial=int(start_step), dynamic_ncols=True, unit="step",
                       file=progress_file if progress_file is not None else sys.stderr)

  def log(self, step: int, metrics: Mapping[str, Any], *, tokens: float | None = None, flops: float | None = None,
          step_time: float | None = None) -> dict[str, Any]:
    """Logs the metrics of `step` (scalars; non-scalar values are skipped).

    Args:
      step: the step just finished (1-based count of updates, i.e. `state.step` after the update).
      metrics: name → scalar (device arrays are fetched).
      tokens: tokens processed by this one step (for tokens/s).
      flops: model FLOPs of this one step (for FLOP/s and MFU; see `step_flops`).
      step_time: seconds of this step; None measures the wall time since the previous `log` call
        divided by the steps since then (so it includes input and host time, and the first call
        includes compilation).
    Returns:
      the record written (also on other processes, which write nothing).
    Raises:
      FloatingPointError: a metric is NaN or inf (after writing the record).
    """
    now = time.perf_counter()
    n_steps = max(int(step) - self._last_step, 1)
    dt = step_time if step_time is not None else (now - self._t_last) / n_steps
    record: dict[str, Any] = {"step": int(step)}
    for k, v in metrics.items():
      x = _scalar(jax.device_get(v))
      if x is not None:
        record[k] = x
    record["step_time_s"] = dt
    if tokens is not None and dt > 0:
      record["tokens_per_s"] = float(tokens) / dt
    if flops is not None and dt > 0:
      record["flops_per_s"] = float(flops) / dt
      if self.peak_flops:
        record["mfu"] = record["flops_per_s"] / self.peak_flops
    record["elapsed_s"] = now - self._t_start
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    self._write(record)
    prev = self._last_finite
    self._t_last, self._last_step = now, int(step)
    if bad:
      raise FloatingPointError(f"non-finite metrics {bad} at step {step} (last finite log at step {prev}; the "
                               f"problem arose in steps {prev + 1}..{step})")
    self._last_finite = int(step)
    return record

  def _write(self, record: dict[str, Any]) -> None:
    if not self.is_writer:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    step = record["step"]
    if self._tb is not None:
      for k, v in record.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.update(max(step - self._bar.n, 0))
      post = {}
      if "loss" in record:
        post["loss"] = f"{record['loss']:.4g}"
      if "tokens_per_s" in record:
        post["tok/s"] = f"{record['tokens_per_s']:.4g}"
      if "mfu" in record:
        post["mfu"] = f"{record['mfu']:.1%}"
      self._bar.set_postfix(post, refresh=True)

  def close(self) -> None:
    """Flushes and closes the JSONL file, the TensorBoard writer and the progress bar."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
