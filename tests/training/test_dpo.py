"""DPO + λ·SFT loss: hand-computed values and a numpy re-implementation of LLaMA-Factory's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax.training import dpo

# Two pairs, summed completion log-probs.
#   pair 1: π(y_w)=-10, π(y_l)=-20, ref(y_w)=-12, ref(y_l)=-15, |y_w|=5
#   pair 2: π(y_w)=-30, π(y_l)=-10, ref(y_w)=-28, ref(y_l)=-12, |y_w|=10
PC = jnp.array([-10.0, -30.0])
PR = jnp.array([-20.0, -10.0])
RC = jnp.array([-12.0, -28.0])
RR = jnp.array([-15.0, -12.0])
LEN = jnp.array([5.0, 10.0])


def test_dpo_sft_by_hand():
  loss, m = dpo.dpo_sft_loss(PC, PR, RC, RR, LEN, beta=0.1, sft_weight=1.0)
  # pair 1: chosen log-ratio -10-(-12)=2, rejected -20-(-15)=-5, Δ=7, βΔ=0.7
  #         dpo = -log σ(0.7) = log(1+e^-0.7) = 0.4031860
  #         sft = -(-10)/5 = 2                       (length-normalised chosen NLL)
  # pair 2: chosen -30-(-28)=-2, rejected -10-(-12)=2, Δ=-4, βΔ=-0.4
  #         dpo = log(1+e^0.4) = 0.9130153,  sft = 30/10 = 3
  # loss = mean(0.4031860+2, 0.9130153+3) = 3.1581007
  # (TRL rpo_alpha's pooled token-mean SFT would give 0.6581007 + 40/15 = 3.3247673;
  #  an un-normalised summed NLL would give 0.6581007 + 20 = 20.6581007.)
  np.testing.assert_allclose(loss, 3.1581007, rtol=1e-6)
  np.testing.assert_allclose(m["loss/dpo"], 0.6581007, rtol=1e-6)
  np.testing.assert_allclose(m["loss/sft"], 2.5, rtol=1e-6)
  # rewards = β·(π - ref): chosen (0.2, -0.2) -> mean 0; rejected (-0.5, 0.2) -> mean -0.15
  np.testing.assert_allclose(m["rewards/chosen"], 0.0, atol=1e-7)
  np.testing.assert_allclose(m["rewards/rejected"], -0.15, rtol=1e-6)
  np.testing.assert_allclose(m["rewards/margins"], 0.15, rtol=1e-6)        # (0.7 + -0.4) / 2
  np.testing.assert_allclose(m["rewards/accuracies"], 0.5)                  # pair 1 right, pair 2 wrong
  np.testing.assert_allclose(m["logps/chosen"], -20.0)
  np.testing.assert_allclose(m["logps/rejected"], -15.0)
  np.testing.assert_allclose(m["loss"], loss)


def test_sft_weight_zero_is_pure_dpo():
  loss, m = dpo.dpo_sft_loss(PC, PR, RC, RR, LEN, beta=0.1, sft_weight=0.0)
  np.testing.assert_allclose(loss, 0.6581007, rtol=1e-6)  # (0.4031860 + 0.9130153) / 2
  np.testing.assert_allclose(m["loss/sft"], 2.5, rtol=1e-6)  # still logged, not added
  # λ = 0.5 adds half of the SFT term: 0.6581007 + 0.5 * 2.5
  loss_half, _ = dpo.dpo_sft_loss(PC, PR, RC, RR, LEN, beta=0.1, sft_weight=0.5)
  np.testing.assert_allclose(loss_half, 1.9081007, rtol=1e-6)


def test_gradient_by_hand():
  grad = jax.grad(lambda pc: dpo.dpo_sft_loss(pc, PR, RC, RR, LEN, beta=0.1, sft_weight=1.0)[0])(PC)
  # d/dπ(y_w,1) of mean_i(...) = [-β(1-σ(0.7)) - 1/|y_w,1|] / B = (-0.1*0.3318122 - 0.2) / 2
  np.testing.assert_allclose(grad[0], -0.1165906, rtol=1e-6)


def test_label_smoothing_and_ipo_by_hand():
  # cDPO, ε=0.1, pair 1 only: 0.9·log(1+e^-0.7) + 0.1·log(1+e^0.7) = 0.9·0.4031860 + 0.1·1.1031860
  loss, _ = dpo.dpo_sft_loss(PC[:1], PR[:1], RC[:1], RR[:1], LEN[:1], beta=0.1, sft_weight=0.0,
                             label_smoothing=0.1)
  np.testing.assert_allclose(loss, 0.4731860, rtol=1e-6)
  # IPO on length-averaged log-probs, |y_w|=5, |y_l|=4:
  # chosen (-10/5) - (-12/5) = 0.4, rejected (-20/4) - (-15/4) = -1.25, Δ = 1.65
  # (Δ - 1/(2β))² = (1.65 - 5)² = 11.2225; sft = -(-10/5) = 2
  loss, m = dpo.dpo_sft_loss(PC[:1], PR[:1], RC[:1], RR[:1], LEN[:1], beta=0.1, sft_weight=1.0,
                             loss_type="ipo", rejected_lengths=jnp.array([4.0]))
  np.testing.assert_allclose(m["loss/dpo"], 11.2225, rtol=1e-6)
  np.testing.assert_allclose(loss, 13.2225, rtol=1e-6)
  with pytest.raises(ValueError):
    dpo.dpo_sft_loss(PC, PR, RC, RR, LEN, loss_type="ipo")
  with pytest.raises(ValueError):
    dpo.dpo_sft_loss(PC, PR, RC, RR, LEN, loss_type="hinge")


def _llamafactory_numpy(pc, pr, rc, rr, lens, beta, ftx, ls):
  """A direct transcription of LLaMA-Factory CustomDPOTrainer (sigmoid) + pref_ftx, in numpy.

  policy_chosen_logps_avg = chosen_logps / chosen_length; sft_loss = -policy_chosen_logps_avg;
  logits = (pc - pr) - (rc - rr);
  losses = -logsigmoid(β·logits)·(1-ls) - logsigmoid(-β·logits)·ls;  losses += ftx·sft_loss;
  loss = losses.mean()
  """
  logsig = lambda x: -np.logaddexp(0.0, -x)
  logits = (pc - pr) - (rc - rr)
  losses = -logsig(beta * logits) * (1 - ls) - logsig(-beta * logits) * ls
  losses = losses + ftx * (-(pc / lens))
  return losses.mean()


@pytest.mark.parametrize("beta,ftx,ls", [(0.1, 1.0, 0.0), (0.5, 0.5, 0.0), (0.05, 2.0, 0.2)])
def test_matches_llamafactory_numpy(beta, ftx, ls):
  rng = np.random.default_rng(0)
  b = 16
  lens = rng.integers(1, 200, b).astype(np.float64)
  pc, pr = -rng.uniform(1, 300, b), -rng.uniform(1, 300, b)
  rc, rr = pc + rng.normal(0, 5, b), pr + rng.normal(0, 5, b)
  want = _llamafactory_numpy(pc, pr, rc, rr, lens, beta, ftx, ls)
  got, _ = dpo.dpo_sft_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr, lens)),
                            beta=beta, sft_weight=ftx, label_smoothing=ls)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_terms_with_padding_accumulate_exactly():
  # Full batch of 2 real pairs vs two micro-batches of 2 where each holds one real pair and one
  # padded pair (weight 0, garbage log-probs, length 0): Σ per_pair / Σ weights must match.
  want, want_m = dpo.dpo_sft_loss(PC, PR, RC, RR, LEN)
  garbage = jnp.array([-1e4])
  total, wsum, msum = 0.0, 0.0, {}
  for i in range(2):
    cat = lambda x, g=garbage: jnp.concatenate([x[i:i + 1], g])
    per_pair, m = dpo.dpo_sft_loss_terms(cat(PC), cat(PR), cat(RC, jnp.array([0.0])), cat(RR),
                                         cat(LEN, jnp.array([0.0])), weights=jnp.array([1.0, 0.0]))
    assert np.all(np.isfinite(per_pair)) and per_pair[1] == 0.0
    total, wsum = total + per_pair.sum(), wsum + m["weight"].sum()
    msum = {k: msum.get(k, 0.0) + v.sum() for k, v in m.items()}
  np.testing.assert_allclose(total / wsum, want, rtol=1e-6)
  for k in ("rewards/margins", "rewards/accuracies", "loss/sft"):
    np.testing.assert_allclose(msum[k] / wsum, want_m[k], rtol=1e-6, atol=1e-7)


def test_large_margins_stay_finite():
  # βΔ = ±1000: log(sigmoid(.)) would underflow to log(0) = -inf; log_sigmoid does not.
  loss, _ = dpo.dpo_sft_loss(jnp.array([0.0, -1e4]), jnp.array([-1e4, 0.0]), jnp.zeros(2),
                             jnp.zeros(2), jnp.ones(2), beta=0.1, sft_weight=0.0)
  # pair 1: -log σ(1000) ≈ 0; pair 2: -log σ(-1000) = 1000 -> mean 500
  np.testing.assert_allclose(loss, 500.0, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_values_and_finite_difference_gradient(beta, lam):
  """Loss by hand for λ ∈ {0, .5, 1}, β ∈ {.1, .5}; the gradient equals central differences."""
  pc, pr = np.array([-10.0, -20.0]), np.array([-12.0, -19.0])
  rc, rr = np.array([-11.0, -19.5]), np.array([-11.5, -19.2])
  n = np.array([5.0, 8.0])
  # by hand: margin_i = β((pc−rc) − (pr−rr)); loss = mean_i[−log σ(margin_i) + λ·(−pc_i/n_i)]
  margin = beta * ((pc - rc) - (pr - rr))
  want = np.mean(np.log1p(np.exp(-margin)) + lam * (-pc / n))
  f = lambda x: dpo.dpo_sft_loss(x, jnp.asarray(pr), jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(n),
                                 beta=beta, sft_weight=lam)[0]
  np.testing.assert_allclose(f(jnp.asarray(pc)), want, rtol=1e-6)
  g = np.asarray(jax.grad(f)(jnp.asarray(pc)))
  h = 0.05  # float32: a smaller step is dominated by rounding (~1e-6·|loss|/h)
  fd = [(float(f(jnp.asarray(pc + h * e))) - float(f(jnp.asarray(pc - h * e)))) / (2 * h) for e in np.eye(2)]
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=2e-4)
