"""The Qwen2.5-VL vision tower: patch embed → 2-D RoPE blocks (window / full attention) → merger.

Patches enter in the image processor's merge-unit order and stay in it (see rope.py): window and
full attention are segment masks, the merger reads 4 consecutive patches. Padding patches (from a
patch bucket) form their own segment and are dropped by the caller.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from specs_jax.models.qwen2_5_vl import attention
from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from specs_jax.models.qwen2_5_vl.layers import RMSNorm, dense, remat_policy
from specs_jax.models.qwen2_5_vl.rope import apply_rope, vision_cos_sin


class VisionAttention(nn.Module):
  config: Qwen2_5_VLConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    """x [S, Q, D] (S image slots of Q patches); cos/sin [S, Q, head_dim]; mask [S, Q, Q]."""
    v = self.config.vision
    s, q_len = x.shape[:2]
    qkv = dense(3 * v.hidden_size, True, "qkv", self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(s, q_len, 3, v.num_heads, v.head_dim)
    q, k, val = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [S, Q, H, D]
    # RoPE in float32 (HF apply_rotary_pos_emb_vision), back to the compute dtype.
    q = apply_rope(q.astype(jnp.float32), cos[:, :, None], sin[:, :, None]).astype(self.dtype)
    k = apply_rope(k.astype(jnp.float32), cos[:, :, None], sin[:, :, None]).astype(self.dtype)
    kt, vt = k.transpose(0, 2, 1, 3), val.transpose(0, 2, 1, 3)  # [S, H, Q, D]
    out = attention.get(self.config.attention_impl)(q, kt, vt, mask[:, None])
    return dense(v.hidden_size, True, "proj", self.dtype, self.param_dtype)(out.reshape(s, q_len, v.hidden_size))


class VisionMLP(nn.Module):
  hidden: int
  intermediate: int
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    gate = dense(self.intermediate, self.use_bias, "gate_proj", self.dtype, self.param_dtype)(x)
    up = dense(self.intermediate, self.use_bias, "up_proj", self.dtype, self.param_dtype)(x)
    return dense(self.hidden, self.use_bias, "down_proj", self.dtype, self.param_dtype)(jax.nn.silu(gate) * up)


class VisionBlock(nn.Module):
  config: Qwen2_5_VLConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    v = self.config.vision
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + VisionAttention(self.config, name="attn", **kw)(RMSNorm(v.rms_norm_eps, name="norm1", **kw)(x), cos, sin,
                                                            mask)
    x = x + VisionMLP(v.hidden_size, v.intermediate_size, True, name="mlp", **kw)(
        RMSNorm(v.rms_norm_eps, name="norm2", **kw)(x))
    return x


class PatchMerger(nn.Module):
  config: Qwen2_5_VLConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    v = self.config.vision
    unit = v.spatial_merge_size**2
    h = RMSNorm(1e-6, name="ln_q", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    h = h.reshape(-1, v.hidden_size * unit)
    h = dense(v.hidden_size * unit, True, "mlp_0", self.dtype, self.param_dtype)(h)
    h = jax.nn.gelu(h, approximate=False)  # exact erf GELU, as torch nn.GELU()
    return dense(v.out_hidden_size, True, "mlp_2", self.dtype, self.param_dtype)(h)


class PatchEmbed(nn.Module):
  hidden: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.hidden, use_bias=False, name="proj", dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.normal(0.02))(x.astype(self.dtype))


class VisionTransformer(nn.Module):
  """pixel_values [S*Q, C*T*p*p] + per-patch metadata [S, Q] → merged tokens [S*Q/m², out_hidden]
  (slot layout: see rope.VisionMeta)."""

  config: Qwen2_5_VLConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values, pos_h, pos_w, window_seg, full_seg):
    v = self.config.vision
    if pixel_values.shape[-1] != v.patch_dim:
      raise ValueError(f"pixel_values last dim {pixel_values.shape[-1]} != C*T*p*p = {v.patch_dim}")
    if pos_h.ndim == 1:  # flat metadata: one slot
      pos_h, pos_w, window_seg, full_seg = (a[None] for a in (pos_h, pos_w, window_seg, full_seg))
    s, q_len = pos_h.shape
    if q_len % (v.spatial_merge_size**2):
      raise ValueError(f"slot size {q_len} is not a multiple of {v.spatial_merge_size**2}")
    if pixel_values.shape[0] != s * q_len:
      raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, the metadata describes {s}x{q_len}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pixel_values = pixel_values.reshape(s, q_len, -1)
    # Conv3d with stride == kernel over pre-flattened patches is a matmul (C, T, ph, pw order).
    x = PatchEmbed(v.hidden_size, name="patch_embed", **kw)(pixel_values)
    cos, sin = vision_cos_sin(pos_h, pos_w, v.head_dim, v.rope_theta)  # [S, Q, head_dim]
    win_mask = window_seg[:, :, None] == window_seg[:, None, :]  # [S, Q, Q]
    full_mask = full_seg[:, :, None] == full_seg[:, None, :]
    block = VisionBlock
    if self.config.remat != "none":
      block = nn.remat(VisionBlock, policy=remat_policy(self.config.remat))
    for i in range(v.depth):
      mask = full_mask if i in v.fullatt_block_indexes else win_mask
      x = block(self.config, name=f"blocks_{i}", **kw)(x, cos, sin, mask)
    return PatchMerger(self.config, name="merger", **kw)(x.reshape(s * q_len, -1))
