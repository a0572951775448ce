"""pass@k, the generalisation factor and the rollout branching factor, on numbers a reader can check."""

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax import sampling
from specs_jax.eval import branching, metrics

# ------------------------------------------------------------------------------------------------ pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
  """Exact: the fraction of all k-subsets of n samples (the first c correct) with a correct one."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration_of_all_k_subsets():
  checked = 0
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = brute_force_pass_at_k(n, c, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
        checked += 1
  assert checked == sum(n * (n + 1) for n in range(1, 9))  # every (n, c, k) with 1 <= k <= n, 0 <= c <= n


def test_pass_at_k_by_hand_and_not_the_biased_estimator():
  # n=4, c=1, k=2: 3 of the 6 pairs contain the correct sample -> 1/2.
  # The biased 1 - (1 - c/n)^k would give 1 - (3/4)^2 = 0.4375.
  assert metrics.pass_at_k(4, 1, 2) == pytest.approx(0.5)
  assert metrics.pass_at_k(5, 0, 3) == 0.0
  assert metrics.pass_at_k(5, 3, 3) == 1.0            # n - c = 2 < k: every 3-subset has a correct one
  assert metrics.pass_at_k(7, 2, 1) == pytest.approx(2 / 7)   # pass@1 = c / n


def test_pass_at_k_is_stable_where_binomials_are_huge():
  # C(1000, 500) has 300 digits; the product form never builds it.
  n, c, k = 1000, 7, 500
  exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
  assert metrics.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("args", [(3, 4, 1), (3, 1, 4), (3, 1, 0), (0, 0, 1), (3, -1, 1), (3.0, 1, 1), (3, True, 1)])
def test_pass_at_k_rejects_inconsistent_counts(args):
  with pytest.raises(ValueError):
    metrics.pass_at_k(*args)


def test_mean_pass_at_k_matrix_and_ragged():
  correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  got = metrics.mean_pass_at_k(correct, [1, 2, 4])
  # problem 0: pass@1 1/4, pass@2 1/2, pass@4 1; problem 1: 1, 1, 1; problem 2: 0, 0, 0
  assert got == pytest.approx({1: (0.25 + 1) / 3, 2: (0.5 + 1) / 3, 4: 2 / 3})
  ragged = metrics.mean_pass_at_k([[True, False], [False, False, True]], [1, 2])
  assert ragged[1] == pytest.approx((1 / 2 + 1 / 3) / 2)
  assert ragged[2] == pytest.approx((1 + 2 / 3) / 2)     # 3 samples, 1 correct: 2 of the 3 pairs
  with pytest.raises(ValueError, match="problem 0 has 2 samples, fewer than k=3"):
    metrics.mean_pass_at_k([[True, False]], [3])
  assert metrics.default_ks(8) == [1, 2, 4, 8] and metrics.default_ks(6) == [1, 2, 4, 6]


# ------------------------------------------------------------------------------- generalisation factor


@pytest.mark.parametrize("id_pct, ood_pct, paper", [
    (98.5, 94.5, 95.3),   # step 25, DPO w. sft-loss (RECIPE.md §4)
    (98.0, 69.0, 73.3),   # step 25, SFT
    (97.0, 25.0, 29.4),   # step 5, SFT
])
def test_gf_on_the_papers_read_off_values(id_pct, ood_pct, paper):
  gf = metrics.generalization_factor(id_pct / 100, ood_pct / 100)
  assert round(100 * gf, 1) == paper


def test_gf_is_on_raw_rates_not_gains_over_step_0():
  # RECIPE.md §4: gains over step 0 (ID ≈ 25 %, OOD ≈ 0 %) would give 5*.735*.945/(4*.735+.945) ≈ 89.4 for
  # the first point, not the plotted 95; the raw rates give 95.3.
  assert round(100 * metrics.generalization_factor(0.735, 0.945), 1) == 89.4
  assert round(100 * metrics.generalization_factor(0.985, 0.945), 1) == 95.3


def test_gf_by_hand_and_edges():
  # β = 2 weighs OOD more: a low OOD rate costs more than an equally low ID rate.
  assert metrics.generalization_factor(0.5, 1.0) == pytest.approx(2.5 / 3)     # 5*.5*1 / (4*.5 + 1)
  assert metrics.generalization_factor(1.0, 0.5) == pytest.approx(2.5 / 4.5)   # 5*1*.5 / (4*1 + .5)
  assert metrics.generalization_factor(0.0, 0.0) == 0.0
  assert metrics.generalization_factor(0.0, 0.7) == 0.0 and metrics.generalization_factor(0.7, 0.0) == 0.0
  assert metrics.generalization_factor(0.6, 0.6) == pytest.approx(0.6)
  assert metrics.generalization_factor(0.8, 0.4, beta=1.0) == pytest.approx(2 * 0.8 * 0.4 / 1.2)  # F1 = harmonic mean
  with pytest.raises(ValueError, match="fraction, not a percentage"):
    metrics.generalization_factor(98.5, 94.5)


# ---------------------------------------------------------------------------- rollout branching factor


@pytest.mark.parametrize("probs, size", [
    ([1.0, 0.0, 0.0], 1),                      # one-hot
    ([0.96, 0.04], 1),                         # the top token alone reaches 0.95
    ([0.5, 0.3, 0.15, 0.05], 3),               # 0.5 + 0.3 + 0.15 = 0.95 exactly: reached at 3
    ([0.05, 0.15, 0.5, 0.3], 3),               # order does not matter
    ([0.6, 0.3, 0.1], 3),                      # 0.9 < 0.95: needs the third
    ([1 / 20] * 20, 19),                       # uniform: 19 * 0.05 = 0.95
    ([1 / 100] * 100, 95),
    ([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], 5),   # 0.96875 after 5; 0.9375 after 4
])
def test_nucleus_size_of_hand_made_distributions(probs, size):
  p = np.asarray(probs)
  assert metrics.nucleus_size(p) == size
  assert metrics.nucleus_size(p.astype(np.float32)) == size
  logits = np.log(np.maximum(p, 1e-30))
  assert int(branching.nucleus_sizes(jnp.asarray(logits, jnp.float32))) == size


def test_nucleus_size_top_p_one_counts_the_support():
  assert metrics.nucleus_size(np.array([0.7, 0.2, 0.1, 0.0, 0.0]), top_p=1.0) == 3
  assert metrics.nucleus_size(np.array([0.7, 0.2, 0.1]), top_p=0.5) == 1


def test_rbf_is_the_masked_mean_of_nucleus_sizes():
  probs = np.zeros((2, 3, 20))
  probs[0, 0, 0] = 1.0                         # size 1
  probs[0, 1, :4] = [0.5, 0.3, 0.15, 0.05]     # size 3
  probs[0, 2] = 1 / 20                         # size 19, but masked out (padding)
  probs[1, :] = 1 / 20                         # size 19 each
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  assert metrics.rollout_branching_factor(probs, mask, from_logits=False) == pytest.approx((1 + 3 + 19 * 3) / 5)
  assert metrics.rollout_branching_factor(probs, None, from_logits=False) == pytest.approx((1 + 3 + 19 * 4) / 6)
  logits = np.log(np.maximum(probs, 1e-30))
  assert metrics.rollout_branching_factor(logits, mask) == pytest.approx((1 + 3 + 19 * 3) / 5)
  with pytest.raises(ValueError, match="selects no response token"):
    metrics.rollout_branching_factor(logits, np.zeros((2, 3)))
  with pytest.raises(ValueError, match="sum to 1"):
    metrics.nucleus_size(np.array([0.5, 0.2]))


def test_nucleus_matches_the_sampler_top_p_and_temperature():
  # The set the sampler keeps (`process_logits` leaves it finite) is the nucleus, token for token.
  logits = jax.random.normal(jax.random.key(0), (64, 300)) * 3.0
  for temperature, top_p in ((1.0, 0.95), (0.7, 0.95), (1.0, 0.5)):
    kept = np.isfinite(np.asarray(sampling.process_logits(logits, temperature, 0, top_p))).sum(-1)
    np.testing.assert_array_equal(np.asarray(branching.nucleus_sizes(logits, top_p, temperature)), kept)
    np_sizes = metrics.nucleus_size(metrics.softmax(np.asarray(logits), temperature), top_p)
    np.testing.assert_array_equal(np_sizes, kept)
  # Sanity: the sizes vary across rows (a constant answer would pass the comparison trivially).
  assert len(set(kept.tolist())) > 5


def test_accuracy_by_category():
  records = [{"category": "geometry", "correct": [True, False]}, {"category": "geometry", "correct": [True, True]},
             {"category": None, "correct": False}, {"category": "algebra", "correct": True}]
  assert metrics.accuracy_by_category(records) == {
      "(none)": {"accuracy": 0.0, "n": 1}, "algebra": {"accuracy": 1.0, "n": 1},
      "geometry": {"accuracy": 0.75, "n": 2}}
