"""Masked NLL: token-mean vs sequence-mean by hand, exact accumulation, empty masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax.training import sft

# Row 0 has 3 supervised tokens with NLL 1, 2, 3; row 1 has one token with NLL 4; row 2 none.
LOGPS = jnp.array([[-1.0, -2.0, -3.0, -9.0],
                   [-4.0, -9.0, -9.0, -9.0],
                   [-9.0, -9.0, -9.0, -9.0]])
MASK = jnp.array([[1, 1, 1, 0],
                  [1, 0, 0, 0],
                  [0, 0, 0, 0]])


def test_token_mean_by_hand():
  total, denom = sft.token_mean_nll_terms(LOGPS, MASK)
  # (1 + 2 + 3 + 4) / 4 = 2.5   (the masked -9s must not count: including them gives 91/12)
  np.testing.assert_allclose([total, denom], [10.0, 4.0])
  loss, m = sft.sft_loss(LOGPS, MASK, "token-mean")
  np.testing.assert_allclose(loss, 2.5)
  np.testing.assert_allclose([m["tokens"], m["sequences"]], [4.0, 2.0])


def test_seq_mean_by_hand():
  total, denom = sft.seq_mean_nll_terms(LOGPS, MASK)
  # row 0: 6/3 = 2, row 1: 4/1 = 4, row 2 has no token and is not counted -> (2 + 4) / 2 = 3
  # (token-mean gives 2.5; counting the empty row gives 6/3 = 2)
  np.testing.assert_allclose([total, denom], [6.0, 2.0])
  loss, _ = sft.sft_loss(LOGPS, MASK, "seq-mean")
  np.testing.assert_allclose(loss, 3.0)


def test_empty_mask_is_zero_not_nan():
  for mode in sft.MODES:
    loss, _ = sft.sft_loss(LOGPS, jnp.zeros_like(MASK), mode)
    assert loss == 0.0
    g = jax.grad(lambda lp, mode=mode: sft.sft_loss(lp, jnp.zeros_like(MASK), mode)[0])(LOGPS)
    assert np.all(g == 0.0)
  with pytest.raises(ValueError):
    sft.nll_terms(LOGPS, MASK, "sum")


@pytest.mark.parametrize("mode", sft.MODES)
def test_accumulation_is_exact(mode):
  # One row per micro-batch: Σ sums / Σ denominators equals the full batch, whereas the mean of
  # per-micro-batch means does not (token-mean: mean(2, 4) = 3 != 2.5).
  full, _ = sft.sft_loss(LOGPS, MASK, mode)
  terms = [sft.nll_terms(LOGPS[i:i + 1], MASK[i:i + 1], mode) for i in range(3)]
  acc = sum(t[0] for t in terms) / sum(t[1] for t in terms)
  np.testing.assert_allclose(acc, full, rtol=1e-7)
  # gradients too: d(Σ sums)/dlogps / Σ denominators == d(full)/dlogps
  g_full = jax.grad(lambda lp: sft.sft_loss(lp, MASK, mode)[0])(LOGPS)
  den = sum(t[1] for t in terms)
  g_acc = jnp.concatenate([
      jax.grad(lambda lp, i=i: sft.nll_terms(lp, MASK[i:i + 1], mode)[0])(LOGPS[i:i + 1])
      for i in range(3)]) / den
  np.testing.assert_allclose(g_acc, g_full, atol=1e-7)
  if mode == "token-mean":
    # d loss / d logp = -1/4 on every supervised token
    np.testing.assert_allclose(g_full[0, :3], [-0.25] * 3)
  else:
    # row 0: -1/(3·2) per token, row 1: -1/(1·2)
    np.testing.assert_allclose(g_full[0, :3], [-1 / 6] * 3, rtol=1e-6)
    np.testing.assert_allclose(g_full[1, 0], -0.5)
