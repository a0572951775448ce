"""Gradients: the Flax model's parameter gradients against PyTorch autograd on the HF model, and the
hand-written backward of `layers.matmul` against JAX's own autodiff (values, dtypes, remat, scan).

The dense layers use a custom VJP (`layers.matmul`, a faster program on XLA:CPU), so the training
gradients are no longer JAX's autodiff of the forward: these tests are what shows they are right.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_inputs import hf_batch, random_image
from specs_jax.models import qwen2_5_vl
from specs_jax.models.qwen2_5_vl import layers


def _nll_jax(model, batch):
  """Mean next-token NLL over the real positions, as a function of the params (jit-able: the
  positions and vision metadata are prepared on the host)."""
  ids = jnp.asarray(batch["input_ids"])
  mask = jnp.asarray(batch["attention_mask"])
  prep = qwen2_5_vl.prepare_inputs(model.config, batch["input_ids"], batch["attention_mask"],
                                   batch["image_grid_thw"], pixel_values=batch["pixel_values"], slot_size="auto")

  def loss(params):
    logits = model.apply({"params": params}, ids, mask, pixel_values=prep.pixel_values,
                         position_ids=prep.position_ids, vision=prep.vision)
    lp = jax.nn.log_softmax(logits[:, :-1], -1)
    tok = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    w = mask[:, :-1] * mask[:, 1:]  # real position predicting a real token (left padding)
    return -jnp.sum(tok * w) / jnp.sum(w)

  return loss


def _module_name(checkpoint_key: str) -> str:
  """Checkpoint key (`model.layers.0...`, `visual...`) → transformers 5 module path."""
  if checkpoint_key.startswith("visual."):
    return "model." + checkpoint_key
  if checkpoint_key.startswith("model."):
    return "model.language_model." + checkpoint_key[len("model."):]
  return checkpoint_key


@pytest.fixture(scope="module")
def grad_batch(tokenizer, image_processor):
  rng = np.random.default_rng(11)
  return hf_batch(tokenizer, image_processor, [
      ("<image>how many red circles are there? think, then answer", [random_image(rng, 112, 140)]),
      ("<image>which is larger, left or right?", [random_image(rng, 84, 56)]),
  ])


def test_parameter_gradients_match_torch_autograd(jax_model, hf_model, grad_batch):
  import torch

  model, params = jax_model
  batch = grad_batch
  value, grads = jax.jit(jax.value_and_grad(_nll_jax(model, batch)))(params)

  kw = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  named = dict(hf_model.named_parameters())
  logits = hf_model(**kw).logits.float()
  ids, mask = kw["input_ids"], kw["attention_mask"].float()
  lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
  w = mask[:, :-1] * mask[:, 1:]
  ref_loss = -(lp * w).sum() / w.sum()
  ref = dict(zip(named, torch.autograd.grad(ref_loss, list(named.values()), allow_unused=True)))
  np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)

  ours = qwen2_5_vl.weights.to_hf_state_dict(grads, model.config)
  checked = 0
  for key, g in ours.items():
    r = ref.get(_module_name(key))
    assert r is not None, f"no torch gradient for {key}"
    r = r.numpy().reshape(np.shape(g))
    scale = np.abs(r).max()
    err = np.abs(np.asarray(g) - r).max()
    assert err <= 1e-5 + 2e-4 * scale, f"{key}: max abs diff {err:.3g} (grad scale {scale:.3g})"
    checked += 1
  # every decoder and vision dense kernel is among the compared tensors
  assert checked == len(ref), (checked, len(ref))
  assert any(".mlp.down_proj." in k for k in ours) and any("visual.blocks.0.attn.qkv" in k for k in ours)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5), (2, 1, 4, 5)])
def test_matmul_backward_equals_autodiff(shape):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (shape[-1], 7))
  g = jax.random.normal(kg, (*shape[:-1], 7))
  ref = lambda x, w: jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))  # noqa: E731
  y, vjp = jax.vjp(layers.matmul, x, w)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  np.testing.assert_array_equal(y, y_ref)
  for a, b in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_matmul_backward_keeps_dtypes():
  x = jnp.ones((3, 4), jnp.bfloat16)
  w = jnp.ones((4, 2), jnp.bfloat16)
  y, vjp = jax.vjp(layers.matmul, x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
  np.testing.assert_array_equal(np.asarray(dw, np.float32), np.full((4, 2), 3.0))


def test_dense_uses_lax_for_other_contractions():
  # nn.Dense only ever asks for the [..., K] x [K, N] contraction; anything else goes to lax unchanged
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  out = layers._dense_dot_general(a, b, (((2,), (1,)), ((0,), (0,))))
  np.testing.assert_array_equal(out, jnp.full((2, 3, 5), 4.0))


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", False), ("dots", True)])
def test_remat_and_scan_give_the_same_gradients(hf_dir, jax_model, grad_batch, remat, scan):
  model, params = jax_model
  ref = jax.jit(jax.grad(_nll_jax(model, grad_batch)))(params)
  rmodel, rparams = qwen2_5_vl.from_pretrained(hf_dir, remat=remat, scan_layers=scan)
  got = jax.jit(jax.grad(_nll_jax(rmodel, grad_batch)))(rparams)
  a = qwen2_5_vl.weights.to_hf_state_dict(ref, model.config)
  b = qwen2_5_vl.weights.to_hf_state_dict(got, rmodel.config)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("mask_heads", [1, 3])
def test_grouped_attention_backward_equals_autodiff(mask_heads):
  from specs_jax.models.qwen2_5_vl import attention

  b, hkv, g, s, t, d = 2, 3, 2, 5, 7, 4
  ks = jax.random.split(jax.random.key(1), 5)
  qg = jax.random.normal(ks[0], (b, hkv, g, s, d))
  k = jax.random.normal(ks[1], (b, hkv, t, d))
  v = jax.random.normal(ks[2], (b, hkv, t, d))
  mask = jax.random.bernoulli(ks[3], 0.7, (b, mask_heads, 1, s, t))
  mask = mask.at[0, :, :, 1].set(False)  # a fully masked query row (padding): uniform, no gradient
  d_out = jax.random.normal(ks[4], (b, hkv, g, s, d))

  def ref(qg, k, v):
    scores = jnp.einsum("bkgsd,bktd->bkgst", qg, k) * d**-0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, attention.NEG_INF), axis=-1)
    return jnp.einsum("bkgst,bktd->bkgsd", probs, v)

  out, vjp = jax.vjp(lambda *a: attention.grouped_attention(*a, mask), qg, k, v)
  out_ref, vjp_ref = jax.vjp(ref, qg, k, v)
  np.testing.assert_allclose(out, out_ref, rtol=1e-6, atol=1e-6)
  for name, a, r in zip("qkv", vjp(d_out), vjp_ref(d_out)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5, err_msg=name)
