"""Non-finite updates: a NaN / inf loss or gradient skips the update (params and optimizer state
bit-identical, the skip counted), and the train loop stops after `max_nonfinite_in_a_row` in a row
with the last good checkpoint intact (docs/reliability.md).

The NaNs are injected through the inputs, as a corrupt batch would bring them: a reference
log-prob of a DPO pair, one pixel of an SFT image, one advantage of a GRPO rollout.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dpo_fixtures import BUCKETS, OPT, collate, fresh_state

from specs_jax.pipeline import NonFiniteError, PipelineError
from specs_jax.stages import common
from specs_jax.training import batches, checkpoint, grpo, grpo_step, rollout, steps
from specs_jax.training import state as state_lib


def _host(state):
  """Numpy copies of a state's params and optimizer state (the steps donate their input state)."""
  copy = lambda t: jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(t))  # noqa: E731
  return state_lib.TrainState(step=int(state.step), params=copy(state.params), opt_state=copy(state.opt_state),
                              rng=None)


def _assert_bit_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _counts(opt_state, name):
  return [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, name)]


# --------------------------------------------------------------------------- the optimizer wrapper

def test_skip_nonfinite_by_hand():
  """SGD-like numbers a reader can check: Adam's first update moves each weight by −lr·sign(g)."""
  cfg = state_lib.OptimizerConfig(learning_rate=0.1, schedule="constant", total_steps=10, max_grad_norm=None)
  params = {"w": {"kernel": jnp.array([[1.0, -0.0], [2.0, 3.0]])}}
  st = state_lib.create_train_state(params, state_lib.make_optimizer(cfg), jax.random.key(0))
  assert isinstance(st.opt_state, state_lib.NonFiniteGuardState)
  g = {"w": {"kernel": jnp.array([[1.0, 1.0], [-1.0, 1.0]])}}
  nan_g = {"w": {"kernel": jnp.array([[1.0, jnp.nan], [-1.0, 1.0]])}}
  inf_g = {"w": {"kernel": jnp.array([[1.0, 1.0], [jnp.inf, 1.0]])}}

  before = _host(st)
  s1, upd, m = state_lib.apply_gradients_checked(st, nan_g)
  assert int(s1.step) == 1 and {k: int(v) for k, v in m.items()} == {"nonfinite_updates": 1, "nonfinite_in_a_row": 1}
  _assert_bit_identical(s1.params, before.params)            # −0.0 stays −0.0 (p + 0 would give +0.0)
  _assert_bit_identical(s1.opt_state.inner_state, before.opt_state.inner_state)
  assert float(optax.tree.norm(upd)) == 0.0
  s2, _, m = state_lib.apply_gradients_checked(s1, inf_g)
  assert (int(m["nonfinite_updates"]), int(m["nonfinite_in_a_row"])) == (2, 2)
  s3, _, m = state_lib.apply_gradients_checked(s2, g, loss=jnp.float32(jnp.nan))   # finite grads, NaN loss
  assert (int(m["nonfinite_updates"]), int(m["nonfinite_in_a_row"])) == (3, 3)
  _assert_bit_identical(s3.params, before.params)
  s4, _, m = state_lib.apply_gradients_checked(s3, g, loss=jnp.float32(0.5))
  assert (int(m["nonfinite_updates"]), int(m["nonfinite_in_a_row"])) == (3, 0)
  # the first *applied* update: Adam's bias-corrected step is lr·sign(g); the count is 1, step is 4
  np.testing.assert_allclose(s4.params["w"]["kernel"], [[0.9, -0.1], [2.1, 2.9]], atol=1e-6)
  assert int(s4.step) == 4 and int(state_lib.applied_updates(s4)) == 1
  assert _counts(s4.opt_state, "count") == [1] * len(_counts(s4.opt_state, "count"))
  # ...the same as one update from the start: the skipped ones left no trace but the counters
  fresh, _, _ = state_lib.apply_gradients_checked(st, g)
  _assert_bit_identical(s4.params, fresh.params)
  _assert_bit_identical(s4.opt_state.inner_state, fresh.opt_state.inner_state)
  # TrainState.apply_gradients is the same path
  _assert_bit_identical(st.apply_gradients(nan_g).params, before.params)


