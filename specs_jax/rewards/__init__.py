r"""Verifiable rewards for GRPO (RECIPE.md §5): format, accuracy, judges. Host-side, no JAX.

    from specs_jax import rewards
    rewards.format_reward(text) -> float          # 1.0 iff one non-empty <think>…</think> then <answer>…</answer>
    rewards.accuracy_reward(text, gold) -> float  # 1.0 iff the final answer matches gold (math-verify / choice)
    rewards.total_reward(text, gold)              # 0.5 * format + 1.0 * accuracy (RewardConfig weights)
    rewards.extract_answer(text) -> str | None    # e.g. the \boxed{} content inside <answer>
    rewards.grade_batch(texts, golds, config, pool=pool)   # process pool, timeouts -> (BatchRewards, GradeStats)
    rewards.make_judge("rule" | "openai", ...)    # free-form grading and reasoning/answer consistency

Modules: format.py, extract.py, accuracy.py, pool.py, registry.py, judge.py (+ judge_rules.py), config.py.
"""

from specs_jax.rewards import registry
from specs_jax.rewards.accuracy import (Gold, GoldError, accuracy_reward, grade_answer, guard_reason,
                                        parse_gold, validate_gold)
from specs_jax.rewards.config import GradeConfig, RewardConfig
from specs_jax.rewards.extract import answer_span, choice_letter, extract_answer, think_span
from specs_jax.rewards.format import (ANSWER_ONLY, THINK_ANSWER, TagFormat, boxed_format_reward, check_format,
                                      format_reward, tag_format_reward)
from specs_jax.rewards.judge import JudgeConfig, OpenAIJudge, Verdict, make_judge
from specs_jax.rewards.judge_rules import RuleJudge
from specs_jax.rewards.pool import BatchRewards, GradeStats, RewardPool, grade_batch


def total_reward(text: str, gold: str, config: RewardConfig | None = None) -> float:
  """format_weight * format + accuracy_weight * accuracy, in-process (defaults 0.5 and 1.0).

  Uses the registry names in `config`; for batches and untrusted text prefer `grade_batch`.
  """
  config = config or RewardConfig()
  fmt = registry.format_reward_fn(config.format_fn)(text)
  grader = registry.accuracy_grader(config.accuracy_fn) if isinstance(config.accuracy_fn, str) else config.accuracy_fn
  acc = grader(extract_answer(text), gold, config.grade)
  return config.format_weight * fmt + config.accuracy_weight * acc


__all__ = [
    "ANSWER_ONLY", "THINK_ANSWER", "BatchRewards", "Gold", "GoldError", "GradeConfig", "GradeStats",
    "JudgeConfig", "OpenAIJudge", "RewardConfig", "RewardPool", "RuleJudge", "TagFormat", "Verdict",
    "accuracy_reward", "answer_span", "boxed_format_reward", "check_format", "choice_letter",
    "extract_answer", "format_reward", "grade_answer", "grade_batch", "guard_reason", "make_judge",
    "parse_gold", "registry", "tag_format_reward", "think_span", "total_reward", "validate_gold",
]
