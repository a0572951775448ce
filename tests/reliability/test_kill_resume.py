"""Interrupted stages resume to the uninterrupted result (docs/reliability.md).

`test_kill_and_resume_equals_uninterrupted` SIGKILLs (or SIGTERMs) pipeline stages at seeded random
points, re-runs them and compares with an uninterrupted run (`kill_harness.py`). By default (CI) it
runs a small config (base 40 steps, zero_rl 4) and one trial on each of base and zero_rl, in about
2 to 3 minutes on 2 CPU cores. SPECS_KILL_TRIALS=N runs N trials over every stage of configs/test.py
(final_rl / sft_final and the cold-start stages lengthened to 6 steps, to have more to interrupt);
SPECS_KILL_REPORT=path.jsonl writes one line per trial, SPECS_KILL_SEED shifts the seeds,
SPECS_KILL_ONLY=i,j runs only those trials of the plan.

    SPECS_KILL_TRIALS=16 SPECS_KILL_REPORT=/tmp/kill.jsonl .venv/bin/python -m pytest -s \
        tests/reliability/test_kill_resume.py -k kill_and_resume

The other tests are quick: a half-written (temporary) Orbax checkpoint is ignored by the train
loop's restore.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import kill_harness  # noqa: E402

from specs_jax.stages import common  # noqa: E402
from specs_jax.training import checkpoint  # noqa: E402
from specs_jax.training import state as state_lib  # noqa: E402

FULL_TRIALS = int(os.environ.get("SPECS_KILL_TRIALS", "0"))
SEED = int(os.environ.get("SPECS_KILL_SEED", "0"))

# CI: a short base stage and a 4-step GRPO stage, one trial each. With these seeds base is killed
# after 26 steps (checkpoints 10, 20: the re-run resumes at 20, past a planted temporary directory)
# and zero_rl inside a checkpoint write after step 3.
CI_OVERRIDES = ("--config.base.steps=40", "--config.base.checkpoint_every=10", "--config.zero_rl.steps=4",
                "--config.zero_rl.checkpoint_every=2")
CI_TRIALS = (("base", SEED + 3, "after_step"), ("zero_rl", SEED, "in_save"))
# Full: configs/test.py with the trained stages long enough to be interrupted between checkpoints;
# zero_rl keeps its 2 steps (a longer one leaves the distillation with no pairs at this size).
FULL_OVERRIDES = ("--config.base.checkpoint_every=20",
                  "--config.final_rl.steps=6", "--config.final_rl.checkpoint_every=2",
                  "--config.coldstart.epochs=6", "--config.coldstart.checkpoint_every=2",
                  "--config.sft_coldstart.epochs=6", "--config.sft_coldstart.checkpoint_every=2")
FULL_STAGES = ("base", "zero_rl", "coldstart", "final_rl", "sft_coldstart", "sft_final", "distill", "eval")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every trial is compared with."""
  root = tmp_path_factory.mktemp("kill_ref")
  if FULL_TRIALS:
    stages = ("base", "zero_rl", "distill", "coldstart", "final_rl", "sft_coldstart", "sft_final", "eval")
    return kill_harness.run_reference(root / "ref", stages, FULL_OVERRIDES)
  return kill_harness.run_reference(root / "ref", ("base", "zero_rl"), CI_OVERRIDES)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(reference, tmp_path):
  trials = kill_harness.plan(FULL_STAGES, FULL_TRIALS, SEED) if FULL_TRIALS else CI_TRIALS
  only = os.environ.get("SPECS_KILL_ONLY")       # e.g. "4,6": re-run these trials of the plan
  if only:
    trials = [trials[int(i)] for i in only.split(",")]
  results = []
  for i, (stage, seed, mode) in enumerate(trials):
    t0 = time.time()
    t = kill_harness.run_trial(reference, tmp_path / f"trial{i}", stage, seed, mode=mode)
    row = dataclasses.asdict(t) | {"ok": t.ok, "trial_s": time.time() - t0, "stage_steps": reference.steps[stage]}
    results.append(row)
    print(json.dumps(row), flush=True)
    report = os.environ.get("SPECS_KILL_REPORT")
    if report:
      with open(report, "a") as f:
        f.write(json.dumps(row) + "\n")
  failed = [(r["stage"], r["seed"], r["mode"], r["problems"]) for r in results if not r["ok"]]
  assert not failed, failed


# ------------------------------------------------------------------------------ half-written saves

TX = state_lib.make_optimizer(state_lib.OptimizerConfig(learning_rate=0.1, schedule="constant", total_steps=100,
                                                        max_grad_norm=None))


def _state():
  return state_lib.create_train_state({"w": {"kernel": jnp.arange(6.0).reshape(2, 3)}}, TX, jax.random.key(0))


@jax.jit
def _update(state, x):
  loss, grads = jax.value_and_grad(lambda p: jnp.mean((p["w"]["kernel"] - x) ** 2))(state.params)
  return state.apply_gradients(grads, loss), {"loss": loss}


def _step(state, step):
  return _update(state, jnp.float32(step / 10))


def test_train_loop_ignores_a_half_written_checkpoint(tmp_path):
  """A save cut short leaves `<step>.orbax-checkpoint-tmp/` (Orbax 0.12 writes there and renames it
  to `<step>/` when complete; older versions add `-<timestamp>`). The loop resumes from the newest
  finalised step, saves over the leftover, and ends as an uninterrupted run; the garbage is never read."""
  straight = common.train_loop(str(tmp_path / "a"), _state(), 8, _step, checkpoint_every=2, progress=False).state
  d = tmp_path / "b"
  common.train_loop(str(d), _state(), 4, _step, checkpoint_every=2, progress=False)
  for name in ("5.orbax-checkpoint-tmp-1700000000", "6.orbax-checkpoint-tmp"):
    (d / "checkpoints" / name / "state").mkdir(parents=True)
    (d / "checkpoints" / name / "state" / "garbage").write_text("half written")
    (d / "checkpoints" / name / "_CHECKPOINT_METADATA").write_text("{")
  res = common.train_loop(str(d), _state(), 8, _step, checkpoint_every=2, progress=False)
  assert res.resumed_from == 4
  for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(straight.params)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  ckpt = checkpoint.Checkpointer(d / "checkpoints")
  assert ckpt.all_steps() == [6, 8]
  restored, _, _ = ckpt.restore(6, jax.eval_shape(_state))
  ckpt.close()
  assert int(restored.step) == 6