def test_gradient_whose_square_overflows_is_skipped():
  """|g| = 1e20 is finite but g² is not: Adam would make the second moment inf and then freeze the
  weight (update 0 for ever). The guard tests Σ g², so the step is skipped instead."""
  cfg = state_lib.OptimizerConfig(learning_rate=0.1, schedule="constant", total_steps=10, max_grad_norm=None)
  params = {"w": jnp.array([1.0, 2.0])}
  st = state_lib.create_train_state(params, state_lib.make_optimizer(cfg), jax.random.key(0))
  before = _host(st)
  s1, upd, m = state_lib.apply_gradients_checked(st, {"w": jnp.array([1e20, 1.0])})
  assert int(m["nonfinite_updates"]) == 1
  _assert_bit_identical(s1.params, before.params)
  _assert_bit_identical(s1.opt_state.inner_state, before.opt_state.inner_state)
  assert float(optax.tree.norm(upd)) == 0.0
  s2, _, m = state_lib.apply_gradients_checked(s1, {"w": jnp.array([1e18, 1.0])})   # large but squarable
  assert int(m["nonfinite_in_a_row"]) == 0 and np.all(np.isfinite(jax.tree.leaves(s2.opt_state)[-1]))


def test_schedule_is_indexed_by_applied_updates():
  """Linear warmup 0 → 0.1 over 4 updates: after 2 skipped calls the next update uses lr(0) = 0."""
  cfg = state_lib.OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=4, total_steps=10,
                                  max_grad_norm=None)
  st = state_lib.create_train_state({"w": jnp.ones(3)}, state_lib.make_optimizer(cfg), jax.random.key(0))
  nan_g, g = {"w": jnp.full(3, jnp.nan)}, {"w": jnp.ones(3)}
  for _ in range(2):
    st = st.apply_gradients(nan_g)
  st = st.apply_gradients(g)                       # lr(0) = 0: no move (lr(state.step = 2) would be 0.05)
  np.testing.assert_array_equal(st.params["w"], np.ones(3))
  st = st.apply_gradients(g)                       # lr(1) = 0.025
  np.testing.assert_allclose(st.params["w"], np.full(3, 0.975), atol=1e-6)
  assert int(st.step) == 4 and int(state_lib.applied_updates(st)) == 2


# ----------------------------------------------------------------------------- the model's steps

def _skip_then_apply(step_fn, params, bad_batch, good_batch):
  """bad step then good step from a fresh state; returns (metrics, metrics, state, snapshot)."""
  state = fresh_state(params)
  before = _host(state)
  state, m_bad = step_fn(state, bad_batch)
  m_bad = jax.device_get(m_bad)
  _assert_bit_identical(state.params, before.params)
  _assert_bit_identical(state.opt_state.inner_state, before.opt_state.inner_state)
  assert int(state.step) == 1
  state, m_good = step_fn(state, good_batch)
  return m_bad, jax.device_get(m_good), state


def test_dpo_step_skips_a_nan_reference_logprob(tiny, ref_pairs, dpo_step, pad_id):
  model, params = tiny
  good = collate(ref_pairs, [0, 1, 2], model, pad_id)
  bad = dict(good, ref_chosen_logps=np.array(good["ref_chosen_logps"], copy=True))
  bad["ref_chosen_logps"][1] = np.nan
  m_bad, m_good, state = _skip_then_apply(dpo_step, params, bad, good)
  assert np.isnan(m_bad["loss"]) and float(m_bad["l2_updates"]) == 0.0
  assert (int(m_bad["nonfinite_updates"]), int(m_bad["nonfinite_in_a_row"])) == (1, 1)
  assert (int(m_good["nonfinite_updates"]), int(m_good["nonfinite_in_a_row"])) == (1, 0)
  assert np.isfinite(m_good["loss"]) and float(m_good["l2_updates"]) > 0
  # the good step after the skip equals the good step alone, bit for bit
  alone, m_alone = dpo_step(fresh_state(params), good)
  _assert_bit_identical(state.params, alone.params)
  assert float(m_good["loss"]) == float(m_alone["loss"])


def test_sft_step_skips_a_nan_pixel(tiny, ref_pairs, pad_id):
  model, params = tiny
  examples = [batches.EncodedExample(prompt=p.prompt, response_ids=p.chosen_ids) for p in ref_pairs[:3]]
  good = batches.collate_sft(examples, model.config, BUCKETS, pad_id, num_rows=4)
  assert "pixel_values" in good
  bad = dict(good, pixel_values=np.array(good["pixel_values"], copy=True))
  bad["pixel_values"][0, 0] = np.nan                  # one value of one patch of the first image
  step = steps.make_sft_step(model, OPT, chunk_size=32)
  m_bad, m_good, _ = _skip_then_apply(step, params, bad, good)
  assert np.isnan(m_bad["loss"]) and float(m_bad["l2_updates"]) == 0.0
  assert (int(m_bad["nonfinite_updates"]), int(m_bad["nonfinite_in_a_row"])) == (1, 1)
  assert (int(m_good["nonfinite_updates"]), int(m_good["nonfinite_in_a_row"])) == (1, 0)
  assert np.isfinite(m_good["loss"]) and float(m_good["l2_updates"]) > 0


