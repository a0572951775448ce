"""Masked negative log-likelihood (SFT) in two normalisations, as (sum, denominator) pairs.

Axes: B sequences, L tokens.

- "token-mean": Σ_{b,t} m·(−logp) / Σ_{b,t} m. Every supervised token weighs the same, so long
  answers dominate (HF Trainer / LLaMA-Factory SFT default: cross-entropy over all label tokens).
- "seq-mean":   (1/#seqs) Σ_b [Σ_t m·(−logp) / Σ_t m]. Every sequence weighs the same (the
  normalisation of LLaMA-Factory's `pref_ftx` SFT term inside DPO). Sequences with no supervised
  token are skipped and not counted.

Returning (sum, denominator) rather than the ratio makes gradient accumulation exact: the loss of
the whole batch is Σ sums / Σ denominators over any split into micro-batches (a mean of
micro-batch means is not, unless every micro-batch has the same denominator).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["nll_terms", "token_mean_nll_terms", "seq_mean_nll_terms", "sft_loss", "MODES"]

MODES = ("token-mean", "seq-mean")


def token_mean_nll_terms(logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Token-mean NLL as (Σ_{b,t} m·(−logp), Σ_{b,t} m).

  Args:
    logps: [B, L] float, log-prob of each target token.
    mask: [B, L] bool/0-1 (or float weights), 1 on supervised tokens.

  Returns:
    (nll_sum, token_count), both scalar float32.
  """
  m = mask.astype(jnp.float32)
  return -jnp.sum(logps.astype(jnp.float32) * m), jnp.sum(m)


def seq_mean_nll_terms(logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sequence-mean of per-sequence token-mean NLL as (Σ_b nll_b, #sequences with a token).

  Args:
    logps: [B, L] float.
    mask: [B, L] bool/0-1, 1 on supervised tokens.

  Returns:
    (Σ_b [Σ_t m·(−logp) / Σ_t m], Σ_b 1[Σ_t m > 0]), both scalar float32. Rows without any
    supervised token contribute 0 to both.
  """
  m = mask.astype(jnp.float32)
  lengths = jnp.sum(m, axis=-1)                                           # [B]
  per_seq = -jnp.sum(logps.astype(jnp.float32) * m, axis=-1) / jnp.maximum(lengths, 1.0)
  valid = (lengths > 0).astype(jnp.float32)
  return jnp.sum(per_seq * valid), jnp.sum(valid)


def nll_terms(logps: jax.Array, mask: jax.Array, mode: str = "token-mean") -> tuple[jax.Array, jax.Array]:
  """(sum, denominator) of the NLL for `mode` in MODES; see the module docstring."""
  if mode == "token-mean":
    return token_mean_nll_terms(logps, mask)
  if mode == "seq-mean":
    return seq_mean_nll_terms(logps, mask)
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def sft_loss(
    logps: jax.Array, mask: jax.Array, mode: str = "token-mean"
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked NLL of a single (micro-)batch.

  Args:
    logps: [B, L] float, log-prob of each target token.
    mask: [B, L] bool/0-1, 1 on supervised tokens.
    mode: "token-mean" or "seq-mean".

  Returns:
    loss: scalar float32 = sum / denominator (0 for an all-masked batch, never NaN).
    metrics: {"loss/sft": loss, "tokens": Σ mask, "sequences": #rows with a supervised token}.
  """
  total, denom = nll_terms(logps, mask, mode)
  loss = total / jnp.where(denom > 0, denom, 1.0)
  m = mask.astype(jnp.float32)
  return loss, {"loss/sft": loss, "tokens": jnp.sum(m),
                "sequences": jnp.sum((jnp.sum(m, -1) > 0).astype(jnp.float32))}
