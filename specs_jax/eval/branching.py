r"""Rollout branching factor (RBF) in JAX: nucleus sizes from logits, and RBF of sampled responses.

The definition is `metrics.nucleus_size` / `metrics.rollout_branching_factor` (numpy, the reference);
this module computes the same numbers on device, where a [B, N, V] float64 copy of a 152k vocabulary
would not fit on the host:

    out = sampling.generate(model, params, ids, mask, ..., temperature=1.0, rng=key)
    r = branching.rbf_from_model(model, params, ids, mask, out.tokens, out.lengths,
                                 pixel_values=pv, image_grid_thw=thw, top_p=0.95)
    r.rbf          # mean nucleus size over the response tokens
    r.total, r.count   # to pool several batches: sum(total) / sum(count)

Axes: B rollouts, P prompt tokens, N response tokens, V vocabulary, D hidden.
Precision: the softmax and the cumulative sum are float32. Sorted descending, the nucleus is reached
after the few large probabilities, so the sum up to it is accurate to ~1e-6; only a cumulative mass
within that of top_p can land on the other side than in the float64 reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.eval.metrics import NUCLEUS_TOL
from specs_jax.models.qwen2_5_vl.model import prepare_inputs
from specs_jax.processing import batching
from specs_jax.sampling.sampler import DEFAULT_PATCH_BUCKETS

__all__ = ["RBFResult", "nucleus_sizes", "rbf_from_model"]


def nucleus_sizes(logits: jax.Array, top_p: float | jax.Array = 0.95, temperature: float | jax.Array = 1.0,
                  tol: float = NUCLEUS_TOL) -> jax.Array:
  """Top-p nucleus size of softmax(logits / temperature) (same rule as `metrics.nucleus_size`).

  Args:
    logits: [..., V], any float dtype (computed in float32); -inf entries have probability 0.
    top_p: in (0, 1]; may be a traced scalar.
    temperature: > 0; may be a traced scalar.
  Returns:
    [...] int32 in [1, V].
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  p = -jnp.sort(-probs, axis=-1)                                          # [..., V] descending
  cum = jnp.cumsum(p, axis=-1)
  cum_before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
  return jnp.sum(cum_before < top_p - tol, axis=-1, dtype=jnp.int32)


class _Forward:
  """The jitted prompt+response forward of one model -> nucleus sizes at the response positions."""

  def __init__(self, model):
    self.model = model
    self.fn = jax.jit(self._impl)

  def _impl(self, params, input_ids, attention_mask, resp_mask, pixel_values, position_ids, vision, top_p,
            temperature):
    n = resp_mask.shape[1]
    p = input_ids.shape[1] - n
    hidden = self.model.apply({"params": params}, input_ids, attention_mask, pixel_values=pixel_values,
                              position_ids=position_ids, vision=vision, method="hidden_states")   # [B, P+N, D]
    # Only the N positions that predict response tokens go through the LM head: [B, N, V], not [B, P+N, V].
    logits = self.model.apply({"params": params}, hidden[:, p - 1:p - 1 + n], method="logits_from_hidden")
    return jnp.where(resp_mask, nucleus_sizes(logits, top_p, temperature), 0)                   # [B, N]


_FORWARDS: dict[int, _Forward] = {}


def _forward(model) -> _Forward:
  """One jitted forward per model object (as `sampling.get_sampler`), so repeated calls do not retrace."""
  hit = _FORWARDS.get(id(model))
  if hit is None or hit.model is not model:
    hit = _FORWARDS[id(model)] = _Forward(model)
  return hit


@dataclasses.dataclass(frozen=True)
class RBFResult:
  """rbf = total / count; per_token [B, N] int32 nucleus sizes (0 on padding)."""

  rbf: float
  total: float
  count: int
  per_token: np.ndarray


def rbf_from_model(model, params, input_ids, attention_mask, response_tokens, response_lengths, *,
                   pixel_values=None, image_grid_thw=None, top_p: float = 0.95, temperature: float = 1.0,
                   patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS) -> RBFResult:
  """RBF of sampled responses, from one full forward over prompt + response.

  Args:
    model, params: a `qwen2_5_vl` model and its params.
    input_ids: [B, P] int, the prompts as given to the sampler (left-padded).
    attention_mask: [B, P] int, 1 on real prompt tokens.
    response_tokens: [B, N] int, the sampled tokens (`SampleOutput.tokens` rows for these prompts;
      for a group of n samples per prompt, call once per sample index j with rows j::n).
    response_lengths: [B] int, generated tokens including EOS (`SampleOutput.lengths`).
    pixel_values, image_grid_thw: the prompts' images, as for `model.apply` ([Np, 1176], [n, 3]).
    top_p: nucleus mass.
    temperature: the distribution is softmax(logits / temperature), the one the tokens were drawn from
      before top-k/top-p truncation.
    patch_buckets: vision patches are zero-padded to one of these, so the jitted forward compiles once
      per (batch, length, patch bucket).
  Returns:
    RBFResult; the logit at position P-1+t is the distribution token t was drawn from, and a token
    counts when t < response_lengths[b].
  Raises:
    ValueError: shapes disagree, or no response token at all.
  """
  ids = np.asarray(input_ids)
  mask = np.asarray(attention_mask).astype(np.int32)
  toks = np.asarray(response_tokens).astype(ids.dtype)
  lengths = np.asarray(response_lengths)
  if ids.ndim != 2 or mask.shape != ids.shape or toks.ndim != 2 or toks.shape[0] != ids.shape[0] \
      or lengths.shape != (ids.shape[0],):
    raise ValueError(f"need input_ids/attention_mask [B, P], response_tokens [B, N], response_lengths [B]; got "
                     f"{ids.shape}, {mask.shape}, {toks.shape}, {lengths.shape}")
  n = toks.shape[1]
  resp_mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.int32)   # [B, N]
  if not resp_mask.any():
    raise ValueError("rbf_from_model: every response is empty")
  full_ids = np.concatenate([ids, toks], axis=1)                            # [B, P+N]
  full_mask = np.concatenate([mask, resp_mask], axis=1)
  pv = None
  if pixel_values is not None:
    pv_np = np.asarray(pixel_values, np.float32)
    pv, _, _ = batching.pad_patches(pv_np, image_grid_thw, batching.bucket_length(pv_np.shape[0], patch_buckets))
  prep = prepare_inputs(model.config, full_ids, full_mask, image_grid_thw if pv is not None else None,
                        num_patches=None if pv is None else pv.shape[0])
  sizes = np.asarray(_forward(model).fn(params, full_ids, full_mask, jnp.asarray(resp_mask, bool), pv,
                                        prep.position_ids, prep.vision, jnp.float32(top_p),
                                        jnp.float32(temperature)))
  count = int(resp_mask.sum())
  total = float(sizes.sum())
  return RBFResult(rbf=total / count, total=total, count=count, per_token=sizes.astype(np.int32))
