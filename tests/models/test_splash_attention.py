"""The TPU splash-attention kernel (attention_impl="splash") in Pallas interpret mode on CPU equals
the "xla" implementation: the attention function on text (causal, left padding, GQA) and vision
(window / full-attention segments in image slots) masks, its gradients, the shard_map path, and
the whole tiny model's logits on a multimodal batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mm_inputs import hf_batch, random_image
from specs_jax.kernels import splash
from specs_jax.models import qwen2_5_vl
from specs_jax.models.qwen2_5_vl import attention, rope
from specs_jax.models.qwen2_5_vl.text import causal_mask
from specs_jax.parallel import mesh as mesh_lib

# Interpret mode runs the kernel's grid as a loop of XLA ops: correct, slow, so blocks of 128.
INTERPRET = dict(interpret=True, max_block=128)
# float32: the kernel's online softmax (running max, rescaled sums per 128-key block) and q scaled
# before the dot instead of the scores after reorder the float32 arithmetic; measured ≤ 6e-7.
ATOL = 1e-5


def _qkv(seed, b, s, hq, hkv, d):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, s, hq, d)), jax.random.normal(kk, (b, hkv, s, d)),
          jax.random.normal(kv, (b, hkv, s, d)))


def _text_case(seed, s, pads, hq=4, hkv=2, d=16):
  """Left-padded rows (pads[i] padding tokens), the mask text.py builds, the real-query rows."""
  q, k, v = _qkv(seed, len(pads), s, hq, hkv, d)
  kv_mask = (np.arange(s)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)  # [B, S]
  return q, k, v, causal_mask(jnp.asarray(kv_mask), s, 0), kv_mask.astype(bool)


def _vision_masks():
  """Window and full-attention masks [S, 1, Q, Q] of three images in slots of 192 patches (a
  padded slot, windows of 4×4 merge units, two temporal slices in one image), as vision.py builds."""
  vcfg = qwen2_5_vl.Qwen2_5_VLConfig().vision  # real window size: 112 px = 4 merge units
  meta = rope.vision_metadata(vcfg, [[1, 8, 12], [2, 4, 6], [1, 12, 16]], slot_size=192, num_slots=4)
  eq = lambda seg: jnp.asarray(seg[:, :, None] == seg[:, None, :])[:, None]
  return eq(meta.window_seg), eq(meta.full_seg)


# --------------------------------------------------------------------------------- the function


def test_block_size_pads_least():
  assert splash.block_size(37) == 128 and splash.block_size(600) == 128   # 640 rather than 768 / 1024
  assert splash.block_size(1000) == 512 and splash.block_size(700) == 256  # 1024 for all three; 768
  assert splash.block_size(5000, max_block=128) == 128


@pytest.mark.parametrize("s, pads", [(37, [0, 5]), (130, [0, 129]), (200, [77, 0])])
def test_text_causal_left_padding_gqa_equals_xla(s, pads):
  q, k, v, mask, real = _text_case(s, s, pads)
  with splash.options(**INTERPRET):
    got = attention.get("splash")(q, k, v, mask)
  want = attention.xla_attention(q, k, v, mask)
  assert got.shape == want.shape == (len(pads), s, 4, 16)
  # real queries only: padding rows are fully masked, "xla" averages all values there
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=ATOL, rtol=0)
  assert np.isfinite(np.asarray(got)).all()


def test_vision_window_and_full_segments_equal_xla():
  win, full = _vision_masks()
  for mask in (win, full):
    q, k, v = _qkv(1, mask.shape[0], mask.shape[-1], 2, 2, 16)
    with splash.options(**INTERPRET):
      got = splash.attention_from_mask(q, k, v, mask)
    # every row, padding patches included: the padding segment attends itself in both
    np.testing.assert_allclose(np.asarray(got), np.asarray(attention.xla_attention(q, k, v, mask)), atol=ATOL, rtol=0)


def test_mask_structure_recovered():
  _, _, _, mask, _ = _text_case(0, 8, [3])
  np.testing.assert_array_equal(splash.mask_segments(mask)[0], [-1, -1, -1, 3, 3, 3, 3, 3])
  win, full = _vision_masks()
  assert bool(splash.mask_is_causal(mask)) and not bool(splash.mask_is_causal(win))
  seg = np.asarray(splash.mask_segments(full))
  np.testing.assert_array_equal(seg[:, :, None] == seg[:, None, :], np.asarray(full)[:, 0])


def test_gradients_equal_xla():
  """The kernel's fused backward equals autodiff through "xla" (real query rows in the loss)."""
  q, k, v, mask, real = _text_case(2, 150, [0, 40])
  w = jax.random.normal(jax.random.key(9), q.shape) * jnp.asarray(real)[:, :, None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * w)
  with splash.options(**INTERPRET):
    got = jax.grad(loss(splash.attention_from_mask), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attention.xla_attention), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=ATOL, rtol=0)  # measured ≤ 2.9e-6


