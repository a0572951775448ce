r"""Evaluation metrics (RECIPE.md §4): pass@k, generalisation factor, rollout branching factor, accuracy.

Pure numpy, host side; nothing here imports JAX (the JAX/model form of the branching factor is in
`branching.py`). Rates are fractions in [0, 1] everywhere, as in summary.json.

- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. 2021 (Codex), from n >= k samples of
  which c are correct: 1 - C(n-c, k) / C(n, k), in the product form 1 - prod_{i=n-c+1}^{n} (1 - k/i),
  which never forms a binomial coefficient (C(200, 100) overflows float64's exact integers).
- `generalization_factor(id, ood, beta=2)`: Γ = (1+β²)·ID·OOD / (β²·ID + OOD), the F_β score with ID in
  the precision slot and OOD in the recall slot, so β = 2 weighs OOD more. Computed on the raw rates at
  a step (RECIPE.md §4 checks this against the paper's plot: ID 98.5 %, OOD 94.5 % gives 95.3).
- `nucleus_size(probs, top_p)`: the number of tokens in the smallest set, taken in order of decreasing
  probability, whose mass reaches top_p; the same set the sampler keeps (`sampling.process_logits`
  keeps token i iff the mass strictly above it is < top_p). Ties at the boundary count once each, in
  sort order, so a uniform distribution over 20 tokens has nucleus 19 at top_p = 0.95.
- `rollout_branching_factor`: the mean nucleus size over the response tokens of sampled rollouts
  (Deng et al. 2025, arXiv 2508.07534, as summarised in RECIPE.md §4). Higher = more exploration.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy_by_category", "default_ks", "generalization_factor", "mean_pass_at_k", "nucleus_size",
    "pass_at_k", "rollout_branching_factor", "softmax",
]

UNCATEGORISED = "(none)"

# Cumulative mass within this of top_p counts as reaching it: 0.5 + 0.3 + 0.15 is 0.9500000000000001 in
# float64 but 0.9499999 in float32, and either should give a nucleus of 3 at top_p = 0.95.
NUCLEUS_TOL = 1e-6


# ----------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: P(at least one of k draws without replacement is correct).

  Args:
    n: samples drawn for the problem (n >= 1).
    c: how many of them are correct (0 <= c <= n).
    k: the k of pass@k (1 <= k <= n).
  Returns:
    1 - C(n-c, k) / C(n, k) as a float in [0, 1]; exactly 1.0 when n - c < k (every k-subset contains a
    correct sample) and exactly 0.0 when c = 0.
  Raises:
    ValueError: the counts are inconsistent (c > n, k > n, negative values, non-integers).
  """
  for name, v in (("n", n), ("c", c), ("k", k)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"pass_at_k needs integer {name}, got {v!r}")
  n, c, k = int(n), int(c), int(k)
  if n < 1 or not 0 <= c <= n:
    raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 1 <= k <= n (an unbiased estimate needs at least k samples), got k={k}, n={n}")
  if n - c < k:
    return 1.0
  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): c factors, each in (0, 1).
  i = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / i))


def default_ks(n: int) -> list[int]:
  """The k values reported for n samples: powers of two up to n, and n itself (n=6 -> [1, 2, 4, 6])."""
  if n < 1:
    raise ValueError(f"need n >= 1 samples, got {n}")
  ks = [2**i for i in range(int(math.log2(n)) + 1)]
  return ks if ks[-1] == n else ks + [n]


def mean_pass_at_k(correct: np.ndarray | Sequence[Sequence[bool]], ks: Iterable[int]) -> dict[int, float]:
  """Mean pass@k over problems.

  Args:
    correct: [P, n] bool (or 0/1), sample j of problem i correct; or P sequences of possibly different
      lengths n_i (each must have n_i >= max(ks)).
    ks: the k values.
  Returns:
    {k: mean over the P problems of pass_at_k(n_i, c_i, k)}, in the order of `ks`.
  Raises:
    ValueError: no problems, or a problem with fewer samples than some k (names it).
  """
  rows = [np.asarray(r, dtype=bool).reshape(-1) for r in correct]
  if not rows:
    raise ValueError("mean_pass_at_k needs at least one problem")
  ks = [int(k) for k in ks]
  out = {}
  for k in ks:
    vals = []
    for i, r in enumerate(rows):
      if len(r) < k:
        raise ValueError(f"problem {i} has {len(r)} samples, fewer than k={k}")
      vals.append(pass_at_k(len(r), int(r.sum()), k))
    out[k] = float(np.mean(vals))
  return out


# ------------------------------------------------------------------------------- generalisation factor


def _check_rate(name: str, v: float) -> float:
  v = float(v)
  if not 0.0 <= v <= 1.0:
    raise ValueError(f"{name} must be a rate in [0, 1] (a fraction, not a percentage), got {v}")
  return v


