"""Small shared layers: RMSNorm as HF computes it, and the remat policy lookup."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """`w * (x / rms(x))` with the normalisation in float32, cast back to x's dtype before the scale
  (HF `Qwen2_5_VLRMSNorm`)."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * xf.astype(x.dtype).astype(self.dtype)


def remat_policy(name: str):
  if name == "full":
    return None  # save nothing: recompute the whole block
  if name == "dots":
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  raise ValueError(f"unknown remat policy {name!r}")


def dense(features: int, use_bias: bool, name: str, dtype, param_dtype, init_std: float = 0.02):
  return nn.Dense(features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(init_std))
