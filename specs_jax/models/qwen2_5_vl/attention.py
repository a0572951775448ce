"""Attention kernels behind one signature, selected by `Qwen2_5_VLConfig.attention_impl`.

Every implementation takes
    q [B, S, Hq, D], k [B, Hkv, T, D], v [B, Hkv, T, D], mask [B, 1|Hq, S, T] bool (True = attend)
and returns [B, S, Hq, D] in q's dtype, with softmax in float32 and scale D**-0.5. Hq is a
multiple of Hkv (GQA): keys/values are shared by groups of Hq/Hkv query heads without being copied.
Keys/values are head-major ([B, Hkv, T, D], the KV-cache layout): a decode step then reads the
cache without a transpose (a [B, T, H, D] cache cost a full transposed copy per layer per step).

  "xla"          einsum + masked softmax (default; exact reference on CPU)
  "dot_product"  `jax.nn.dot_product_attention(implementation="xla")`
  "cudnn"        `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on GPU, bf16/f16)
  "splash"       TPU splash attention (Pallas), `specs_jax.kernels.splash`, imported by `get("splash")`
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}
NEG_INF = -1e30  # finite: a fully masked row (padding) gives a uniform softmax, not NaN


def register(name: str, fn: AttentionFn) -> None:
  """Registers an attention implementation under `name` (e.g. a TPU splash-attention kernel)."""
  _REGISTRY[name] = fn


def get(name: str) -> AttentionFn:
  if name == "splash" and name not in _REGISTRY:
    # Lazy: the Pallas TPU modules are imported only when a config asks for the kernel; importing
    # specs_jax.kernels.splash registers it (off TPU it raises at call time unless interpret mode is on).
    import specs_jax.kernels.splash  # noqa: F401
  if name not in _REGISTRY:
    raise ValueError(f"attention implementation {name!r} is not available; have {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def _masked_probs(qg, k, mask):
  """softmax(q·k / sqrt(D)) over keys, float32 [B, Hkv, G, S, T]; masked scores are NEG_INF."""
  scale = qg.shape[-1] ** -0.5
  scores = jnp.einsum("bkgsd,bktd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
  return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


def _grouped_attention_fwd(qg, k, v, mask):
  probs = _masked_probs(qg, k, mask)
  out = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(v.dtype), v)
  return out, (qg, k, v, mask, probs)


def _grouped_attention_bwd(res, d_out):
  qg, k, v, mask, probs = res
  b, hkv, g, s, t = probs.shape
  d = qg.shape[-1]
  d_probs = jnp.einsum("bkgsd,bktd->bkgst", d_out, v, preferred_element_type=jnp.float32)
  d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  d_scores = jnp.where(mask, d_scores, 0.0) * d**-0.5  # masked scores are constants (NEG_INF)
  dq = jnp.einsum("bkgst,bktd->bkgsd", d_scores.astype(k.dtype), k).astype(qg.dtype)
  # dK = dSᵀ·Q and dV = Pᵀ·dO contract over the (G, S) query rows of both operands. The barrier
  # keeps XLA:CPU from fusing the transpose this needs into the elementwise producers of dS and P
  # (a strided loop: 29 ms a layer at config S, L = 512, against ~3 ms for the separate copy).
  d_scores, probs = jax.lax.optimization_barrier((d_scores, probs))
  rows = lambda x: x.reshape(b, hkv, g * s, x.shape[-1])  # noqa: E731
  dims = (((2,), (2,)), ((0, 1), (0, 1)))
  dk = jax.lax.dot_general(rows(d_scores.astype(qg.dtype)), rows(qg), dims).astype(k.dtype)
  dv = jax.lax.dot_general(rows(probs.astype(v.dtype)), rows(d_out), dims).astype(v.dtype)
  return dq, dk, dv, None


@jax.custom_vjp
def grouped_attention(qg, k, v, mask):
  """Masked softmax attention in grouped layout: qg [B, Hkv, G, S, D], k/v [B, Hkv, T, D], mask
  broadcastable to [B, Hkv, G, S, T] → [B, Hkv, G, S, D]. Float32 softmax; the backward is written
  out (the same values as autodiff, a faster XLA:CPU program; tests/models/test_gradients.py)."""
  return _grouped_attention_fwd(qg, k, v, mask)[0]


grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def xla_attention(q, k, v, mask):
  b, s, hq, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  m = mask.reshape(b, hkv, g, s, -1) if mask.shape[1] != 1 else mask[:, :, None]
  if s == 1:
    # Decode: both products as fused multiply-reduces, not dots. XLA:CPU runs the [G, D] x [D, T]
    # and [G, T] x [T, D] batched dots as B·Hkv tiny matmuls. At B = 32, T = 256 the output dot
    # took 1.2 ms a layer against 0.19 ms for the reduce, and the scores as a reduce took a decode
    # step at config S from 30.2 to 27.2 ms. One query per row is bound by reading the cache.
    qd = q.reshape(b, hkv, g, 1, d).astype(jnp.float32)
    scores = jnp.sum(qd * k[:, :, None].astype(jnp.float32), axis=-1) * d**-0.5  # [B, Hkv, G, T]
    probs = jax.nn.softmax(jnp.where(m[:, :, :, 0], scores, NEG_INF), axis=-1).astype(v.dtype)
    out = jnp.sum(probs[..., None] * v[:, :, None], axis=-2)  # [B, Hkv, G, D]
    return out.reshape(b, 1, hq, d)
  # [B, Hkv, G, S, D]: both attention matmuls are then plain batched matmuls over (B, Hkv) with
  # no transposed [S, T] operand; the einsum "bskgd,bktd->bkgst" form made XLA:CPU transpose the
  # [B, Hkv, G, S, T] probabilities for the P @ V matmul (33 ms a layer at config S, L = 512)
  # where this transposes only the [S, D]-sized output.
  qg = q.reshape(b, s, hkv, g, d).transpose(0, 2, 3, 1, 4)
  out = grouped_attention(qg, k, v, m)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, hq, d)


def _jax_dpa(implementation):
  def fn(q, k, v, mask):
    hq = q.shape[2]
    if mask.shape[1] not in (1, hq):
      raise ValueError(f"mask head dim {mask.shape[1]} must be 1 or {hq}")
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # → [B, T, Hkv, D] as jax.nn expects
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation).astype(q.dtype)

  return fn


register("xla", xla_attention)
register("dot_product", _jax_dpa("xla"))
register("cudnn", _jax_dpa("cudnn"))
