"""GRPO loss math by hand: advantages, clipping, every aggregation mode, KL estimators, filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax.training import grpo

# ------------------------------------------------------------------------------------ advantages


def test_group_advantages_by_hand():
  adv = grpo.group_advantages(jnp.array([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4)
  # group 1: mean .25, std(ddof=1) = sqrt(.75/3) = .5 -> [1.5, -.5, -.5, -.5]
  #          (ddof=0 would give std .433 and 1.732 for the first sample)
  # group 2: all equal -> zeros, not NaN
  np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], atol=1e-5)


def test_group_advantages_constant_groups_are_exactly_zero():
  # 0.1 is not representable: mean(0.1 × 3) may differ from 0.1 by an ulp; the result must still be 0
  adv = grpo.group_advantages(jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7]), group_size=3, eps=0.0)
  assert np.all(np.asarray(adv) == 0.0)
  # G = 1: ddof=1 std is undefined; every singleton group is "constant" -> 0
  assert np.all(np.asarray(grpo.group_advantages(jnp.array([1.0, 0.0]), group_size=1)) == 0.0)


def test_dr_grpo_and_batch_std_advantages_by_hand():
  r = jnp.array([1.0, 0, 0, 0, 1, 1, 1, 0])
  # Dr.GRPO: r - mean_g, no std: group 1 mean .25, group 2 mean .75
  np.testing.assert_allclose(grpo.group_advantages(r, 4, scale_std=False),
                             [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75], atol=1e-6)
  # batch std: 4 ones in 8 -> mean .5, std(ddof=1) = sqrt(8·.25/7) = 0.5345225
  # group-centred values divided by it: 0.75/0.5345225 = 1.4031242, 0.25/0.5345225 = 0.4677081
  np.testing.assert_allclose(
      grpo.batch_std_advantages(r, 4, eps=0.0),
      np.array([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]) / 0.5345225, rtol=1e-6)
  assert np.all(np.asarray(grpo.batch_std_advantages(jnp.ones(8), 4)) == 0.0)


def test_online_filter_and_zero_variance_fraction():
  acc = jnp.array([0, 0, 0, 0,  1, 0, 0, 0,  1, 1, 0, 0,  1, 1, 1, 1], jnp.float32)
  # group means 0, .25, .5, 1 ; keep those in [.25, .75] (inclusive)
  np.testing.assert_array_equal(grpo.online_filter_mask(acc, 4, 0.25, 0.75),
                                [False, True, True, False])
  # MM-EUREKA bounds [0.1, 0.9] with G=10: 1 of 10 correct has mean 0.1 (rounded in float32)
  # and must be kept, 0 of 10 dropped
  acc10 = jnp.concatenate([jnp.eye(10)[0], jnp.zeros(10)])
  np.testing.assert_array_equal(grpo.online_filter_mask(acc10, 10, 0.1, 0.9), [True, False])
  # zero-variance groups: first and last -> 2/4
  np.testing.assert_allclose(grpo.zero_variance_fraction(acc, 4), 0.5)


# ------------------------------------------------------------------------------- the policy loss

# Two sequences, L = 3. Row 0: A=+1, ratios (1, 1.5, 0.5). Row 1: A=-1, ratios (1.1, 0.5, 2.0),
# and its last token is padding.
LOG_RATIO = jnp.log(jnp.array([[1.0, 1.5, 0.5], [1.1, 0.5, 2.0]]))
OLD = jnp.full((2, 3), -2.0)
LOGPS = OLD + LOG_RATIO
ADV = jnp.array([1.0, -1.0])
MASK = jnp.array([[1, 1, 1], [1, 1, 0]])
# Per-token pg = max(-Aρ, -A·clip(ρ, 0.8, 1.28)):
#   row 0 (A=+1): ρ=1 -> -1 ; ρ=1.5 -> max(-1.5, -1.28) = -1.28 (clipped high) ; ρ=.5 -> -0.5
#   row 1 (A=-1): ρ=1.1 -> 1.1 ; ρ=.5 -> max(.5, .8) = 0.8 (clipped low) ; [pad: ρ=2 -> 2]
# Σ over real tokens = -1 - 1.28 - 0.5 + 1.1 + 0.8 = -0.88 ; row sums -2.78 and 1.9


@pytest.mark.parametrize("agg,want,wrong", [
    # -0.88 / 5 tokens. (Counting the padded token: (-0.88 + 2) / 6 = 0.1867.)
    ("token-mean", -0.176, 0.18667),
    # mean(-2.78/3, 1.9/2) = mean(-0.926667, 0.95) = 0.0116667. (token-mean gives -0.176.)
    ("seq-mean-token-mean", 0.0116667, -0.176),
    # mean(-2.78, 1.9) = -0.44
    ("seq-mean-token-sum", -0.44, -0.176),
    # verl/tunix Dr.GRPO: Σ / L = -0.88 / 3 = -0.293333, *not* divided by B
    # (TRL dr_grpo divides by B·L: -0.146667)
    ("seq-mean-token-sum-norm", -0.2933333, -0.146667),
])
def test_policy_loss_aggregation_by_hand(agg, want, wrong):
  loss, m = grpo.policy_loss(LOGPS, OLD, ADV, MASK, eps_low=0.2, eps_high=0.28, agg=agg)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert abs(float(loss) - wrong) > 1e-2
  np.testing.assert_allclose(m["loss/pg"], want, rtol=1e-5)
  np.testing.assert_allclose(m["loss/kl"], 0.0)
  # one of five tokens clipped high, one clipped low
  np.testing.assert_allclose([m["clip_frac/high"], m["clip_frac/low"], m["clip_frac"]],
                             [0.2, 0.2, 0.4], rtol=1e-6)
  # ppo_kl = mean(logπ_old - logπ) = -(0 + ln1.5 + ln.5 + ln1.1 + ln.5)/5 = 0.1771038
  np.testing.assert_allclose(m["ppo_kl"], 0.1771038, rtol=1e-5)
  np.testing.assert_allclose([m["tokens"], m["sequences"]], [5.0, 2.0])


def test_symmetric_clip_differs():
  # eps_high = 0.2: the ρ=1.5 token gives -1.2 instead of -1.28 -> token-mean -0.8/5 = -0.16
  loss, _ = grpo.policy_loss(LOGPS, OLD, ADV, MASK, eps_low=0.2, eps_high=0.2)
  np.testing.assert_allclose(loss, -0.16, rtol=1e-5)


def test_dual_clip_by_hand():
  # A = -1, ratios 4 and 2. Standard clip: max(ρ, clip(ρ)) = 4 and 2 -> token-mean 3.
  # Dual clip c=3 bounds the A<0 loss at -A·c = 3: min(4, 3) = 3 and 2 -> 2.5.
  lp = jnp.log(jnp.array([[4.0, 2.0]]))
  old = jnp.zeros((1, 2))
  loss, _ = grpo.policy_loss(lp, old, jnp.array([-1.0]), jnp.ones((1, 2)))
  np.testing.assert_allclose(loss, 3.0, rtol=1e-6)
  loss, m = grpo.policy_loss(lp, old, jnp.array([-1.0]), jnp.ones((1, 2)), dual_clip_c=3.0)
  np.testing.assert_allclose(loss, 2.5, rtol=1e-6)
  np.testing.assert_allclose(m["clip_frac/dual"], 0.5)
  # For A>0 the dual clip does nothing: ρ=4 -> -A·1.28
  loss, _ = grpo.policy_loss(lp[:, :1], old[:, :1], jnp.array([1.0]), jnp.ones((1, 1)),
                             dual_clip_c=3.0)
  np.testing.assert_allclose(loss, -1.28, rtol=1e-6)


def test_on_policy_gradient_is_advantage_weighted():
  # old = stopgrad(logπ): ρ = 1 in value (loss = -mean A), but dρ/dlogπ = 1, so
  # dL/dlogπ_{i,t} = -A_i / Σm for token-mean: row 0 -> -1/5, row 1 -> +1/5, padding -> 0.
  def f(lp):
    return grpo.policy_loss(lp, jax.lax.stop_gradient(lp), ADV, MASK)[0]
  np.testing.assert_allclose(f(LOGPS), (-3 + 2) / 5, rtol=1e-6)   # (-1·3 + 1·2) / 5
  np.testing.assert_allclose(jax.grad(f)(LOGPS), [[-0.2, -0.2, -0.2], [0.2, 0.2, 0.0]], atol=1e-7)


def test_kl_estimators_by_hand():
  lp, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])
  # δ = ref - lp = -1
  np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k1"), [[1.0]])              # lp - ref
  np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k3"), [[0.3678794]], rtol=1e-6)  # e^-1 + 1 - 1
  np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "low_var_kl"), [[0.3678794]], rtol=1e-6)
  np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "mse"), [[0.5]])              # ½·1²
  # k1 is negative when the policy is below the reference; k3 never is
  assert float(grpo.kl_penalty(ref, lp, "k1")[0, 0]) == -1.0
  # δ = 30: k3 = e^30 - 31 ≈ 1.07e13; low_var_kl clamps to 10
  far = jnp.array([[-30.0]])
  assert float(grpo.kl_penalty(far, jnp.zeros((1, 1)), "k3")[0, 0]) > 1e12
  np.testing.assert_allclose(grpo.kl_penalty(far, jnp.zeros((1, 1)), "low_var_kl"), [[10.0]])
  with pytest.raises(ValueError):
    grpo.kl_penalty(lp, ref, "k2")


def test_kl_term_in_loss():
  # ref = logπ - 1 on every token -> δ = -1, k3 = e^-1 = 0.3678794, k1 = 1 per token
  ref = LOGPS - 1.0
  base, _ = grpo.policy_loss(LOGPS, OLD, ADV, MASK)
  loss, m = grpo.policy_loss(LOGPS, OLD, ADV, MASK, ref_logps=ref, kl_coef=0.1)
  np.testing.assert_allclose(m["kl"], 0.3678794, rtol=1e-6)
  np.testing.assert_allclose(loss, base + 0.1 * 0.3678794, rtol=1e-5)   # -0.176 + 0.0367879
  loss_k1, _ = grpo.policy_loss(LOGPS, OLD, ADV, MASK, ref_logps=ref, kl_coef=0.1,
                                kl_estimator="k1")
  np.testing.assert_allclose(loss_k1, base + 0.1, rtol=1e-5)
  with pytest.raises(ValueError):
    grpo.policy_loss(LOGPS, OLD, ADV, MASK, kl_coef=0.1)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_terms_accumulate_exactly_over_micro_batches(agg):
  rng = np.random.default_rng(0)
  b, l = 8, 6
  lp = jnp.asarray(rng.normal(-2, 0.3, (b, l)), jnp.float32)
  old = lp + jnp.asarray(rng.normal(0, 0.2, (b, l)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=b), jnp.float32)
  lengths = np.array([6, 1, 3, 0, 5, 2, 6, 4])           # row 3 empty: must not count
  mask = jnp.asarray(np.arange(l)[None] < lengths[:, None], jnp.float32)
  ref = lp - jnp.asarray(rng.normal(0, 0.1, (b, l)), jnp.float32)
  kw = dict(agg=agg, kl_coef=0.05)
  full, full_m = grpo.policy_loss(lp, old, adv, mask, ref_logps=ref, **kw)
  g_full = jax.jit(jax.grad(lambda x: grpo.policy_loss(x, old, adv, mask, ref_logps=ref, **kw)[0]))(lp)
  num, den, sums, grads = 0.0, 0.0, None, []
  for k in range(4):
    sl = slice(2 * k, 2 * k + 2)
    terms = lambda x, sl=sl: grpo.policy_loss_terms(x, old[sl], adv[sl], mask[sl],
                                                    ref_logps=ref[sl], **kw)
    n, d, s = jax.jit(terms)(lp[sl])
    grads.append(jax.jit(jax.grad(lambda x, terms=terms: terms(x)[0]))(lp[sl]))
    num, den = num + n, den + d
    sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
  np.testing.assert_allclose(num / den, full, rtol=1e-6)
  np.testing.assert_allclose(jnp.concatenate(grads) / den, g_full, atol=1e-7)
  acc_m = grpo.finalize_metrics(sums)
  for k in ("loss/pg", "loss/kl", "clip_frac", "ppo_kl", "kl"):
    np.testing.assert_allclose(acc_m[k], full_m[k], rtol=1e-5, atol=1e-7)


def test_sum_norm_accumulates_like_verl():
  # seq-mean-token-sum-norm: each micro-batch's denominator is L, so k micro-batches give Σ/(k·L),
  # which is what verl's gradient accumulation (micro-batch loss · 1/k) computes.
  n0, d0, _ = grpo.policy_loss_terms(LOGPS[:1], OLD[:1], ADV[:1], MASK[:1], agg="seq-mean-token-sum-norm")
  n1, d1, _ = grpo.policy_loss_terms(LOGPS[1:], OLD[1:], ADV[1:], MASK[1:], agg="seq-mean-token-sum-norm")
  np.testing.assert_allclose((n0 + n1) / (d0 + d1), -0.88 / 6, rtol=1e-5)
  np.testing.assert_allclose([d0, d1], [3.0, 3.0])
