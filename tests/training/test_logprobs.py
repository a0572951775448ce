"""Token log-probs: by hand, chunked == naive (values and gradients), and the memory it saves."""

import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.training import logprobs


def _naive(hidden, kernel, targets, temperature=1.0):
  logits = (hidden.astype(jnp.float32) @ kernel.astype(jnp.float32)) / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], ent


def test_from_logits_by_hand():
  logits = jnp.log(jnp.array([[[1.0, 1.0, 2.0]]]))        # softmax = [.25, .25, .5]
  t = jnp.array([[2]])
  # log .5 = -0.6931472
  np.testing.assert_allclose(logprobs.token_logprobs_from_logits(logits, t), [[-0.6931472]],
                             rtol=1e-6)
  # T = 2: probabilities ∝ [1, 1, √2] -> √2 / (2 + √2) = 0.4142136, log = -0.8813736
  # (forgetting the temperature gives -0.6931472)
  np.testing.assert_allclose(logprobs.token_logprobs_from_logits(logits, t, 2.0), [[-0.8813736]],
                             rtol=1e-6)
  # entropy at T=1: -(2·.25·ln .25 + .5·ln .5) = 1.0397208
  _, ent = logprobs.token_logprobs_from_logits(logits, t, compute_entropy=True)
  np.testing.assert_allclose(ent, [[1.0397208]], rtol=1e-6)
  # bf16 logits come back as float32
  assert logprobs.token_logprobs_from_logits(logits.astype(jnp.bfloat16), t).dtype == jnp.float32


def _inputs(b=2, l=37, d=16, v=50, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k1, (b, l, d), jnp.float32)
  kernel = jax.random.normal(k2, (d, v), jnp.float32) * 0.3
  targets = jax.random.randint(k3, (b, l), 0, v)
  return hidden, kernel, targets


def test_chunked_equals_naive_values_and_grads():
  hidden, kernel, targets = _inputs()          # L = 37 is not a multiple of the chunk (8)
  kw = dict(chunk_size=8, temperature=0.7)
  lp, ent = jax.jit(lambda h, k, t: logprobs.token_logprobs_from_hidden(
      h, k, t, compute_entropy=True, **kw))(hidden, kernel, targets)
  want_lp, want_ent = _naive(hidden, kernel, targets, 0.7)
  assert lp.shape == (2, 37) and lp.dtype == jnp.float32
  np.testing.assert_allclose(lp, want_lp, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, atol=1e-5)

  w = jax.random.normal(jax.random.key(1), targets.shape)      # arbitrary cotangent
  chunked = lambda h, k: jnp.sum(w * logprobs.token_logprobs_from_hidden(h, k, targets, **kw))
  naive = lambda h, k: jnp.sum(w * _naive(h, k, targets, 0.7)[0])
  g_h, g_k = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
  w_h, w_k = jax.jit(jax.grad(naive, argnums=(0, 1)))(hidden, kernel)
  np.testing.assert_allclose(g_h, w_h, atol=1e-5)
  np.testing.assert_allclose(g_k, w_k, atol=1e-5)
  # the simple path agrees too
  logits = hidden @ kernel
  np.testing.assert_allclose(logprobs.token_logprobs_from_logits(logits, targets, 0.7), want_lp,
                             atol=1e-5)


def test_entropy_gradient_equals_naive():
  # The chunk's backward is written by hand (`logprobs._chunk_logps`); check the entropy term too,
  # with a cotangent on both outputs.
  hidden, kernel, targets = _inputs(seed=3)
  w1, w2 = jax.random.normal(jax.random.key(4), (2, *targets.shape))

  def chunked(h, k):
    lp, ent = logprobs.token_logprobs_from_hidden(h, k, targets, chunk_size=8, temperature=0.7,
                                                  compute_entropy=True)
    return jnp.sum(w1 * lp + w2 * ent)

  def naive(h, k):
    lp, ent = _naive(h, k, targets, 0.7)
    return jnp.sum(w1 * lp + w2 * ent)

  got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
  want = jax.jit(jax.grad(naive, argnums=(0, 1)))(hidden, kernel)
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(w))) > 1e-2           # the entropy term contributes
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_bf16_gradients_match_autodiff():
  hidden, kernel, targets = _inputs(seed=5)
  hb, kb = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(6), targets.shape)

  def autodiff(h, k):                                  # the same math, differentiated by JAX
    logits = jnp.einsum("BLD,DV->BLV", h, k, preferred_element_type=jnp.float32) / 0.7
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return jnp.sum(w * lp)

  chunked = lambda h, k: jnp.sum(w * logprobs.token_logprobs_from_hidden(h, k, targets, chunk_size=8,
                                                                           temperature=0.7))
  got = jax.grad(chunked, argnums=(0, 1))(hb, kb)
  want = jax.grad(autodiff, argnums=(0, 1))(hb, kb)
  for g, ww in zip(got, want):
    assert g.dtype == jnp.bfloat16
    # both round float32 sums to bf16 once; allow one bf16 ulp (2^-8 relative) of the scale
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ww, np.float32),
                               atol=float(jnp.max(jnp.abs(ww.astype(jnp.float32)))) * 2 ** -7)