def _text_rollout(model, rng: np.random.Generator, prompts: int = 2, g: int = 2, p_len: int = 8, c_len: int = 8):
  """A hand-packed text-only rollout: random tokens, full masks, rewards 1 / 0 within each group."""
  n, length = prompts * g, p_len + c_len
  ids = rng.integers(10, 300, size=(n, length)).astype(np.int32)
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (3, n, length)).copy()
  rewards = np.tile(np.array([1.0, 0.0] * (g // 2), np.float32), prompts)
  return rollout.RolloutBatch(
      input_ids=ids, attention_mask=np.ones((n, length), np.int32), position_ids=pos,
      completion_mask=np.ones((n, c_len), np.int32), sampler_logps=np.zeros((n, c_len), np.float32),
      rewards=rewards, format_rewards=rewards, accuracy_rewards=rewards,
      advantages=np.asarray(grpo.group_advantages(jnp.asarray(rewards), g)), keep=np.ones(n, bool),
      group_ids=np.repeat(np.arange(prompts), g).astype(np.int32), finished=np.ones(n, bool), group_size=g,
      sampling={"temperature": 1.0})


def test_grpo_update_skips_a_nan_advantage(tiny):
  model, params = tiny
  # _text_rollout's rows are random (the rows of a group do not share a prompt): separate rows
  cfg = grpo_step.GRPOConfig(group_size=2, prompts_per_step=2, max_response_len=8, learning_rate=1e-3,
                             filter_lower=None, filter_upper=None, chunk_size=8, share_prompt=False)
  fns = grpo_step.make_grpo_functions(model, cfg)
  good = _text_rollout(model, np.random.default_rng(0))
  bad_adv = good.advantages.copy()
  bad_adv[1] = np.nan
  bad = dataclasses.replace(good, advantages=bad_adv)
  state, _ = steps.init_train_state(jax.tree.map(jnp.copy, params), cfg.optimizer_config(), jax.random.key(1))
  before = _host(state)
  state, m = grpo_step.grpo_train_step(state, bad, cfg, jax.random.key(2), fns=fns)
  _assert_bit_identical(state.params, before.params)
  _assert_bit_identical(state.opt_state.inner_state, before.opt_state.inner_state)
  assert np.isnan(m["loss"]) and m["l2_updates"] == 0.0 and m["updates"] == 1
  assert (m["nonfinite_updates"], m["nonfinite_in_a_row"]) == (1.0, 1.0)
  state, m = grpo_step.grpo_train_step(state, good, cfg, jax.random.key(2), fns=fns)
  assert (m["nonfinite_updates"], m["nonfinite_in_a_row"]) == (1.0, 0.0)
  assert np.isfinite(m["loss"]) and m["l2_updates"] > 0 and int(state_lib.applied_updates(state)) == 1


# ---------------------------------------------------------------------------------- the train loop

# One tx object for every toy state: it is static metadata of the jitted TrainState (compared by identity).
TOY_TX = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=0.1, schedule="constant", total_steps=100,
                                                            max_grad_norm=None))


def _toy_state():
  return state_lib.create_train_state({"w": {"kernel": jnp.arange(6.0).reshape(2, 3)}}, TOY_TX, jax.random.key(0))


@jax.jit
def _toy_update(state, x):
  loss, grads = jax.value_and_grad(lambda p: jnp.mean((p["w"]["kernel"] - x) ** 2))(state.params)
  state, _, counts = state_lib.apply_gradients_checked(state, grads, loss)
  return state, {"loss": loss} | counts


def _toy_step(poisoned=(), on_poison=None):
  """Step k regresses onto the constant k / 10; a NaN target at the 0-based steps in `poisoned`."""
  def fn(state, step):
    if step in poisoned and on_poison is not None:
      on_poison(step)
    return _toy_update(state, jnp.float32(np.nan if step in poisoned else step / 10))
  return fn


def _loop(tmp_path, step_fn, total=10, k=3, **kw):
  return common.train_loop(str(tmp_path / "toy"), _toy_state(), total, step_fn, checkpoint_every=1, progress=False,
                           max_nonfinite_in_a_row=k, **kw)


def _records(tmp_path):
  import json
  with open(tmp_path / "toy" / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _on_disk(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "toy" / "checkpoints")
  steps_on_disk = ckpt.all_steps()
  restored, _, _ = ckpt.restore_latest(jax.eval_shape(_toy_state))
  ckpt.close()
  return steps_on_disk, restored


def test_loop_stops_after_k_in_a_row_and_keeps_the_last_good_checkpoint(tmp_path):
  clean = _loop(tmp_path / "clean", _toy_step()).state
  with pytest.raises(NonFiniteError) as err:
    _loop(tmp_path, _toy_step(poisoned=range(3, 10)))
  msg = str(err.value)
  assert isinstance(err.value, PipelineError) and isinstance(err.value, FloatingPointError)
  assert "stage toy" in msg and "3 non-finite updates in a row" in msg and "steps 4..6" in msg
  assert "latest checkpoint (step 3)" in msg
  steps_on_disk, restored = _on_disk(tmp_path)
  assert steps_on_disk == [2, 3]                            # nothing of steps 4..6 (max_to_keep=2)
  assert int(restored.step) == 3 and int(restored.opt_state.notfinite_count) == 0
  # the checkpoint holds the params of 3 good steps: those of the clean run at step 3
  ref = _toy_state()
  for s in range(3):
    ref, _ = _toy_update(ref, jnp.float32(s / 10))
  _assert_bit_identical(restored.params, ref.params)
  rows = _records(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r["nonfinite_in_a_row"] for r in rows] == [0, 0, 0, 1, 2, 3]
  assert all("loss" not in r for r in rows[3:]) and all(np.isfinite(r["loss"]) for r in rows[:3])
  # the fault was transient: a re-run resumes from step 3 and ends as the clean run
  res = _loop(tmp_path, _toy_step())
  assert res.resumed_from == 3
  _assert_bit_identical(res.state.params, clean.params)


def test_loop_skips_fewer_than_k_and_never_checkpoints_a_skipped_step(tmp_path, caplog):
  import logging
  with caplog.at_level(logging.INFO):
    res = _loop(tmp_path, _toy_step(poisoned={3, 4}), total=7)
  assert (int(res.state.opt_state.total_notfinite), int(res.state.opt_state.notfinite_count)) == (2, 0)
  saved = [int(r.getMessage().split("saving step ")[1].split()[0]) for r in caplog.records
           if "checkpoint: saving step" in r.getMessage()]
  assert saved == [1, 2, 3, 6, 7]
  assert "non-finite update skipped" in caplog.text
  rows = _records(tmp_path)
  assert [r["nonfinite_updates"] for r in rows] == [0, 0, 0, 1, 2, 2, 2]


def test_sigterm_after_a_skipped_step_saves_nothing_new(tmp_path):
  """SIGTERM arriving during a skipped step: exit 0 without saving; the last good checkpoint stays."""
  previous = signal.getsignal(signal.SIGTERM)
  try:
    with pytest.raises(SystemExit) as exit_info:
      _loop(tmp_path, _toy_step(poisoned={4}, on_poison=lambda s: os.kill(os.getpid(), signal.SIGTERM)))
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert exit_info.value.code == 0
  steps_on_disk, restored = _on_disk(tmp_path)
  assert steps_on_disk == [3, 4] and int(restored.step) == 4


def test_nonfinite_metric_after_an_applied_update_stops_unsaved(tmp_path):
  """A finite update but an inf metric (say the param norm overflowed): stop, do not save that step."""
  def step_fn(state, step):
    state, m = _toy_update(state, jnp.float32(step / 10))
    return state, m | ({"l2_params": jnp.float32(np.inf)} if step == 2 else {})
  with pytest.raises(NonFiniteError, match=r"stage toy: non-finite metrics \['l2_params'\] at step 3"):
    _loop(tmp_path, step_fn)
  assert _on_disk(tmp_path)[0] == [1, 2]


def test_resume_uses_the_checkpointed_loop_step_not_state_step(tmp_path):
  """A loop step may make no optimizer update (a GRPO step whose groups were all filtered out):
  the resumed loop must continue at the loop step, not at state.step."""
  calls = []

  def step_fn(state, step):
    calls.append(step)
    if step % 2:                                   # odd steps make no update
      return state, {}
    return _toy_update(state, jnp.float32(step / 10))

  _loop(tmp_path, step_fn, total=3)
  _, restored = _on_disk(tmp_path)
  assert int(restored.step) == 2                   # 3 loop steps, 2 updates
  res = _loop(tmp_path, step_fn, total=5)
  assert res.resumed_from == 3 and calls == [0, 1, 2, 3, 4]
