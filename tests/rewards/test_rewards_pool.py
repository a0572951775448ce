"""Process-pool grading: same scores as in-process, timeouts, crashes, the global deadline, bad golds."""

import logging
import time

import numpy as np
import pytest

import reward_test_graders
from specs_jax import rewards


def resp(answer: str) -> str:
  return f"<think> work </think>\n<answer> The answer is $\\boxed{{{answer}}}$</answer>"


@pytest.fixture(scope="module")
def pool():
  with rewards.RewardPool(num_workers=2) as p:
    assert p.wait_ready(60.0)
    yield p


def config(**kw) -> rewards.RewardConfig:
  kw.setdefault("accuracy_fn", reward_test_graders.misbehaving_grader)
  return rewards.RewardConfig(**kw)


MIXED = [
    (resp("5"), "5"), (resp("6"), "5"), (resp("0.75"), "3/4"), (resp(r"\frac{1}{2}"), "0.5"),
    (resp("A"), "A"), (resp("B"), "A"), ("<answer>The answer is D</answer>", "D"), ("no tags", "5"),
    (resp("[1, 2)"), "[1,2)"), (resp("Yes"), "yes"), (resp("5"), "5"), (resp("5"), "5"),
]


def test_batch_equals_in_process(pool):
  texts, golds = zip(*MIXED)
  out, stats = rewards.grade_batch(texts, golds, rewards.RewardConfig(), pool=pool)
  want_acc = [rewards.accuracy_reward(t, g) for t, g in MIXED]
  want_fmt = [rewards.format_reward(t) for t in texts]
  np.testing.assert_array_equal(out.accuracy, want_acc)
  np.testing.assert_array_equal(out.format, want_fmt)
  # total = 0.5 * format + 1.0 * accuracy: the first item is 0.5 + 1 = 1.5, the second 0.5 + 0.
  np.testing.assert_allclose(out.total, 0.5 * np.array(want_fmt) + np.array(want_acc))
  assert out.total[0] == 1.5 and out.total[1] == 0.5
  assert out.total.dtype == np.float32 and out.total.shape == (len(MIXED),)
  assert stats.ok == len(MIXED) and stats.timeouts == stats.crashes == stats.deadline == 0
  assert stats.unique == len(MIXED) - 2           # the three resp("5")/"5" items are graded once
  assert set(out.status) == {"ok"}


def test_weights_come_from_config(pool):
  out, _ = rewards.grade_batch([resp("5")], ["5"], rewards.RewardConfig(format_weight=0.25, accuracy_weight=2.0),
                               pool=pool)
  assert out.total.tolist() == [2.25]


def test_hang_in_c_is_killed_and_the_batch_finishes(pool, caplog):
  texts = [resp("HANG_IN_C")] + [resp(str(i)) for i in range(8)]
  golds = ["1"] + [str(i) for i in range(8)]
  cfg = config(item_timeout_s=0.5, kill_grace_s=0.3, deadline_s=20.0)
  t0 = time.perf_counter()
  with caplog.at_level(logging.WARNING):
    out, stats = rewards.grade_batch(texts, golds, cfg, pool=pool)
  elapsed = time.perf_counter() - t0
  assert out.status[0] == "timeout" and out.total[0] == 0.0
  assert out.status[1:] == ("ok",) * 8 and out.accuracy[1:].tolist() == [1.0] * 8
  assert stats.timeouts == 1 and stats.worker_restarts == 1
  assert elapsed < 5.0                            # 0.8 s to the kill; far below the 600 s sleep
  assert "timeout" in caplog.text
  # The replaced worker serves the next batch.
  out, stats = rewards.grade_batch([resp("3")], ["3"], cfg, pool=pool)
  assert out.status == ("ok",) and out.accuracy.tolist() == [1.0]


def test_soft_timeout_keeps_the_worker(pool):
  cfg = config(item_timeout_s=0.3, kill_grace_s=5.0, deadline_s=20.0)
  t0 = time.perf_counter()
  out, stats = rewards.grade_batch([resp("SLOW"), resp("2")], ["1", "2"], cfg, pool=pool)
  assert time.perf_counter() - t0 < 4.0           # interrupted at 0.3 s, not killed at 5.3 s
  assert out.status == ("timeout", "ok") and stats.worker_restarts == 0