def test_kv_cache_calls_fall_back_to_xla():
  q, k, v, _, _ = _text_case(3, 64, [0, 10])
  kv_mask = jnp.asarray(np.arange(64)[None] >= np.array([[0], [10]]), jnp.int32)
  for s, idx in ((1, 40), (8, 0)):  # a decode step; a prefill into a longer cache
    m = causal_mask(kv_mask, s, idx)
    with splash.options(**INTERPRET):
      got = splash.attention_from_mask(q[:, :s], k, v, m)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(attention.xla_attention(q[:, :s], k, v, m)))


def test_off_tpu_without_interpret_is_a_clear_error():
  q, k, v, mask, _ = _text_case(0, 16, [0])
  with pytest.raises(ValueError, match="TPU kernel.*interpret=True"):
    splash.attention_from_mask(q, k, v, mask)


def test_context_mesh_runs_in_shard_map():
  """Under jax.set_mesh on 8 devices the kernel runs per shard (rows over data×fsdp, kv heads over
  tensor), as Mosaic requires on TPU; same numbers."""
  q, k, v, mask, real = _text_case(4, 100, [0, 30, 99, 7])
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  put = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
  args = (put(q, P(("data", "fsdp"), None, "tensor")), put(k, P(("data", "fsdp"), "tensor")),
          put(v, P(("data", "fsdp"), "tensor")), put(mask, P(("data", "fsdp"))))
  with splash.options(**INTERPRET), jax.set_mesh(mesh):
    got = jax.jit(splash.attention_from_mask)(*args)
    assert "shard_map" in str(jax.make_jaxpr(splash.attention_from_mask)(*args))
  want = attention.xla_attention(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ the model


def test_model_logits_splash_equal_xla(hf_dir, jax_model, tokenizer, image_processor):
  """Tiny Qwen2.5-VL on a left-padded batch of three images in two rows (vision windows, a
  full-attention block, GQA 4/2 text): logits at real tokens, splash vs xla."""
  model, params = jax_model
  rng = np.random.default_rng(10)
  batch = hf_batch(tokenizer, image_processor, [
      ("<image>how many circles?", [random_image(rng, 112, 168)]),
      ("<image> and <image> which is larger", [random_image(rng, 56, 84), random_image(rng, 84, 56)]),
  ])
  ids, mask = batch["input_ids"], batch["attention_mask"]
  prep = qwen2_5_vl.prepare_inputs(model.config, ids, mask, batch["image_grid_thw"], slot_size="auto",
                                   pixel_values=batch["pixel_values"])
  kw = dict(pixel_values=prep.pixel_values, position_ids=prep.position_ids, vision=prep.vision)
  valid = mask.astype(bool)
  want = np.asarray(model.apply({"params": params}, ids, mask, **kw))[valid]
  with splash.options(**INTERPRET):  # from_pretrained traces the model (eval_shape) too
    smodel, _ = qwen2_5_vl.from_pretrained(hf_dir, attention_impl="splash")
    got = np.asarray(jax.jit(smodel.apply)({"params": params}, ids, mask, **kw))[valid]  # one compile
  # composite-module tolerance (STYLE.md §8); measured max |Δ| 1.2e-5 on logits of max |x| 7.4
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
