"""FLOP counts by hand, and the metrics logger's JSONL / TensorBoard / progress output."""

import io
import json
import math
import os

import pytest

from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from specs_jax.training import metrics

# The test fixture's tiny geometry: text D=64, 4 heads of 16 (2 KV heads), MLP 128, 2 layers,
# vocab 483; vision Dv=32, depth 2, MLP 64, out 64, merge 2.
CFG = Qwen2_5_VLConfig(
    text=TextConfig(vocab_size=483, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, mrope_section=(2, 3, 3)),
    vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                        fullatt_block_indexes=(1,)))


def test_flops_by_hand():
  # per layer: q, o 64·64 each + k, v 64·32 each = 12288; MLP 3·64·128 = 24576 -> 36864;
  # 2 layers = 73728, + LM head 64·483 = 30912 -> 104640 matmul params per token
  assert metrics.text_matmul_params(CFG) == 104640
  # forward at L = 100: 2·104640 + 4·100·64·2 = 209280 + 51200 = 260480; a train step is 3×
  assert metrics.flops_per_token(CFG, 100, train=False) == 260480
  assert metrics.flops_per_token(CFG, 100) == 3 * 260480
  # vision per patch: embed 1176·32 = 37632; blocks 2·(4·32² + 3·32·64) = 20480;
  # merger (128·128 + 128·64)/4 = 6144 -> 64256; 16 patches: 2·64256·16 + 4·16²·32·2 = 2121728
  assert metrics.vision_flops(CFG, 16) == 2121728
  assert metrics.vision_flops(CFG, 16, train=True) == 3 * 2121728
  # a step over 2 rows of 100 tokens with a frozen tower: 200·781440 + 2121728 (forward only)
  assert metrics.step_flops(CFG, rows=2, seq_len=100, num_patches=16) == 200 * 781440 + 2121728
  assert metrics.measure_matmul_peak(n=64, iters=2) > 0


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_logger_jsonl_tensorboard_progress_and_mfu(tmp_path):
  bar = io.StringIO()
  with metrics.MetricsLogger(tmp_path, total_steps=10, peak_flops=1e10, progress_file=bar) as logger:
    r = logger.log(1, {"loss": 2.5, "rewards/margins": 0.25, "note": "skipped", "vec": [1, 2]},
                   tokens=1000, flops=1e9, step_time=0.5)
    logger.log(2, {"loss": 2.0}, tokens=1000)
  # 1000 tokens / 0.5 s = 2000 tok/s; 1e9 FLOP / 0.5 s = 2e9 FLOP/s = 20% of 1e10
  assert r["tokens_per_s"] == 2000 and r["flops_per_s"] == 2e9 and r["mfu"] == pytest.approx(0.2)
  recs = _records(tmp_path / "metrics.jsonl")
  assert [x["step"] for x in recs] == [1, 2]
  assert recs[0]["loss"] == 2.5 and recs[0]["rewards/margins"] == 0.25
  assert "note" not in recs[0] and "vec" not in recs[0]               # only scalars are logged
  assert "mfu" not in recs[1] and recs[1]["tokens_per_s"] > 0         # measured wall time
  events = os.listdir(tmp_path / "tensorboard")
  assert any(e.startswith("events.out.tfevents") for e in events)
  assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
  out = bar.getvalue()
  assert "2/10" in out and "loss=2" in out and "tok/s=" in out

  # a resumed run appends, and its bar starts at the resume step
  bar2 = io.StringIO()
  with metrics.MetricsLogger(tmp_path, total_steps=10, start_step=2, tensorboard=False,
                             progress_file=bar2) as logger:
    logger.log(3, {"loss": 1.5})
  assert [x["step"] for x in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3]
  assert "3/10" in bar2.getvalue()


def test_logger_stops_on_nan_naming_the_steps(tmp_path):
  with metrics.MetricsLogger(tmp_path, total_steps=10, tensorboard=False, progress=False) as logger:
    logger.log(2, {"loss": 1.0})
    with pytest.raises(FloatingPointError, match=r"\['loss/dpo'\] at step 5.*steps 3\.\.5"):
      logger.log(5, {"loss": 1.0, "loss/dpo": float("nan")})
  rec = _records(tmp_path / "metrics.jsonl")[-1]
  assert rec["step"] == 5 and math.isnan(rec["loss/dpo"])            # written before raising


def test_resumed_logger_replaces_the_steps_it_redoes(tmp_path):
  """A run killed after step 5 whose last checkpoint is step 3 resumes at 3: the re-done steps 4-5
  replace the first attempt's rows (and a torn last line is dropped), so the file holds each step once."""
  log = metrics.MetricsLogger(tmp_path, 8, tensorboard=False, progress=False)
  for step in range(1, 6):
    log.log(step, {"loss": float(step)}, step_time=1.0)
  log.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # killed mid-write
  log = metrics.MetricsLogger(tmp_path, 8, start_step=3, tensorboard=False, progress=False)
  for step in range(4, 9):
    log.log(step, {"loss": 10.0 * step}, step_time=1.0)
  log.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0, 70.0, 80.0]
