"""GRPO loss math: group advantages, the clipped per-token objective, aggregation, online filter.

Axes: P prompts, G samples per prompt (N = P·G, the G samples of a prompt are contiguous),
B sequences in a (micro-)batch, L completion tokens.

Per-token objective (PEERS.md §3.3; verl `compute_policy_loss_vanilla`, TRL, tunix):

  ρ_{i,t}  = exp(clip(logπ_θ − logπ_old, −20, 20))
  pg_{i,t} = max(−A_i·ρ, −A_i·clip(ρ, 1−ε_low, 1+ε_high))            (DAPO clip-higher: ε_high > ε_low)
           → min(pg, −A_i·c) where A_i < 0, if dual clip c is set
  ℓ_{i,t}  = pg_{i,t} + β·KL_{i,t}(π_θ ‖ π_ref)
  L        = AGG(ℓ, mask)

There is no sampling loop here; `old_logps` come from the training forward before the update
(DESIGN.md), so at the first minibatch ρ = 1 in value but not in gradient and the logged loss is ≈ 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "group_advantages",
    "batch_std_advantages",
    "online_filter_mask",
    "zero_variance_fraction",
    "kl_penalty",
    "aggregate_terms",
    "aggregate",
    "policy_loss_terms",
    "policy_loss",
    "finalize_metrics",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3", "low_var_kl", "mse")

# Log-ratio clamp before exp, as verl / EasyR1 / tunix (keeps ρ finite for stale old log-probs).
_LOG_RATIO_CLIP = 20.0


# ----------------------------------------------------------------------------------- advantages

def _grouped(x: jax.Array, group_size: int) -> jax.Array:
  if x.ndim != 1 or x.shape[0] % group_size:
    raise ValueError(f"expected [P*G] with G={group_size}, got shape {x.shape}")
  return x.astype(jnp.float32).reshape(-1, group_size)                      # [P, G]


def group_advantages(
    rewards: jax.Array, group_size: int, eps: float = 1e-6, scale_std: bool = True
) -> jax.Array:
  """GRPO advantages, normalised within each prompt's group.

  Args:
    rewards: [N] float, N = P·G; the G samples of one prompt are contiguous.
    group_size: G.
    eps: added to the std (verl and tunix 1e-6; TRL 1e-4; MM-EUREKA 1e-9).
    scale_std: divide by std_g + eps (GRPO). False gives Dr.GRPO's r − mean_g.

  Returns:
    [N] float32, (r − mean_g) / (std_g + eps) with std_g using ddof=1 (Bessel, as torch.std).
    Groups whose rewards are all equal (including G = 1) get exactly 0, never NaN.
  """
  r = _grouped(rewards, group_size)
  centred = r - r.mean(axis=-1, keepdims=True)
  constant = jnp.all(r == r[:, :1], axis=-1, keepdims=True)               # [P, 1]
  if scale_std:
    std = r.std(axis=-1, ddof=1, keepdims=True) if group_size > 1 else jnp.zeros_like(centred)
    centred = centred / jnp.where(constant, 1.0, std + eps)
  return jnp.where(constant, 0.0, centred).reshape(-1)


def batch_std_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
  """(r − mean_g) / (std_batch + eps): group-centred, scaled by the std of the whole batch.

  TRL `scale_rewards="batch"`. std over all N rewards with ddof=1. A batch of equal rewards
  gives 0 everywhere.

  Args:
    rewards: [N] float, N = P·G, groups contiguous.
    group_size: G.

  Returns:
    [N] float32.
  """
  r = _grouped(rewards, group_size)
  centred = r - r.mean(axis=-1, keepdims=True)
  flat = r.reshape(-1)
  if flat.shape[0] < 2:
    return jnp.zeros_like(flat)
  constant = jnp.all(flat == flat[0])
  std = flat.std(ddof=1)
  return jnp.where(constant, 0.0, centred.reshape(-1) / jnp.where(constant, 1.0, std + eps))


def online_filter_mask(
    acc_rewards: jax.Array, group_size: int, lower: float = 0.1, upper: float = 0.9
) -> jax.Array:
  """Which prompt groups to keep: lower ≤ mean accuracy of the group ≤ upper (both inclusive).

  MM-EUREKA `--enable_accuracy_filter --accuracy_lower_bound 0.1 --accuracy_upper_bound 0.9`:
  drops prompts the policy always or never solves (their GRPO advantages are all 0 anyway).

  Args:
    acc_rewards: [N] float in [0, 1], the accuracy reward of each sample (groups contiguous).
    group_size: G.
    lower, upper: bounds on the group's mean accuracy.

  Returns:
    [P] bool, True = keep. Per-sample: `jnp.repeat(mask, group_size)`.
  """
  mean = _grouped(acc_rewards, group_size).mean(axis=-1)
  # A small tolerance so that e.g. 1/10 = 0.1 is not lost to float rounding at the boundary.
  tol = 1e-6
  return (mean >= lower - tol) & (mean <= upper + tol)


def zero_variance_fraction(rewards: jax.Array, group_size: int) -> jax.Array:
  """Fraction of groups whose G rewards are all equal (they give no GRPO signal).

  Args:
    rewards: [N] float, N = P·G, groups contiguous.

  Returns:
    scalar float32 in [0, 1].
  """
  r = _grouped(rewards, group_size)
  return jnp.mean(jnp.all(r == r[:, :1], axis=-1).astype(jnp.float32))


# ---------------------------------------------------------------------------------- KL and AGG

def kl_penalty(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k3") -> jax.Array:
  """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's estimators).

  With δ = logπ_ref − logπ_θ:
    "k1":         −δ = logπ_θ − logπ_ref         (unbiased, can be negative; tunix default)
    "k3":         exp(δ) − δ − 1                 (unbiased, ≥ 0; TRL, EasyDeL)
    "low_var_kl": k3 with δ clamped to ±20 and the result clamped to [−10, 10] (verl, EasyR1)
    "mse":        ½(logπ_θ − logπ_ref)²          (k2)

  Args:
    logps, ref_logps: [B, L] float.

  Returns:
    [B, L] float32.
  """
  lp, ref = logps.astype(jnp.float32), ref_logps.astype(jnp.float32)
  delta = ref - lp
  if estimator == "k1":
    return -delta
  if estimator == "k3":
    return jnp.exp(delta) - delta - 1.0
  if estimator == "low_var_kl":
    d = jnp.clip(delta, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
  if estimator == "mse":
    return 0.5 * jnp.square(delta)
  raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def aggregate_terms(
    loss_mat: jax.Array, mask: jax.Array, agg: str = "token-mean", norm_length: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of the loss aggregation `agg`; the loss is numerator / denominator.

  With m the mask and ℓ the per-token loss:
    "token-mean":              (Σ_{i,t} ℓm,           Σ_{i,t} m)         DAPO, verl default, TRL "dapo"
    "seq-mean-token-mean":     (Σ_i Σ_t ℓm / Σ_t m,   #seqs with m)      GRPO paper, TRL "grpo", tunix
    "seq-mean-token-sum":      (Σ_i Σ_t ℓm,           #seqs with m)      verl
    "seq-mean-token-sum-norm": (Σ_{i,t} ℓm,           norm_length)       Dr.GRPO as verl and tunix
        implement it: the *sum over sequences* divided by a constant (default L = mask.shape[-1]),
        not divided by the number of sequences (TRL "dr_grpo" also divides by B).
  Sequences with no masked-in token are left out of the sequence counts (verl would give NaN).

  The numerators and the first three denominators add up over micro-batches, so
  Σ_k num_k / Σ_k den_k is exactly the full-batch value (the accumulation `state.accumulate_gradients`
  does). For "seq-mean-token-sum-norm" the denominators add up to k·norm_length over k
  micro-batches, i.e. Σ / (k·L): what verl's gradient accumulation (each micro-batch loss scaled by
  1/k) computes, not the single-batch Σ / L.

  Args:
    loss_mat: [B, L] float per-token loss.
    mask: [B, L] bool/0-1.
    agg: one of AGG_MODES.
    norm_length: the constant of "seq-mean-token-sum-norm"; ignored otherwise.

  Returns:
    (numerator, denominator), scalar float32 each.
  """
  m = mask.astype(jnp.float32)
  masked = loss_mat.astype(jnp.float32) * m
  lengths = jnp.sum(m, axis=-1)                                           # [B]
  n_seqs = jnp.sum((lengths > 0).astype(jnp.float32))
  if agg == "token-mean":
    return jnp.sum(masked), jnp.sum(m)
  if agg == "seq-mean-token-mean":
    return jnp.sum(jnp.sum(masked, axis=-1) / jnp.maximum(lengths, 1.0)), n_seqs
  if agg == "seq-mean-token-sum":
    return jnp.sum(masked), n_seqs
  if agg == "seq-mean-token-sum-norm":
    return jnp.sum(masked), jnp.float32(norm_length if norm_length is not None else mask.shape[-1])
  raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  return num / jnp.where(den > 0, den, 1.0)