def test_real_math_hang_times_out_without_the_guard(pool):
  """Without the pre-parse guard, SymPy really does work on 9^{9^{9^{9}}}; the worker timeout ends it."""
  cfg = rewards.RewardConfig(item_timeout_s=0.5, kill_grace_s=1.0, deadline_s=20.0,
                             grade=rewards.GradeConfig(guard=False))
  t0 = time.perf_counter()
  out, stats = rewards.grade_batch([resp("9^{9^{9^{9}}}"), resp("7")], ["5", "7"], cfg, pool=pool)
  assert time.perf_counter() - t0 < 5.0
  assert out.status == ("timeout", "ok") and stats.timeouts == 1


def test_crash_and_exception_score_zero(pool):
  texts = [resp("CRASH"), resp("RAISE"), resp("4")]
  out, stats = rewards.grade_batch(texts, ["1", "1", "4"], config(deadline_s=20.0), pool=pool)
  assert out.status == ("crash", "crash", "ok")
  assert out.total.tolist() == [0.0, 0.0, 1.5]     # a crash zeroes the format part too
  assert stats.crashes == 2 and stats.worker_restarts == 1   # os._exit kills a worker; raise does not


def test_memory_limit(pool, caplog):
  with caplog.at_level(logging.WARNING):
    out, stats = rewards.grade_batch([resp("HOG"), resp("1")], ["1", "1"], config(deadline_s=20.0), pool=pool)
  assert out.status == ("crash", "ok") and stats.worker_restarts == 0
  assert "MemoryError" in caplog.text


def test_global_deadline_bounds_the_batch(pool):
  """Four items that would hang for 600 s each, per-item timeout 60 s, deadline 1.5 s."""
  texts = [resp(str(i)) for i in range(4)] + [resp("HANG_IN_C")] * 2 + [resp("SLOW")] * 2
  golds = [str(i) for i in range(4)] + ["1"] * 4
  cfg = config(item_timeout_s=60.0, deadline_s=1.5)
  assert pool.wait_ready(60.0)                     # replacements of workers killed by earlier tests
  t0 = time.perf_counter()
  out, stats = rewards.grade_batch(texts, golds, cfg, pool=pool)
  elapsed = time.perf_counter() - t0
  assert elapsed < 1.5 + 1.0                       # the deadline plus the time to kill two workers
  assert out.status[:4] == ("ok",) * 4 and out.accuracy[:4].tolist() == [1.0] * 4
  assert set(out.status[4:]) == {"deadline"} and stats.deadline == 4
  assert not out.total[4:].any()


def test_bad_gold_is_reported_not_rewarded(pool, caplog):
  texts, golds = [resp("1"), resp("1")], ["1", r"\frac{"]
  with caplog.at_level(logging.ERROR):
    out, stats = rewards.grade_batch(texts, golds, rewards.RewardConfig(), pool=pool)
  assert out.status == ("ok", "bad_gold") and out.total.tolist() == [1.5, 0.0]
  assert stats.bad_gold == 1 and stats.bad_gold_examples == (r"\frac{",)
  assert repr(r"\frac{") in caplog.text
  with pytest.raises(ValueError, match=r"\\\\frac\{"):
    rewards.grade_batch(texts, golds, rewards.RewardConfig(raise_on_bad_gold=True), pool=pool)


def test_metrics_and_input_checks(pool):
  _, stats = rewards.grade_batch([resp("1")], ["1"], pool=pool)
  m = stats.as_metrics()
  assert m["rewards/n"] == 1.0 and m["rewards/ok"] == 1.0 and "rewards/timeouts" in m
  with pytest.raises(ValueError, match="2 texts but 1 golds"):
    rewards.grade_batch(["a", "b"], ["1"], pool=pool)
  with pytest.raises(ValueError, match="unknown accuracy grader 'mth'"):
    rewards.grade_batch(["a"], ["1"], rewards.RewardConfig(accuracy_fn="mth"), pool=pool)
  with pytest.raises(ValueError, match="fork"):
    rewards.RewardConfig(mp_context="fork")


def test_without_a_pool_one_is_started_and_closed():
  out, stats = rewards.grade_batch([resp("2")], ["2"], rewards.RewardConfig(num_workers=1, deadline_s=30.0))
  assert out.status == ("ok",) and stats.ok == 1