def generalization_factor(id_rate: float, ood_rate: float, beta: float = 2.0) -> float:
  """Γ = (1+β²)·ID·OOD / (β²·ID + OOD) (RECIPE.md §4), 0 when both rates are 0.

  Args:
    id_rate: in-distribution format-following rate in [0, 1].
    ood_rate: out-of-distribution rate in [0, 1].
    beta: β > 0; β = 2 (the paper's) weighs OOD four times as much as ID.
  Returns:
    Γ in [0, 1]; Γ <= max(ID, OOD) and it is pulled towards OOD. Γ(0.985, 0.945) ≈ 0.953.
  """
  id_rate, ood_rate = _check_rate("id_rate", id_rate), _check_rate("ood_rate", ood_rate)
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  b2 = beta * beta
  den = b2 * id_rate + ood_rate
  return 0.0 if den == 0.0 else (1.0 + b2) * id_rate * ood_rate / den


# ---------------------------------------------------------------------------- rollout branching factor


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """softmax(logits / temperature) over the last axis, in float64; -inf logits get probability 0."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  x = np.asarray(logits, dtype=np.float64) / temperature
  x = x - np.max(x, axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def nucleus_size(probs: np.ndarray, top_p: float = 0.95, *, tol: float = NUCLEUS_TOL) -> np.ndarray:
  """Size of the top-p nucleus of each distribution (module docstring).

  Args:
    probs: [..., V] probabilities, each row summing to 1 (checked to 1e-3).
    top_p: in (0, 1].
    tol: cumulative mass within tol of top_p counts as reaching it.
  Returns:
    [...] int64, in [1, V]: #{i : mass of the tokens sorted before i < top_p - tol}.
  """
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  p = np.asarray(probs, dtype=np.float64)
  if p.ndim == 0 or p.shape[-1] == 0:
    raise ValueError(f"probs must have a non-empty last (vocabulary) axis, got shape {p.shape}")
  sums = p.sum(axis=-1)
  if np.any(p < 0) or not np.allclose(sums, 1.0, atol=1e-3):
    raise ValueError(f"probs must be non-negative and sum to 1 over the last axis (sums in "
                     f"[{sums.min():.4g}, {sums.max():.4g}]); pass logits with from_logits=True instead")
  p = -np.sort(-p, axis=-1)                                     # descending
  cum = np.cumsum(p, axis=-1)
  cum_before = np.concatenate([np.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)  # mass above each token
  return np.sum(cum_before < top_p - tol, axis=-1)


def rollout_branching_factor(values: np.ndarray, mask: np.ndarray | None = None, top_p: float = 0.95, *,
                             from_logits: bool = True, temperature: float = 1.0) -> float:
  """Mean top-p nucleus size over the response tokens (RBF).

  Args:
    values: [..., V]: the logits (from_logits=True) or probabilities of the distribution each response
      token was drawn from, e.g. [B, N, V] for B rollouts of N tokens.
    mask: [...] (e.g. [B, N]) 1/True on real response tokens (EOS included), 0 on padding; None = all.
    top_p: nucleus mass (0.95 in Deng et al.).
    from_logits: values are logits, turned into softmax(values / temperature).
    temperature: the sampling temperature the distribution is measured at (logits only).
  Returns:
    The mean nucleus size over the masked tokens, a float >= 1.
  Raises:
    ValueError: the mask selects no token, or its shape differs from values.shape[:-1].
  """
  v = np.asarray(values)
  probs = softmax(v, temperature) if from_logits else v
  sizes = nucleus_size(probs, top_p)
  m = np.ones(sizes.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  if m.shape != sizes.shape:
    raise ValueError(f"mask shape {m.shape} must equal values.shape[:-1] = {sizes.shape}")
  if not m.any():
    raise ValueError("rollout_branching_factor: the mask selects no response token")
  return float(sizes[m].mean())


# ------------------------------------------------------------------------------------------- accuracy


def _item_score(value: Any) -> float:
  """A record's correctness: a bool/number, or a list of per-sample values (their mean)."""
  if isinstance(value, (list, tuple, np.ndarray)):
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
      raise ValueError("a record has an empty list of per-sample results")
    return float(arr.mean())
  return float(value)


def accuracy_by_category(records: Iterable[Mapping[str, Any]], key: str = "correct",
                         category_key: str = "category") -> dict[str, dict[str, float]]:
  """Accuracy per category.

  Args:
    records: dicts with `key` (bool, 0/1, or a list of per-sample values, averaged first) and
      `category_key` (missing or None -> "(none)").
    key: which field to average ("correct", "format_ok", ...).
  Returns:
    {category: {"accuracy": mean over its records, "n": number of records}}, categories sorted.
  """
  groups: dict[str, list[float]] = collections.defaultdict(list)
  for r in records:
    cat = r.get(category_key)
    groups[UNCATEGORISED if cat is None or cat == "" else str(cat)].append(_item_score(r[key]))
  return {c: {"accuracy": float(np.mean(v)), "n": len(v)} for c, v in sorted(groups.items())}