def aggregate(loss_mat: jax.Array, mask: jax.Array, agg: str = "token-mean",
              norm_length: int | None = None) -> jax.Array:
  """Scalar loss = numerator / denominator of `aggregate_terms` (0 for an empty mask)."""
  return _safe_div(*aggregate_terms(loss_mat, mask, agg, norm_length))


# --------------------------------------------------------------------------------- policy loss

# Metrics averaged over tokens (denominator "tokens") vs over the aggregation (denominator "denom").
_TOKEN_METRICS = ("clip_frac", "clip_frac/low", "clip_frac/high", "clip_frac/dual", "ppo_kl", "kl",
                  "ratio/mean")
_AGG_METRICS = ("loss", "loss/pg", "loss/kl")


def policy_loss_terms(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "token-mean",
    ref_logps: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    dual_clip_c: float | None = None,
    norm_length: int | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Clipped GRPO/PPO objective as additive (numerator, denominator, metric sums).

  Args: as `policy_loss`.

  Returns:
    loss_sum: scalar float32, the aggregation numerator of ℓ = pg + kl_coef·KL (differentiable).
    denom: scalar float32, the aggregation denominator (no gradient); see `aggregate_terms`.
      For exact accumulation over micro-batches use Σ loss_sum / Σ denom; in "token-mean" mode,
      with the global token count T known in advance, each micro-batch may equally use
      loss_sum / T and the gradients simply add up.
    sums: dict of scalar float32 sums that add up over micro-batches:
      "loss", "loss/pg", "loss/kl" (numerators; divide by "denom"),
      "clip_frac", "clip_frac/low", "clip_frac/high", "clip_frac/dual", "ppo_kl", "kl",
      "ratio/mean" (token sums; divide by "tokens"), and "denom", "tokens", "sequences".
      `finalize_metrics` does the division.
  """
  if ref_logps is None and kl_coef != 0.0:
    raise ValueError("kl_coef != 0 needs ref_logps")
  if dual_clip_c is not None and dual_clip_c <= 1.0:
    raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
  f32 = lambda x: x.astype(jnp.float32)
  lp, old = f32(logps), f32(old_logps)
  m = f32(mask)
  adv = f32(advantages)
  if adv.ndim == 1:
    adv = adv[:, None]                                       # [B] -> [B, 1], same A on every token

  log_ratio = jnp.clip(lp - old, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP)
  ratio = jnp.exp(log_ratio)                                                # [B, L]
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(pg1, pg2)
  clipped = pg2 > pg1              # the clip is active: ρ>1+ε_high with A>0, or ρ<1−ε_low with A<0
  clip_high = clipped & (adv > 0)
  clip_low = clipped & (adv < 0)
  if dual_clip_c is not None:
    # Dual clip (Ye et al. 2020; verl clip_ratio_c): for A<0 the loss is bounded by −A·c, so a
    # huge ratio on a bad sample cannot blow up the update.
    pg3 = -adv * dual_clip_c
    dual = (adv < 0) & (pg > pg3)
    pg = jnp.where(adv < 0, jnp.minimum(pg, pg3), pg)
  else:
    dual = jnp.zeros_like(clipped)

  if ref_logps is not None:
    kl_mat = kl_penalty(lp, ref_logps, kl_estimator)
  else:
    kl_mat = jnp.zeros_like(pg)
  loss_mat = pg + kl_coef * kl_mat

  loss_sum, denom = aggregate_terms(loss_mat, m, agg, norm_length)
  pg_sum, _ = aggregate_terms(pg, m, agg, norm_length)
  kl_sum, _ = aggregate_terms(kl_mat, m, agg, norm_length)
  denom = jax.lax.stop_gradient(denom)

  sg = jax.lax.stop_gradient
  tok = lambda x: sg(jnp.sum(f32(x) * m))
  sums = {
      "loss": sg(loss_sum), "loss/pg": sg(pg_sum), "loss/kl": sg(kl_sum),
      "clip_frac": tok(clipped), "clip_frac/low": tok(clip_low), "clip_frac/high": tok(clip_high),
      "clip_frac/dual": tok(dual),
      "ppo_kl": tok(-log_ratio),                 # verl ppo_kl: mean of logπ_old − logπ_θ
      "kl": tok(kl_mat), "ratio/mean": tok(ratio),
      "denom": denom, "tokens": jnp.sum(m),
      "sequences": jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32)),
  }
  return loss_sum, denom, sums


def finalize_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Turn (possibly accumulated) `policy_loss_terms` sums into means; keeps the counts."""
  out = {k: _safe_div(sums[k], sums["denom"]) for k in _AGG_METRICS}
  out |= {k: _safe_div(sums[k], sums["tokens"]) for k in _TOKEN_METRICS}
  return out | {"tokens": sums["tokens"], "sequences": sums["sequences"]}


def policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "token-mean",
    ref_logps: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    dual_clip_c: float | None = None,
    norm_length: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped GRPO policy loss (+ optional KL penalty) of one batch; see the module docstring.

  Args:
    logps: [B, L] float, log π_θ of the sampled completion tokens (temperature-scaled).
    old_logps: [B, L] float, log π_old of the same tokens (no gradient is taken through them).
    advantages: [B] (per sequence) or [B, L] float.
    mask: [B, L] bool/0-1, 1 on completion tokens (0 on padding and after EOS).
    eps_low, eps_high: clip range [1−eps_low, 1+eps_high] (DAPO clip-higher 0.2 / 0.28).
    agg: one of AGG_MODES; the denominators are listed in `aggregate_terms`.
    ref_logps: [B, L] float, log π_ref for the KL term; required when kl_coef != 0.
    kl_coef: β of the KL penalty (SPECS: 0, no KL).
    kl_estimator: "k1", "k3" (default), "low_var_kl" or "mse"; see `kl_penalty`.
    dual_clip_c: if set (> 1, verl 3.0), the loss of A<0 tokens is at most −A·c.
    norm_length: constant for "seq-mean-token-sum-norm" (default L).

  Returns:
    loss: scalar float32, AGG(pg + kl_coef·KL).
    metrics: "loss", "loss/pg", "loss/kl" (each aggregated with `agg`, so loss = loss/pg +
      kl_coef·loss/kl); token means "clip_frac" (= low + high), "clip_frac/low" (A<0, ρ<1−ε_low),
      "clip_frac/high" (A>0, ρ>1+ε_high), "clip_frac/dual", "ppo_kl" (mean logπ_old − logπ_θ),
      "kl" (mean KL estimate vs the reference, 0 without ref_logps), "ratio/mean";
      counts "tokens", "sequences".
  """
  loss_sum, denom, sums = policy_loss_terms(
      logps, old_logps, advantages, mask, eps_low=eps_low, eps_high=eps_high, agg=agg,
      ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, dual_clip_c=dual_clip_c,
      norm_length=norm_length)
  return _safe_div(loss_sum, denom), finalize_metrics(sums)
