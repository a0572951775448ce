"""Optimizer, schedules, decay mask, freezing, train state and exact gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specs_jax.training import dpo, grpo, logprobs, state


def _params():
  return {
      "visual": {"blocks_0": {"attn": {"qkv": {"kernel": jnp.full((4, 6), 2.0),
                                               "bias": jnp.full((6,), 2.0)}},
                              "norm1": {"scale": jnp.full((4,), 2.0)}}},
      "visual_proj": {"kernel": jnp.full((2, 2), 2.0)},     # shares a prefix string, not a path
      "model": {"embed_tokens": {"embedding": jnp.full((8, 4), 2.0)},
                "layers_0": {"mlp": {"kernel": jnp.full((4, 4), 2.0), "bias": jnp.full((4,), 2.0)},
                             "input_layernorm": {"scale": jnp.full((4,), 2.0)}},
                "odd_vector": {"kernel": jnp.full((4,), 2.0)}},
      "lm_head": {"kernel": jnp.full((4, 8), 2.0)},
  }


# ------------------------------------------------------------------------------------ schedules


def test_cosine_schedule_values():
  cfg = state.OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=2, total_steps=10)
  lr = state.make_schedule(cfg)
  # warmup: 0, lr/2, then the peak at step W=2; cosine over T-W = 8 steps:
  # step 6 is half-way -> lr·½(1+cos(π/2)) = 5e-4; step 4 -> lr·½(1+cos(π/4)) = 8.535534e-4; step 10 -> 0
  np.testing.assert_allclose([lr(s) for s in (0, 1, 2, 4, 6, 10, 20)],
                             [0.0, 5e-4, 1e-3, 8.535534e-4, 5e-4, 0.0, 0.0], rtol=1e-5, atol=1e-10)
  # a floor: min_lr_ratio 0.1 -> half-way is 1e-4 + 9e-4·½ = 5.5e-4, the end 1e-4
  lr = state.make_schedule(state.OptimizerConfig(learning_rate=1e-3, warmup_steps=2, total_steps=10,
                                                 min_lr_ratio=0.1))
  np.testing.assert_allclose([lr(6), lr(10)], [5.5e-4, 1e-4], rtol=1e-5)


def test_warmup_ratio_rounds_up_and_constant_schedule():
  # ratio .25 of 10 steps = 2.5 -> ceil = 3 warmup steps (HF); int() or round() would give 2
  cfg = state.OptimizerConfig(learning_rate=0.3, schedule="constant", warmup_ratio=0.25,
                              total_steps=10)
  assert state.warmup_steps(cfg) == 3
  lr = state.make_schedule(cfg)
  np.testing.assert_allclose([lr(s) for s in (0, 1, 2, 3, 9, 100)],
                             [0.0, 0.1, 0.2, 0.3, 0.3, 0.3], rtol=1e-6)
  lr = state.make_schedule(state.OptimizerConfig(learning_rate=0.3, schedule="constant",
                                                 total_steps=10))
  assert float(lr(0)) == pytest.approx(0.3)                 # no warmup: full lr from the start
  # linear: warmup 2, then 0.4 -> 0 over 8 steps: step 6 -> 0.2
  lr = state.make_schedule(state.OptimizerConfig(learning_rate=0.4, schedule="linear",
                                                 warmup_steps=2, total_steps=10))
  np.testing.assert_allclose([lr(1), lr(2), lr(6), lr(10)], [0.2, 0.4, 0.2, 0.0], atol=1e-7)
  with pytest.raises(ValueError):
    state.make_schedule(state.OptimizerConfig(schedule="step"))
  with pytest.raises(ValueError):
    state.OptimizerConfig.from_mapping({"learning_rat": 1e-6})


# -------------------------------------------------------------------------- decay mask, freezing


def test_decay_mask():
  mask = state.decay_mask(_params())
  flat = {state.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["model/layers_0/mlp/kernel"] is True
  assert flat["model/embed_tokens/embedding"] is True     # embeddings are decayed (HF Trainer)
  assert flat["lm_head/kernel"] is True
  assert flat["model/layers_0/mlp/bias"] is False
  assert flat["model/layers_0/input_layernorm/scale"] is False
  assert flat["model/odd_vector/kernel"] is False         # 1-D, whatever its name


def test_weight_decay_skips_biases_and_norms():
  # Zero gradients, lr 0.1, wd 0.1, no warmup: Adam's part is 0/(0+eps) = 0, so the update is the
  # decoupled decay alone: p ← p - lr·wd·p = 2 - 0.1·0.1·2 = 1.98 on kernels; biases/scales stay 2
  # (decaying everything would give 1.98 there too).
  cfg = state.OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.1,
                              max_grad_norm=None, total_steps=10)
  params = _params()
  tx = state.make_optimizer(cfg, params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["model"]["layers_0"]["mlp"]["kernel"], 1.98, rtol=1e-6)
  np.testing.assert_allclose(new["model"]["embed_tokens"]["embedding"], 1.98, rtol=1e-6)
  np.testing.assert_allclose(new["model"]["layers_0"]["mlp"]["bias"], 2.0)
  np.testing.assert_allclose(new["model"]["layers_0"]["input_layernorm"]["scale"], 2.0)
  np.testing.assert_allclose(new["visual"]["blocks_0"]["attn"]["qkv"]["bias"], 2.0)


def test_freezing_by_prefix():
  params = _params()
  labels = state.freeze_labels(params, ["visual"])
  assert labels["visual"]["blocks_0"]["norm1"]["scale"] == "frozen"
  assert labels["visual_proj"]["kernel"] == "trainable"    # "visual" is a path component prefix
  cfg = state.OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.1,
                              total_steps=10, frozen_prefixes=("visual",))
  ts = state.create_train_state(params, state.make_optimizer(cfg, params), jax.random.key(0))
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda s, g: s.apply_gradients(g))
  for _ in range(3):
    ts = step(ts, grads)
  assert int(ts.step) == 3
  for a, b in zip(jax.tree.leaves(ts.params["visual"]), jax.tree.leaves(params["visual"])):
    np.testing.assert_array_equal(a, b)                  # bit-for-bit unchanged
  assert not np.allclose(ts.params["model"]["layers_0"]["mlp"]["kernel"], 2.0)
  assert not np.allclose(ts.params["visual_proj"]["kernel"], 2.0)
  # No Adam moments for frozen params: the optimizer state holds exactly 2 floats (mu, nu) per
  # trainable parameter, plus integer step counters.
  n_trainable = sum(x.size for k, v in params.items() if k != "visual" for x in jax.tree.leaves(v))
  float_state = sum(x.size for x in jax.tree.leaves(ts.opt_state)
                    if jnp.issubdtype(x.dtype, jnp.floating))
  assert float_state == 2 * n_trainable
  with pytest.raises(ValueError):
    state.make_optimizer(cfg)                              # labels need the params tree
  with pytest.raises(ValueError):
    state.make_optimizer(state.OptimizerConfig(frozen_prefixes=("vision",)), params)


def test_grad_clipping_ignores_frozen_grads():
  # Trainable grads have global norm 0.5 (< max_grad_norm 1): no clipping. A huge frozen grad
  # must not enter the norm, else every trainable grad would be scaled down ~1000x.
  # After one step Adam's first moment is mu = (1 - b1)·g = 0.1·g.
  params = {"visual": {"kernel": jnp.zeros((2, 2))}, "model": {"kernel": jnp.zeros((1, 1))}}
  grads = {"visual": {"kernel": jnp.full((2, 2), 1e3)}, "model": {"kernel": jnp.full((1, 1), 0.5)}}
  cfg = state.OptimizerConfig(learning_rate=0.1, schedule="constant", max_grad_norm=1.0,
                              frozen_prefixes=("visual",))
  tx = state.make_optimizer(cfg, params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  mu = optax.tree_utils.tree_get(opt_state, "mu")
  np.testing.assert_allclose(mu["model"]["kernel"], [[0.05]], rtol=1e-6)
  # and with a trainable norm of 2 the grad is clipped to norm 1: mu = 0.1·1 = 0.1
  grads["model"]["kernel"] = jnp.full((1, 1), -2.0)
  _, opt_state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree_utils.tree_get(opt_state, "mu")["model"]["kernel"],
                             [[-0.1]], rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 10.0])        # below / above max_grad_norm
@pytest.mark.parametrize("frozen", [(), ("visual",)])
def test_optimizer_equals_optax_clip_then_adamw(scale, frozen):
  # make_optimizer passes the norm it computes for the non-finite test down to its clipping
  # (state.clip_by_global_norm): the updates must be optax's clip_by_global_norm → adamw, applied
  # to the trainable leaves only, over three steps.
  params = jax.tree.map(lambda x: x * 0.5, _params())
  cfg = state.OptimizerConfig(learning_rate=0.01, schedule="constant", weight_decay=0.1, max_grad_norm=1.0,
                              total_steps=10, frozen_prefixes=frozen)
  ours = state.make_optimizer(cfg, params)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(0.01, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1, mask=state.decay_mask))
  train = lambda tree: {k: v for k, v in tree.items() if not (frozen and k == "visual")}  # noqa: E731
  s_ours, s_ref, p_ours, p_ref = ours.init(params), ref.init(train(params)), params, train(params)
  keys = iter(jax.random.split(jax.random.key(3), 100))
  for _ in range(3):
    grads = jax.tree.map(lambda x: scale * jax.random.normal(next(keys), x.shape), params)
    u_ours, s_ours = ours.update(grads, s_ours, p_ours)
    u_ref, s_ref = ref.update(train(grads), s_ref, p_ref)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
    for a, b in zip(jax.tree.leaves(train(u_ours)), jax.tree.leaves(u_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    # Adam's update hardly sees a clip factor; its moments do.
    for name in ("mu", "nu"):
      got = optax.tree_utils.tree_get(s_ours, name)
      for a, b in zip(jax.tree.leaves(train(got)), jax.tree.leaves(optax.tree_utils.tree_get(s_ref, name))):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-12)   # norms summed in another order
    if frozen:
      assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u_ours["visual"]))


def test_clip_by_global_norm_with_and_without_given_norm():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}             # norm 13
  want, _ = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  clip = state.clip_by_global_norm(2.0)
  got, _ = clip.update(grads, clip.init(grads))
  given, _ = clip.update(grads, clip.init(grads), global_norm=jnp.float32(13.0))
  for w, g1, g2 in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(given)):
    np.testing.assert_allclose(g1, w, rtol=1e-7)
    np.testing.assert_allclose(g2, w, rtol=1e-7)
  np.testing.assert_allclose(float(state.global_norm(got)), 2.0, rtol=1e-6)
  small, _ = clip.update(grads, clip.init(grads), global_norm=jnp.float32(1.0))  # given norm rules
  np.testing.assert_array_equal(small["a"], grads["a"])


# ------------------------------------------------------------------------ gradient accumulation

B, L, D, V, M = 8, 5, 6, 11, 4


def _toy():
  ks = jax.random.split(jax.random.key(0), 6)
  params = {"model": {"proj": {"kernel": jax.random.normal(ks[0], (D, D)) * 0.5,
                               "bias": jnp.zeros(D)}},
            "lm_head": {"kernel": jax.random.normal(ks[1], (D, V)) * 0.5}}
  lengths = jnp.array([5, 1, 3, 4, 2, 5, 0, 3])   # uneven, one empty: per-micro means would differ
  batch = {
      "x": jax.random.normal(ks[2], (B, L, D)),
      "targets": jax.random.randint(ks[3], (B, L), 0, V),
      "mask": (jnp.arange(L)[None] < lengths[:, None]).astype(jnp.float32),
      "old_logps": -2.0 + 0.3 * jax.random.normal(ks[4], (B, L)),
      "advantages": jax.random.normal(ks[5], (B,)),
  }
  return params, batch


def _token_logps(params, batch):
  h = jnp.tanh(batch["x"] @ params["model"]["proj"]["kernel"] + params["model"]["proj"]["bias"])
  return logprobs.token_logprobs_from_hidden(h, params["lm_head"]["kernel"], batch["targets"],
                                             chunk_size=2)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("m", [M, 1])          # M = 1 takes the path without the scan
def test_accumulate_gradients_grpo_equals_full_batch(agg, m):
  params, batch = _toy()

  def terms(p, mb):
    return grpo.policy_loss_terms(_token_logps(p, mb), mb["old_logps"], mb["advantages"],
                                  mb["mask"], agg=agg)

  def full(p):
    return grpo.policy_loss(_token_logps(p, batch), batch["old_logps"], batch["advantages"],
                            batch["mask"], agg=agg)[0]

  micro = jax.tree.map(lambda x: x.reshape(m, B // m, *x.shape[1:]), batch)
  loss, grads, sums = jax.jit(lambda p, mb: state.accumulate_gradients(terms, p, mb))(params, micro)
  want_loss, want_grads = jax.jit(jax.value_and_grad(full))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, want_grads)
  np.testing.assert_allclose(sums["tokens"], 23.0)       # 5+1+3+4+2+5+0+3
  assert sums["tokens"].dtype == sums["denom"].dtype == jnp.float32
  if m > 1:
    # The naive alternative (mean of the micro-batch losses) is measurably different.
    micro_loss = jax.jit(jax.vmap(lambda mb: grpo.policy_loss(
        _token_logps(params, mb), mb["old_logps"], mb["advantages"], mb["mask"], agg=agg)[0]))
    naive = float(jnp.mean(micro_loss(micro)))
    assert abs(naive - float(want_loss)) > 1e-3


@pytest.mark.parametrize("m", [4, 1])
def test_accumulate_gradients_dpo_equals_full_batch(m):
  params, batch = _toy()
  # pairs: rows 0..3 chosen, rows 4..7 rejected; reference log-probs are fixed numbers
  ref = jnp.array([-9.0, -2.0, -6.0, -8.0, -4.0, -10.0, 0.0, -7.0])

  def pair_terms(p, mb):
    flat = {k: mb[k].reshape(-1, *mb[k].shape[2:]) for k in ("x", "targets", "mask")}  # [P·2, ...]
    lp, n = (a.reshape(-1, 2) for a in logprobs.sequence_logps(_token_logps(p, flat), flat["mask"]))
    per_pair, m = dpo.dpo_sft_loss_terms(lp[:, 0], lp[:, 1], mb["ref"][:, 0], mb["ref"][:, 1],
                                         n[:, 0], beta=0.1, sft_weight=1.0, weights=mb["w"])
    return per_pair.sum(), m["weight"].sum(), {"margins": m["rewards/margins"].sum()}

  # [pairs, 2 (chosen, rejected), ...]; pair 2's rejected row is empty, pair 3 is padding (w=0)
  pairs = jax.tree.map(lambda x: jnp.stack([x[:4], x[4:]], axis=1), batch)
  pairs |= {"ref": jnp.stack([ref[:4], ref[4:]], 1), "w": jnp.array([1.0, 1.0, 1.0, 0.0])}
  micro = jax.tree.map(lambda x: x.reshape(m, 4 // m, *x.shape[1:]), pairs)
  loss, grads, _ = jax.jit(lambda p, mb: state.accumulate_gradients(pair_terms, p, mb))(params, micro)

  def full(p):
    lp, n = logprobs.sequence_logps(_token_logps(p, batch), batch["mask"])
    return dpo.dpo_sft_loss(lp[:3], lp[4:7], ref[:3], ref[4:7], n[:3], beta=0.1, sft_weight=1.0)[0]

  want_loss, want_grads = jax.jit(jax.value_and_grad(full))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, want_grads)
