"""Small shared layers: RMSNorm as HF computes it, the dense layer, and the remat policy lookup."""

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


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` over x's last axis (x [..., K], w [K, N]) with a hand-written backward.

  The values are those of `lax.dot_general`; only the backward's program differs. Under plain
  autodiff XLA:CPU fused the transpose that the weight-gradient matmul needs (tokens are the
  contracting axis of both of its operands) into the elementwise fusion producing the incoming
  gradient, and that strided loop ran at ~0.3 GB/s: 1.2 s of a 3.3 s DPO step at benchmark
  config S was such copies. Written as `x2.T @ dy2` over [tokens, features] matrices, XLA keeps
  the transpose a separate, fast copy (DPO step 3.3 → 2.3 s; see benchmarks/RESULTS.md). The
  TPU/GPU programs were not compared (no accelerator here); the values are the same everywhere.
  """
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, w):
  return matmul(x, w), (x, w)


def _matmul_bwd(res, dy):
  x, w = res
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dw = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`nn.Dense`'s dot_general: `matmul` for the plain [..., K] x [K, N] case, lax otherwise."""
  (lc, rc), (lb, rb) = dimension_numbers
  if (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) == ((lhs.ndim - 1,), (0,), (), ()) and rhs.ndim == 2 \
      and precision is None and preferred_element_type is None:
    return matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def dense(features: int, use_bias: bool, name: str, dtype, param_dtype, init_std: float = 0.02):
  return nn.Dense(features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(init_std), dot_general=_dense_dot_general)
