"""DPO + λ·SFT cold-start loss (SPECS stage 2) on per-sequence log-probs.

Axes: B preference pairs.

The loss is LLaMA-Factory's `CustomDPOTrainer` with `pref_loss: sigmoid` and `pref_ftx = λ`
(RECIPE.md §3, PEERS.md §3.2), which is what Metis-SPECS ran:

  Δ_i      = (π(y_w) − π_ref(y_w)) − (π(y_l) − π_ref(y_l))            summed completion log-probs
  dpo_i    = −(1 − ls)·log σ(β·Δ_i) − ls·log σ(−β·Δ_i)                 (ls = cDPO label smoothing)
  sft_i    = −π(y_w) / |y_w|                                         per-sequence length-normalised
  loss     = mean_i (dpo_i + λ·sft_i)

The SFT term is normalised *per sequence* and then averaged over pairs. TRL's `rpo_alpha` (and
`loss_type=[..., "sft"]`) instead pools a token-mean over all chosen tokens of the micro-batch,
which weights long chosen answers more; the two agree only when all chosen lengths are equal.
`sft_weight=0` is pure DPO.

Log-probs come in, never the model: the step function runs the policy (and reads the stored
reference log-probs) and calls this with [B] arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dpo_sft_loss", "dpo_sft_loss_terms", "LOSS_TYPES"]

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_sft_loss_terms(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    *,
    beta: float = 0.1,
    sft_weight: float = 1.0,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    rejected_lengths: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair DPO+SFT loss and per-pair metrics, each multiplied by the pair's weight.

  Use this for exact gradient accumulation: over any split of the batch into micro-batches,
  `Σ per_pair_loss / Σ weights` equals the full-batch `dpo_sft_loss`, and likewise for every
  metric. Padded pairs (weight 0) contribute exactly 0 to every sum.

  Args:
    policy_chosen_logps: [B] float, Σ_t log π_θ(y_w,t | ·) over the chosen completion (summed).
    policy_rejected_logps: [B] float, same for the rejected completion.
    ref_chosen_logps: [B] float, the frozen reference model's summed log-probs of y_w.
    ref_rejected_logps: [B] float, same for y_l.
    chosen_lengths: [B] number of completion tokens of y_w (the SFT term's denominator; a
      length of 0 is treated as 1, so a padded pair never produces NaN).
    beta: β of DPO (LLaMA-Factory `pref_beta`, default 0.1).
    sft_weight: λ (LLaMA-Factory `pref_ftx`); 0 gives pure DPO.
    label_smoothing: cDPO ε ∈ [0, 0.5): the probability that a preference label is flipped.
      Only used with `loss_type="sigmoid"`.
    loss_type: "sigmoid" (DPO) or "ipo": ((Δ̄ − 1/(2β))², where Δ̄ is built from *length-averaged*
      log-probs as TRL and LLaMA-Factory do for IPO. "ipo" needs `rejected_lengths`; the summed
      log-probs passed in are divided by the lengths here (policy and reference alike), and
      logps/* metrics are then the averaged values.
    rejected_lengths: [B] number of completion tokens of y_l; required for "ipo".
    weights: [B] 0/1 (or any non-negative) pair weights; None means all ones.

  Returns:
    per_pair_loss: [B] float32, weight_i · (dpo_i + λ·sft_i).
    metrics: dict of [B] float32 arrays, each multiplied by the weight:
      rewards/chosen = β·(π(y_w) − π_ref(y_w)), rewards/rejected = β·(π(y_l) − π_ref(y_l)),
      rewards/margins = their difference, rewards/accuracies = 1[chosen reward > rejected reward],
      logps/chosen, logps/rejected (the policy log-probs), loss/dpo, loss/sft (sft_i before λ),
      and weight (the weights themselves, i.e. the denominator).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps))
  len_c = jnp.maximum(f32(chosen_lengths), 1.0)
  w = jnp.ones_like(pc) if weights is None else f32(weights)

  if loss_type == "ipo":
    if rejected_lengths is None:
      raise ValueError('loss_type="ipo" needs rejected_lengths (IPO uses length-averaged log-probs)')
    len_r = jnp.maximum(f32(rejected_lengths), 1.0)
    pc, rc, pr, rr = pc / len_c, rc / len_c, pr / len_r, rr / len_r

  chosen_logratio = pc - rc                                       # log π(y_w)/π_ref(y_w)
  rejected_logratio = pr - rr
  delta = chosen_logratio - rejected_logratio                     # [B]
  if loss_type == "sigmoid":
    # log_sigmoid, not log(sigmoid(.)): stays finite for margins of hundreds of nats.
    dpo = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
           - label_smoothing * jax.nn.log_sigmoid(-beta * delta))
  else:
    dpo = (delta - 1.0 / (2.0 * beta)) ** 2
  # For "ipo", pc is already the per-token mean (LLaMA-Factory passes chosen_logps as the avg).
  sft = -pc if loss_type == "ipo" else -pc / len_c

  per_pair = dpo + sft_weight * sft
  r_c, r_r = beta * chosen_logratio, beta * rejected_logratio
  metrics = {
      "rewards/chosen": r_c,
      "rewards/rejected": r_r,
      "rewards/margins": r_c - r_r,
      "rewards/accuracies": (r_c > r_r).astype(jnp.float32),
      "logps/chosen": pc,
      "logps/rejected": pr,
      "loss/dpo": dpo,
      "loss/sft": sft,
  }
  metrics = {k: v * w for k, v in metrics.items()} | {"weight": w}
  return per_pair * w, metrics


def dpo_sft_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    beta: float = 0.1,
    sft_weight: float = 1.0,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    *,
    rejected_lengths: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over pairs of DPO + λ·(length-normalised chosen NLL); see the module docstring.

  Args: as `dpo_sft_loss_terms` (all log-probs are [B], summed over completion tokens).

  Returns:
    loss: scalar float32, Σ_i w_i·(dpo_i + λ·sft_i) / Σ_i w_i (0 if every weight is 0).
    metrics: dict of scalar float32 weighted means (rewards/chosen, rewards/rejected,
      rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, loss/dpo, loss/sft)
      plus "loss".
  """
  per_pair, sums = dpo_sft_loss_terms(
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
      chosen_lengths, beta=beta, sft_weight=sft_weight, label_smoothing=label_smoothing,
      loss_type=loss_type, rejected_lengths=rejected_lengths, weights=weights)
  denom = jnp.maximum(jnp.sum(sums.pop("weight")), 1e-8)
  loss = jnp.sum(per_pair) / denom
  metrics = {k: jnp.sum(v) / denom for k, v in sums.items()}
  return loss, metrics | {"loss": loss}
