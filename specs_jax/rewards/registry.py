"""Reward functions by name, so a config can say `format_fn="think_answer"`, `accuracy_fn="math"`.

Two tables, both read-only:
- FORMAT_REWARDS: name -> `(text) -> float`.
- ACCURACY_GRADERS: name -> `(answer: str | None, gold: str, config: GradeConfig) -> float`, applied to
  the extracted answer (`extract.extract_answer`). The pool ships the name to its workers, so these
  are plain top-level functions.
`reward_fn(name)` gives any entry of either table as a uniform `(text, gold) -> float`.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from specs_jax.rewards import accuracy, extract
from specs_jax.rewards import format as format_lib
from specs_jax.rewards.config import GradeConfig

__all__ = ["ACCURACY_GRADERS", "FORMAT_REWARDS", "accuracy_grader", "format_reward_fn", "names", "reward_fn"]


def _answer_tag_reward(text: str) -> float:
  return float(format_lib.check_format(text, format_lib.ANSWER_ONLY))


FORMAT_REWARDS = types.MappingProxyType({
    "think_answer": format_lib.format_reward,     # SPECS / MM-EUREKA: <think>…</think><answer>…</answer>
    "answer_tag": _answer_tag_reward,             # exactly one non-empty <answer>…</answer>
    "boxed": format_lib.boxed_format_reward,      # exactly one non-empty \boxed{} in the answer
})

ACCURACY_GRADERS = types.MappingProxyType({
    "math": accuracy.grade_answer,      # choice letters, words, math-verify (the default)
    "choice": accuracy.grade_choice,    # multiple choice only; a non-letter gold is an error
    "exact": accuracy.grade_exact,      # normalised string equality
})


def _unknown(kind: str, name: object, table) -> ValueError:
  return ValueError(f"unknown {kind} {name!r}; known: {sorted(table)}")


def format_reward_fn(name: str) -> Callable[[str], float]:
  """The format reward registered as `name`. Raises ValueError listing the known names."""
  if name not in FORMAT_REWARDS:
    raise _unknown("format reward", name, FORMAT_REWARDS)
  return FORMAT_REWARDS[name]


def accuracy_grader(name: str) -> Callable[[str | None, str, GradeConfig], float]:
  """The accuracy grader registered as `name`. Raises ValueError listing the known names."""
  if name not in ACCURACY_GRADERS:
    raise _unknown("accuracy grader", name, ACCURACY_GRADERS)
  return ACCURACY_GRADERS[name]


def names() -> dict[str, list[str]]:
  """{"format": [...], "accuracy": [...]}."""
  return {"format": sorted(FORMAT_REWARDS), "accuracy": sorted(ACCURACY_GRADERS)}


def reward_fn(name: str, config: GradeConfig | None = None) -> Callable[[str, str | None], float]:
  """Any registered reward as `(text, gold) -> float` (in-process). Format rewards ignore gold."""
  if name in FORMAT_REWARDS:
    fn = FORMAT_REWARDS[name]
    return lambda text, gold=None: fn(text)
  if name in ACCURACY_GRADERS:
    grader = ACCURACY_GRADERS[name]
    return lambda text, gold: grader(extract.extract_answer(text), gold, config)
  raise _unknown("reward", name, {**FORMAT_REWARDS, **ACCURACY_GRADERS})
