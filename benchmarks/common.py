"""Shared pieces of the CPU benchmarks: the S / T model configs of PERFORMANCE.md, one set of
random weights for both frameworks, timing, and one-JSON-line-per-figure output."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# Before JAX or PyTorch start their thread pools; the same process-wide allocator for both sides.
from specs_jax import host  # noqa: E402

host.configure_malloc()

import numpy as np  # noqa: E402

CONFIGS = {
    # PERFORMANCE.md "S": ≈31M text + 5M vision params, one 224x224 image (64 image tokens)
    "S": dict(text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=1408, vocab_size=8192, mrope=[8, 12, 12]),
              vision=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=704, fullatt=[3]),
              image=224),
    # "T": overhead-dominated
    "T": dict(text=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=352, vocab_size=2048, mrope=[4, 6, 6]),
              vision=dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=176, fullatt=[1]),
              image=112),
}


def hf_config_dict(name: str) -> dict:
  c = CONFIGS[name]
  t, v = c["text"], c["vision"]
  return dict(
      text_config=dict(hidden_size=t["hidden_size"], num_hidden_layers=t["num_hidden_layers"],
                       num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                       intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"], rms_norm_eps=1e-6,
                       max_position_embeddings=8192, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                       rope_parameters={"rope_type": "default", "mrope_section": t["mrope"], "rope_theta": 1e6}),
      vision_config=dict(depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
                         intermediate_size=v["intermediate_size"], out_hidden_size=t["hidden_size"],
                         fullatt_block_indexes=v["fullatt"], window_size=112, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, tokens_per_second=2),
      image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=False)


def build_pair(name: str, seed: int = 0):
  """(hf_model float32 eval, jax model, jax params) with identical weights, via a temp HF dir."""
  import hf_fixtures
  import jax.numpy as jnp

  from specs_jax.models import qwen2_5_vl

  hf = hf_fixtures.build_hf_model(hf_config_dict(name), seed=seed, std=0.02)
  d = tempfile.mkdtemp(prefix=f"bench_{name}_")
  hf.save_pretrained(d)
  model, params = qwen2_5_vl.from_pretrained(d, dtype=jnp.float32)
  return hf, model, params


def mm_prompt_batch(name: str, batch: int, prompt_len: int, seed: int = 0):
  """A batch of `batch` prompts of exactly `prompt_len` tokens holding one image each."""
  from specs_jax.processing import image as image_lib  # noqa: F401  (only for the shapes contract)

  c = CONFIGS[name]
  side = c["image"]
  g = side // 14
  n_img_tokens = g * g // 4
  rng = np.random.default_rng(seed)
  vocab = c["text"]["vocab_size"]
  ids = rng.integers(10, vocab, size=(batch, prompt_len)).astype(np.int64)
  ids[:, 1] = 3
  ids[:, 2:2 + n_img_tokens] = 5
  ids[:, 2 + n_img_tokens] = 4
  mask = np.ones_like(ids)
  pv = rng.standard_normal((batch * g * g, 1176)).astype(np.float32)
  thw = np.tile(np.array([[1, g, g]], np.int64), (batch, 1))
  return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
              mm_token_type_ids=(ids == 5).astype(np.int64))


def emit(**fields) -> None:
  fields.setdefault("machine", f"{platform.machine()} {os.cpu_count()} cpu")
  fields.setdefault("date", time.strftime("%Y-%m-%d"))
  print(json.dumps(fields), flush=True)


def timed(fn, repeats: int = 1):
  """Median wall time of `repeats` calls (fn must block until its result is ready)."""
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Measured float32 matmul throughput of JAX on this machine (the MFU denominator): the fastest
  of `repeats` calls, since a peak is what the machine can do (a median on this shared machine
  once came out at 250 instead of ~330 GFLOP/s and put MFUs above 1)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    t = min(t, time.perf_counter() - t0)
  return 2 * n**3 / t / 1e9
