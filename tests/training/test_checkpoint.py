"""Orbax checkpoints: resume equals an uninterrupted run bit for bit (data order and RNG included),
unfinished saves are never restored, keep-N / interval, sharded restore, SIGTERM, HF export."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dpo_fixtures import RUN_STEPS, collate, data_iterator, fresh_state
from jax.sharding import PartitionSpec as P

from specs_jax.models import qwen2_5_vl
from specs_jax.parallel import mesh as mesh_lib
from specs_jax.training import checkpoint, state as state_lib, steps


def _assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny, ref_pairs, dpo_step, dpo_run, pad_id):
  """Must-show 3: 2 steps, save (state, data-iterator state, extras), drop everything, restore into
  an abstract state, continue 2 steps: params, Adam moments, step, RNG and the data iterator equal
  the uninterrupted 4-step run (`dpo_run`) exactly."""
  model, params = tiny
  half = RUN_STEPS // 2
  state = fresh_state(params)
  it = data_iterator()
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
    for _ in range(half):
      state, _ = dpo_step(state, collate(ref_pairs, next(it), model, pad_id))
    assert ckpt.save(int(state.step), state, it.get_state(), {"seed": 0})
    abstract = jax.eval_shape(lambda s: s, state)           # shapes only, nothing kept from the run
    # The save is asynchronous; a step right after it donates (deletes) the saved buffers while
    # the files are still being written. The checkpoint must not care.
    state, _ = dpo_step(state, collate(ref_pairs, next(it), model, pad_id))
  del state, it

  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  restored, data_state, extra = ckpt.restore_latest(abstract)
  ckpt.close()
  assert extra == {"seed": 0} and int(restored.step) == half
  it = data_iterator()
  it.set_state(data_state)
  before = steps.compile_counts()["dpo_step"]
  for _ in range(RUN_STEPS - half):
    restored, _ = dpo_step(restored, collate(ref_pairs, next(it), model, pad_id))
  assert steps.compile_counts()["dpo_step"] == before       # the restored state reuses the compiled step
  want = dpo_run["state"]
  _assert_trees_equal(restored.params, want.params)
  _assert_trees_equal(restored.opt_state, want.opt_state)
  assert int(restored.step) == int(want.step) == RUN_STEPS
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(want.rng))
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(want.rng)
  assert it.get_state() == dpo_run["iterator_state"]


def _small_state(seed=0):
  params = {"model": {"w": {"kernel": jnp.arange(32.0).reshape(8, 4) + seed}}, "visual": {"b": {"bias": jnp.ones(4)}}}
  tx = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=0.1, frozen_prefixes=("visual",)), params)
  return state_lib.create_train_state(params, tx, jax.random.key(seed))


def test_unfinished_checkpoint_is_never_restored(tmp_path):
  d = tmp_path / "ckpt"
  st = _small_state()
  with checkpoint.Checkpointer(d) as ckpt:
    ckpt.save(3, st, {"next_index": 7})
  # A save cut short by preemption: Orbax writes to "<step>.orbax-checkpoint-tmp-<n>" and renames
  # it only when complete. Leave one behind, newer than the finished step, with garbage inside.
  tmp = d / "5.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_text("half written")
  ckpt = checkpoint.Checkpointer(d)
  assert ckpt.all_steps() == [3]
  restored, data_state, _ = ckpt.restore_latest(jax.eval_shape(lambda s: s, st))
  ckpt.close()
  assert data_state == {"next_index": 7} and int(restored.step) == 0
  _assert_trees_equal(restored.params, st.params)


def test_keep_n_interval_force_and_no_checkpoint(tmp_path):
  st = _small_state()
  with checkpoint.Checkpointer(tmp_path / "c", max_to_keep=2, save_interval_steps=2) as ckpt:
    assert ckpt.restore_latest(jax.eval_shape(lambda s: s, st)) is None      # fresh start
    saved = [ckpt.save(s, st) for s in range(1, 6)]
    assert saved == [False, True, False, True, False]                    # interval 2
    assert ckpt.save(5, st, force=True)                                   # the final save
    assert not ckpt.save(5, st, force=True)                               # already there: skipped
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4, 5]                                     # keep the newest 2


def test_restore_into_a_sharded_abstract_state(tmp_path, tiny):
  """A state saved unsharded restores straight into the data=2 × fsdp=4 layout of the rules."""
  from specs_jax.parallel import sharding
  _, params = tiny
  st = fresh_state(params)
  with checkpoint.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(0, st, force=True)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  abstract = jax.eval_shape(lambda s: s, st)
  shardings = sharding.state_shardings(abstract, mesh)
  with checkpoint.Checkpointer(tmp_path / "c") as ckpt:
    restored, _, _ = ckpt.restore_latest(abstract, shardings)
  _assert_trees_equal(restored.params, st.params)
  q = restored.params["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert q.sharding.spec == P("fsdp") and len(q.addressable_shards) == 8
  mu = restored.opt_state.inner_state.inner_states["trainable"].inner_state[1][0].mu
  assert mu["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P("fsdp")


def test_sigterm_saves_then_exits_cleanly(tmp_path):
  st = _small_state()
  ckpt = checkpoint.Checkpointer(tmp_path / "c")
  step = {"n": 0}

  def save():
    ckpt.save(step["n"], st, {"next_index": step["n"]}, force=True)
    ckpt.wait_until_finished()

  previous = signal.getsignal(signal.SIGTERM)
  guard = checkpoint.install_sigterm_handler(save)
  try:
    guard.maybe_save_and_exit()                  # nothing received: a no-op
    step["n"] = 7
    os.kill(os.getpid(), signal.SIGTERM)         # the handler only records it...
    assert guard.requested and ckpt.all_steps() == []
    with pytest.raises(SystemExit) as exit_info:
      guard.maybe_save_and_exit()                # ...the loop saves between steps, then exits 0
    assert exit_info.value.code == 0
  finally:
    guard.uninstall()
    signal.signal(signal.SIGTERM, previous)
  assert ckpt.all_steps() == [7]
  ckpt.close()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_export_hf_round_trip(tmp_path, tiny, hf_dir):
  model, params = tiny
  changed = jax.tree.map(lambda x: x + 0.5, params)
  out = checkpoint.export_hf(changed, model.config, tmp_path / "hf", copy_files_from=hf_dir)
  assert os.path.exists(os.path.join(out, "tokenizer.json")) and os.path.exists(os.path.join(out, "config.json"))
  assert json.load(open(os.path.join(out, "config.json")))["vision_config"]["depth"] == model.config.vision.depth
  _, loaded = qwen2_5_vl.from_pretrained(out)
  _assert_trees_equal(loaded, changed)


def test_orbax_handles_masked_optimizer_state(tmp_path):
  """The frozen subtree's Adam state is optax.MaskedNode (no leaves); it survives a round trip."""
  st = _small_state(1)
  with checkpoint.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, st, force=True)
    restored, _, _ = ckpt.restore(1, st)           # a real state works as the target too
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(st.opt_state)
  mu = restored.opt_state.inner_state.inner_states["trainable"].inner_state[1][0].mu
  assert isinstance(mu["visual"]["b"]["bias"], optax.MaskedNode)
  np.testing.assert_array_equal(mu["model"]["w"]["kernel"], np.zeros((8, 4)))
