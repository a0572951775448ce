"""Configuration dataclasses for the verifiable rewards (RECIPE.md §5).

Both are frozen, hashable and picklable: `GradeConfig` travels to the grading worker processes with
every item, and `RewardConfig` is what a stage config names (`config.rewards = RewardConfig(...)`, or
`RewardConfig.from_dict(config.rewards.to_dict())` from an ml_collections ConfigDict).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class GradeConfig:
  """How an extracted answer is compared with a gold answer.

  Attributes:
    float_rounding: decimal places both sides are rounded to when one of them is a float
      (math-verify's `verify(float_rounding=...)`; its default, 6).
    rel_tol: extra numeric acceptance when both sides are plain numbers:
      |pred - gold| <= max(abs_tol, rel_tol * |gold|). 0 disables (the default: math-verify only).
    abs_tol: see rel_tol.
    choice_letters: letters that a single-letter gold is read as a multiple-choice option from.
    max_answer_chars: an extracted answer longer than this scores 0 without being parsed.
    max_nesting: an answer with {}, () or [] nested deeper than this scores 0 without being parsed.
    max_exponent_digits: an answer with an integer exponent literal longer than this, or with a
      numeric power tower (9^9^9, 10^{10^{10}}), scores 0 without being parsed. This guard protects the
      in-process path; the worker pool's hard timeout is the backstop for everything it misses.
    guard: apply the three limits above (False only to test the pool's timeouts on real math).
    inprocess_timeout_s: math-verify's own signal.alarm timeout (whole seconds) for in-process
      grading from the main thread; other threads cannot use signals and run without one.
  """

  float_rounding: int = 6
  rel_tol: float = 0.0
  abs_tol: float = 0.0
  choice_letters: str = "ABCDEFGH"
  max_answer_chars: int = 512
  max_nesting: int = 24
  max_exponent_digits: int = 5
  guard: bool = True
  inprocess_timeout_s: int = 3

  def __post_init__(self):
    if self.rel_tol < 0 or self.abs_tol < 0:
      raise ValueError(f"rel_tol and abs_tol must be >= 0, got {self.rel_tol}, {self.abs_tol}")
    if not self.choice_letters or not self.choice_letters.isalpha() or not self.choice_letters.isupper():
      raise ValueError(f"choice_letters must be upper-case letters, got {self.choice_letters!r}")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward = format_weight * format + accuracy_weight * accuracy, graded in a process pool.

  Attributes:
    format_fn: registry name of the format reward (`registry.FORMAT_REWARDS`).
    accuracy_fn: registry name of the accuracy grader (`registry.ACCURACY_GRADERS`), or a picklable
      top-level function `(answer: str | None, gold: str, config: GradeConfig) -> float`.
    format_weight: 0.5 in SPECS/MM-EUREKA (the figure's format curve tops out at 0.5).
    accuracy_weight: 1.0.
    num_workers: grading processes.
    item_timeout_s: per-item budget. The worker interrupts itself at this point (setitimer); the parent
      kills and replaces a worker that is still busy kill_grace_s later (a hang inside C code).
    kill_grace_s: see item_timeout_s.
    deadline_s: global budget for one `grade_batch` call, worker start-up included. Items not graded
      by then score 0 with status "deadline".
    mp_context: "spawn" or "forkserver". Never "fork": the parent has JAX's threads running.
    worker_memory_mb: address space each worker may add after start-up (RLIMIT_AS, Linux; None:
      unlimited). Running out raises MemoryError inside the worker, which scores the item 0 ("crash").
    raise_on_bad_gold: raise ValueError after the batch when a gold cannot be parsed (otherwise such
      items score 0, are counted in the stats and logged with the gold named).
    grade: GradeConfig.
  """

  format_fn: str = "think_answer"
  accuracy_fn: str | Callable[..., float] = "math"
  format_weight: float = 0.5
  accuracy_weight: float = 1.0
  num_workers: int = 2
  item_timeout_s: float = 2.0
  kill_grace_s: float = 0.5
  deadline_s: float = 60.0
  mp_context: str = "spawn"
  worker_memory_mb: int | None = 4096
  raise_on_bad_gold: bool = False
  grade: GradeConfig = dataclasses.field(default_factory=GradeConfig)

  def __post_init__(self):
    if self.mp_context not in ("spawn", "forkserver"):
      raise ValueError(f"mp_context must be 'spawn' or 'forkserver' (fork is unsafe after JAX starts its "
                       f"threads), got {self.mp_context!r}")
    if self.num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
    if self.item_timeout_s <= 0 or self.deadline_s <= 0 or self.kill_grace_s < 0:
      raise ValueError(f"timeouts must be positive, got item_timeout_s={self.item_timeout_s}, "
                       f"kill_grace_s={self.kill_grace_s}, deadline_s={self.deadline_s}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RewardConfig":
    """Builds a config from a plain mapping (e.g. `ConfigDict.to_dict()`); `grade` may be a mapping."""
    d = dict(d)
    if isinstance(d.get("grade"), Mapping):
      d["grade"] = GradeConfig(**d["grade"])
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown RewardConfig fields {unknown}; known: {sorted(names)}")
    return cls(**d)