def test_kernel_gradient_is_not_a_transposed_product():
  # Autodiff writes the LM-head kernel's gradient as dot(dlogits, h) -> [V, D] plus a transpose;
  # XLA:CPU turns that into a transposed copy of dlogits ([V, B·C]) and a dot at under half the
  # matmul rate. The hand-written backward contracts h^T @ dlogits directly into [D, V].
  b, l, d, v, c = 2, 64, 16, 2048, 32
  hidden, kernel, targets = _inputs(b=b, l=l, d=d, v=v)
  loss = lambda h, k: jnp.sum(logprobs.token_logprobs_from_hidden(h, k, targets, chunk_size=c))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, kernel).compile().as_text()
  assert f"f32[{d},{v}]" in hlo                                   # the kernel gradient is there
  assert f"f32[{v},{b * c}]" not in hlo and f"f32[{v},{c},{b}]" not in hlo, "dlogits transposed"


def test_bf16_hidden_accumulates_in_float32():
  hidden, kernel, targets = _inputs(seed=2)
  hb, kb = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  lp = logprobs.token_logprobs_from_hidden(hb, kb, targets, chunk_size=16)
  assert lp.dtype == jnp.float32
  # products of bf16 numbers are exact in float32, so this matches float32 math on the same inputs
  np.testing.assert_allclose(lp, _naive(hb, kb, targets)[0], atol=1e-4)


def test_ignore_label_targets_stay_finite():
  hidden, kernel, targets = _inputs(l=8)
  targets = targets.at[:, -3:].set(-100)                 # HF-style ignore label on padding
  lp = logprobs.token_logprobs_from_hidden(hidden, kernel, targets, chunk_size=4)
  assert np.all(np.isfinite(lp))
  mask = (targets >= 0).astype(jnp.float32)
  assert np.isfinite(float(jnp.sum(lp * mask)))


def test_sequence_logps():
  lp = jnp.array([[-1.0, -2.0, -5.0], [-3.0, -7.0, -7.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  s, n = logprobs.sequence_logps(lp, mask)
  np.testing.assert_allclose(s, [-3.0, -3.0])        # summed, not averaged (-1.5, -3.0)
  np.testing.assert_allclose(n, [2.0, 1.0])


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_temp_memory_is_much_smaller_than_full_logits():
  b, l, d, v, c = 2, 256, 16, 32768, 16
  hidden = jax.ShapeDtypeStruct((b, l, d), jnp.float32)
  kernel = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, l), jnp.int32)
  full_logits = b * l * v * 4                                    # 64 MiB

  fwd = lambda h, k, t: logprobs.token_logprobs_from_hidden(h, k, t, chunk_size=c)
  bwd = jax.grad(lambda h, k, t: jnp.sum(fwd(h, k, t)), argnums=(0, 1))
  naive_bwd = jax.grad(lambda h, k, t: jnp.sum(_naive(h, k, t)[0]), argnums=(0, 1))

  fwd_bytes = _temp_bytes(fwd, hidden, kernel, targets)
  bwd_bytes = _temp_bytes(bwd, hidden, kernel, targets)
  naive_bytes = _temp_bytes(naive_bwd, hidden, kernel, targets)
  # The measurement can fail: the naive gradient keeps at least the full [B, L, V] float32 logits.
  assert naive_bytes >= full_logits, naive_bytes
  # One chunk's logits are b·c·v·4 = 4 MiB; forward and backward stay within a few of those.
  assert fwd_bytes < full_logits / 4, (fwd_bytes, full_logits)
  assert bwd_bytes < full_logits / 4, (bwd_bytes, full_logits)
