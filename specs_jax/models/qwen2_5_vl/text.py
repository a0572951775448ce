"""The Qwen2.5-VL text decoder (Qwen2 layers with M-RoPE), with an optional KV cache.

Cache layout: {"k": [per-layer [B, Hkv, T, D] arrays], "v": same} (unscanned layers: each layer's
buffer is updated in place inside the decode loop), or stacked [layers, B, Hkv, T, D] arrays
when `scan_layers` (the scan needs a leading layer axis). Head-major, so that attention reads it
without a transpose. A call writes its S new keys/values at
slots [cache_index, cache_index + S) and lets query i (at slot cache_index + i) attend to slots
j <= cache_index + i with kv_mask[b, j] = 1. The same code path serves the full forward (no cache:
T = S, cache_index = 0), the prefill, and the one-token decode.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from specs_jax.models.qwen2_5_vl import attention
from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from specs_jax.models.qwen2_5_vl.layers import RMSNorm, dense, remat_policy
from specs_jax.models.qwen2_5_vl.rope import apply_rope, mrope_cos_sin


def init_cache(config: Qwen2_5_VLConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """Zeroed KV cache for `length` slots (layout in the module docstring)."""
  t = config.text
  shape = (batch, t.num_key_value_heads, length, t.head_dim)
  if config.scan_layers:
    stacked = (t.num_hidden_layers, *shape)
    return {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
  return {"k": [jnp.zeros(shape, dtype) for _ in range(t.num_hidden_layers)],
          "v": [jnp.zeros(shape, dtype) for _ in range(t.num_hidden_layers)]}


def repeat_cache(cache: dict, n: int) -> dict:
  """Repeats every sequence of a cache n times (rows i*n .. i*n+n-1 copy row i)."""
  return jax.tree.map(lambda c: jnp.repeat(c, n, axis=c.ndim - 4), cache)


class Attention(nn.Module):
  config: Qwen2_5_VLConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
    t = self.config.text
    b, s, _ = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(t.num_attention_heads * t.head_dim, True, "q_proj", **kw)(x).reshape(b, s, t.num_attention_heads, -1)
    k = dense(t.num_key_value_heads * t.head_dim, True, "k_proj", **kw)(x).reshape(b, s, t.num_key_value_heads, -1)
    v = dense(t.num_key_value_heads * t.head_dim, True, "v_proj", **kw)(x).reshape(b, s, t.num_key_value_heads, -1)
    q = apply_rope(q, cos[:, :, None], sin[:, :, None])
    k = apply_rope(k, cos[:, :, None], sin[:, :, None])
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # head-major [B, Hkv, S, D]
    if layer_cache is not None:  # this layer's (k, v) buffers [B, Hkv, T, D]
      ck, cv = layer_cache
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, cache_index, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, cache_index, 0))
      k_all, v_all, new_cache = ck.astype(self.dtype), cv.astype(self.dtype), (ck, cv)
    else:
      k_all, v_all, new_cache = k, v, None
    attend = attention.get(self.config.attention_impl)
    if isinstance(mask, PackedMask):
      out = _packed_attention(attend, q, k_all, v_all, mask)
    else:
      out = attend(q, k_all, v_all, mask)
    out = dense(t.hidden_size, False, "o_proj", **kw)(out.reshape(b, s, -1))
    return out, new_cache


@flax.struct.dataclass
class PackedMask:
  """The attention of rows packed as [prompt (P) | copy 1 (C) | ... | copy K (C)] (shared-prefix
  packing, `training.forward.pack_units`) in blocks: prompt queries against prompt keys [B, 1, P, P],
  and each copy's queries against [prompt keys | its own keys] [B·K, 1, C, P + C]. The same result
  as the dense branch mask (`causal_mask(..., branch_ids)`) without computing the blocks it masks
  whole: K·C·(P + C) + P² scores instead of (P + K·C)²."""

  prompt: jax.Array
  branch: jax.Array
  prompt_len: int = flax.struct.field(pytree_node=False)
  copies: int = flax.struct.field(pytree_node=False)

  @classmethod
  def build(cls, kv_mask, prompt_len: int, copies: int) -> "PackedMask":
    b, length = kv_mask.shape
    p, k = prompt_len, copies
    if p < 1 or (length - p) % k:
      raise ValueError(f"packed rows of length {length} do not split into a prompt of {p} and {k} equal copies")
    c = (length - p) // k
    kv_prompt = kv_mask[:, :p]
    kv_branch = jnp.concatenate([jnp.repeat(kv_prompt, k, axis=0), kv_mask[:, p:].reshape(b * k, c)], axis=1)
    allowed = (jnp.arange(p + c)[None, :] < p) | (jnp.arange(p + c)[None, :] - p <= jnp.arange(c)[:, None])
    return cls(prompt=causal_mask(kv_prompt, p, 0),
               branch=allowed[None, None] & (kv_branch[:, None, None, :] > 0),
               prompt_len=p, copies=k)


def _packed_attention(attend, q, k, v, mask: PackedMask):
  """q [B, P + K·C, Hq, D], k/v [B, Hkv, P + K·C, D] → [B, P + K·C, Hq, D] by `PackedMask` blocks."""
  b, s, hq, d = q.shape
  hkv = k.shape[1]
  p, n = mask.prompt_len, mask.copies
  c = (s - p) // n
  out_prompt = attend(q[:, :p], k[:, :, :p], v[:, :, :p], mask.prompt)

  def with_prompt(x):  # [B, Hkv, P + K·C, D] → [B·K, Hkv, P + C, D]: each copy's keys after the prompt's
    shared = jnp.broadcast_to(x[:, None, :, :p], (b, n, hkv, p, d))
    own = x[:, :, p:].reshape(b, hkv, n, c, d).transpose(0, 2, 1, 3, 4)
    return jnp.concatenate([shared, own], axis=3).reshape(b * n, hkv, p + c, d)

  out_branch = attend(q[:, p:].reshape(b * n, c, hq, d), with_prompt(k), with_prompt(v), mask.branch)
  return jnp.concatenate([out_prompt, out_branch.reshape(b, n * c, hq, d)], axis=1)


class MLP(nn.Module):
  config: Qwen2_5_VLConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    t = self.config.text
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(t.intermediate_size, False, "gate_proj", **kw)(x)
    up = dense(t.intermediate_size, False, "up_proj", **kw)(x)
    return dense(t.hidden_size, False, "down_proj", **kw)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  config: Qwen2_5_VLConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
    t = self.config.text
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, new_cache = Attention(self.config, name="self_attn", **kw)(
        RMSNorm(t.rms_norm_eps, name="input_layernorm", **kw)(x), cos, sin, mask, layer_cache, cache_index)
    x = x + h
    x = x + MLP(self.config, name="mlp", **kw)(RMSNorm(t.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
    return x, new_cache


class _ScanLayer(nn.Module):
  """DecoderLayer in nn.scan form: carry = hidden states, xs = this layer's cache slice (or a dummy)."""

  config: Qwen2_5_VLConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, xs, cos, sin, mask, cache_index):
    use_cache = xs[0].shape[2] > 0  # a size-0 slot axis is the "no cache" dummy
    layer = DecoderLayer
    if self.config.remat != "none":
      layer = nn.remat(DecoderLayer, policy=remat_policy(self.config.remat))
    lc = (xs[0], xs[1]) if use_cache else None
    x, new_cache = layer(self.config, name="layer", dtype=self.dtype, param_dtype=self.param_dtype)(
        x, cos, sin, mask, lc, cache_index)
    return x, (new_cache if use_cache else xs)


