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


def xla_attention(q, k, v, mask):
  b, s, hq, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  # [B, Hkv, G, S, D]: both attention matmuls are then plain batched matmuls over (B, Hkv) with
  # no transposed [S, T] operand; the einsum "bskgd,bktd->bkgst" form made XLA:CPU transpose the
  # [B, Hkv, G, S, T] probabilities for the P @ V matmul (33 ms a layer at config S, L = 512)
  # where this transposes only the [S, D]-sized output.
  qg = q.reshape(b, s, hkv, g, d).transpose(0, 2, 3, 1, 4)
  scores = jnp.einsum("bkgsd,bktd->bkgst", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  m = mask.reshape(b, hkv, g, s, -1) if mask.shape[1] != 1 else mask[:, :, None]
  scores = jnp.where(m, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if s == 1:
    # Decode: XLA:CPU lowers this [G, T] x [T, D] batched dot to a slow generic loop (1.2 ms vs
    # 0.19 ms for the fused multiply-reduce at B=32, T=256); the reduce form is exact too.
    out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=-2)  # [B, Hkv, G, D]
    return out.reshape(b, 1, hq, d)
  out = jnp.einsum("bkgst,bktd->bkgsd", probs, v)
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
