"""The AOT memory plan (benchmarks/memory_plan.py) on the paper's DPO setting, Qwen2.5-VL-7B.

Compiles the real-size DPO step (64 pairs, L = 2,048 + 14,336, one 1,024-token image per pair, f32
master weights, bf16 compute, remat full, scanned layers, one row per device per micro-batch) for an
8-device FSDP mesh of virtual CPU devices, from abstract shapes only, in a subprocess (the device
count is fixed when jax starts). About a minute on 2 cores, ~1 GB of host memory.
"""

import json
import os
import subprocess
import sys

import pytest

PLAN = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "memory_plan.py")
QWEN25_VL_7B_PARAMS = 8_292_166_656   # HF's count for Qwen2.5-VL-7B-Instruct ("8.29B")
QWEN25_VL_7B_VISION = 676_550_144     # visual.* (tower + merger); frozen, so no Adam moments
V5P_HBM = 95e9


@pytest.fixture(scope="module")
def dpo_7b() -> dict:
  out = subprocess.run([sys.executable, PLAN, "--model", "7b", "--devices", "8", "--what", "dpo", "--json"],
                       capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  figures = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(figures) == 1, out.stdout
  return figures[0]


@pytest.mark.slow
def test_7b_dpo_step_fits_a_v5p_fsdp_mesh(dpo_7b):
  f = dpo_7b
  assert (f["devices"], f["mesh"]["fsdp"], f["micro_batches"], f["seq_len"]) == (8, 8, 16, 16384)
  # total = argument + output − alias + temp, per device
  assert f["total_bytes"] == f["argument_bytes"] + f["output_bytes"] - f["alias_bytes"] + f["temp_bytes"]
  assert f["total_bytes"] < V5P_HBM, f"{f['total_bytes'] / 1e9:.1f} GB per device"
  # The state is donated: every output byte of the new state reuses an input buffer (only the
  # metrics are fresh), so the step never holds two train states.
  assert f["output_bytes"] - f["alias_bytes"] < 1e6


@pytest.mark.slow
def test_7b_dpo_argument_bytes_match_the_analytic_count(dpo_7b):
  f = dpo_7b
  assert f["params_total"] == QWEN25_VL_7B_PARAMS
  assert f["params_trainable"] == QWEN25_VL_7B_PARAMS - QWEN25_VL_7B_VISION
  # f32 params (all) + AdamW mu and nu in f32 (trainable only: the frozen tower has MaskedNode
  # placeholders), split 8 ways by FSDP; norms and biases are replicated but tiny (< 0.1%).
  state = (4 * f["params_total"] + 2 * 4 * f["params_trainable"]) / 8
  rows, length = f["rows"], f["seq_len"]
  # input_ids, attention_mask, completion_mask [128, L] and position_ids [3, 128, L] int32, split over 8
  # devices; the pixel values [64 slots × 4,096 patches, 1,176] f32 replicated (each pair's image once).
  batch = 6 * rows * length * 4 / 8 + 64 * 4096 * 1176 * 4
  expected = state + batch
  # ≈ 11.76 GB of state + 1.24 GB of batch = 13.0 GB (a bf16 state would be 5.9 GB of it)
  assert abs(f["argument_bytes"] - expected) / expected < 0.01, (f["argument_bytes"], expected)
  # the shard-by-shard count from the abstract inputs' shardings agrees to the byte, bar padding
  assert abs(f["argument_bytes"] - f["analytic_argument_bytes"]) / f["argument_bytes"] < 1e-3