def causal_mask(kv_mask, q_len: int, cache_index, branch_ids=None):
  """[B, 1, S, T] bool: query i (slot cache_index + i) sees key slot j iff j <= slot and kv_mask[b, j].

  branch_ids [B, T] (full forward only, S = T): a row packing one shared prefix (branch 0) and
  several continuations of it (branches 1, 2, ...) one after another; query i then also needs
  branch[j] == 0 or branch[j] == branch[i], so each continuation sees the prefix and itself only.
  """
  t_len = kv_mask.shape[-1]
  q_slot = cache_index + jnp.arange(q_len)[:, None]
  allowed = (jnp.arange(t_len)[None, :] <= q_slot)[None, None]  # [1, 1, S, T]
  if branch_ids is not None:
    if q_len != t_len:
      raise ValueError(f"branch_ids need a full forward (queries {q_len} != keys {t_len})")
    bk = branch_ids[:, None, None, :]
    allowed = allowed & ((bk == 0) | (bk == branch_ids[:, None, :, None]))
  return allowed & (kv_mask[:, None, None, :] > 0)


class TextModel(nn.Module):
  """embeddings in → final-norm hidden states out; `embed_tokens` is exposed for the image scatter."""

  config: Qwen2_5_VLConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    t = self.config.text
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(t.vocab_size, t.hidden_size, name="embed_tokens",
                                 embedding_init=nn.initializers.normal(0.02), **kw)
    if self.config.scan_layers:
      self.layers = nn.scan(
          _ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=t.num_hidden_layers,
      )(self.config, name="layers", **kw)
    else:
      layer = DecoderLayer
      if self.config.remat != "none":
        layer = nn.remat(DecoderLayer, policy=remat_policy(self.config.remat))
      self.layer_list = [layer(self.config, name=f"layers_{i}", **kw) for i in range(t.num_hidden_layers)]
    self.norm = RMSNorm(t.rms_norm_eps, name="norm", **kw)

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def attend(self, hidden):
    """Tied-embedding logits: hidden @ embed_tokensᵀ."""
    return self.embed_tokens.attend(hidden)

  def __call__(self, inputs_embeds, position_ids, kv_mask, cache=None, cache_index=0, packing=None):
    """packing: (prompt_len, copies) for rows packed as [prompt | copy 1 | ... | copy K] (full
    forward only; attention by `PackedMask` blocks)."""
    t = self.config.text
    s = inputs_embeds.shape[1]
    cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, self.dtype)
    if packing is not None:
      if cache is not None:
        raise ValueError("packing (shared-prefix rows) is for the full forward, not with a KV cache")
      mask = PackedMask.build(kv_mask, *packing)
    else:
      mask = causal_mask(kv_mask, s, cache_index)
    x = inputs_embeds.astype(self.dtype)
    if self.config.scan_layers:
      if cache is None:
        # the scanned layer always carries a cache slice; without one it gets a size-0 dummy.
        dummy = jnp.zeros((t.num_hidden_layers, x.shape[0], t.num_key_value_heads, 0, t.head_dim), self.dtype)
        kv_in = (dummy, dummy)
      else:
        kv_in = (cache["k"], cache["v"])
      x, (nk, nv) = self.layers(x, kv_in, cos, sin, mask, cache_index)
      new_cache = None if cache is None else {"k": nk, "v": nv}
    else:
      nks, nvs = [], []
      for i, layer in enumerate(self.layer_list):
        lc = None if cache is None else (cache["k"][i], cache["v"][i])
        x, nc = layer(x, cos, sin, mask, lc, cache_index)
        if nc is not None:
          nks.append(nc[0])
          nvs.append(nc[1])
      new_cache = None if cache is None else {"k": nks, "v": nvs}
    return self.norm(x), new_cache
