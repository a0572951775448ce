"""Registry names, the total reward and its config."""

import pytest

from specs_jax import rewards
from specs_jax.rewards import registry

GOOD = "<think> 2+2 </think>\n<answer> The answer is $\\boxed{4}$</answer>"


def test_names_resolve():
  assert registry.names() == {"format": ["answer_tag", "boxed", "think_answer"],
                              "accuracy": ["choice", "exact", "math"]}
  assert registry.format_reward_fn("think_answer") is rewards.format_reward
  assert registry.accuracy_grader("math") is rewards.grade_answer


@pytest.mark.parametrize("name,text,gold,expected", [
    ("think_answer", GOOD, None, 1.0),
    ("think_answer", "<answer>4</answer>", None, 0.0),
    ("answer_tag", "<answer>4</answer>", None, 1.0),
    ("boxed", GOOD, None, 1.0),
    ("math", GOOD, "4", 1.0),
    ("math", GOOD, "5", 0.0),
    ("choice", "<answer>(C)</answer>", "C", 1.0),
    ("exact", "<answer>Red Cube</answer>", "red cube", 1.0),
    ("exact", "<answer>red cubes</answer>", "red cube", 0.0),
])
def test_reward_fn_by_name(name, text, gold, expected):
  assert registry.reward_fn(name)(text, gold) == expected


def test_choice_grader_refuses_non_letter_gold():
  with pytest.raises(ValueError, match="'4' is not a choice letter"):
    registry.reward_fn("choice")(GOOD, "4")


def test_unknown_names_list_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown reward 'acc'; known: \['answer_tag', 'boxed', 'choice', 'exact'"):
    registry.reward_fn("acc")
  with pytest.raises(ValueError, match=r"known: \['answer_tag', 'boxed', 'think_answer'\]"):
    registry.format_reward_fn("format")


def test_tables_are_read_only():
  with pytest.raises(TypeError):
    registry.FORMAT_REWARDS["mine"] = len


def test_total_reward_weights():
  # 0.5 * format + 1.0 * accuracy: right and well formed = 1.5; right without tags = 1.0 (boxed
  # fallback, no format); wrong but well formed = 0.5.
  assert rewards.total_reward(GOOD, "4") == 1.5
  assert rewards.total_reward("so $\\boxed{4}$", "4") == 1.0
  assert rewards.total_reward(GOOD, "5") == 0.5
  cfg = rewards.RewardConfig(format_weight=0.1, accuracy_weight=2.0, format_fn="answer_tag")
  assert rewards.total_reward("<answer>4</answer>", "4", cfg) == pytest.approx(2.1)


def test_config_from_dict_and_validation():
  cfg = rewards.RewardConfig.from_dict({"format_weight": 0.25, "grade": {"rel_tol": 0.01}})
  assert cfg.format_weight == 0.25 and cfg.grade.rel_tol == 0.01 and cfg.accuracy_weight == 1.0
  with pytest.raises(ValueError, match="unknown RewardConfig fields \\['format_weigth'\\]"):
    rewards.RewardConfig.from_dict({"format_weigth": 0.25})
  with pytest.raises(ValueError, match="rel_tol"):
    rewards.GradeConfig(rel_tol=-1)
  with pytest.raises(ValueError, match="choice_letters"):
    rewards.GradeConfig(choice_letters="abc")
  with pytest.raises(ValueError, match="timeouts"):
    rewards.RewardConfig(item_timeout_s=0)


def test_public_api_and_no_jax():
  import subprocess
  import sys
  code = ("import sys; from specs_jax import rewards; "
          "assert rewards.format_reward('<think>a</think><answer>b</answer>') == 1.0; "
          "assert rewards.accuracy_reward('<answer>1</answer>', '1') == 1.0; "
          "assert 'jax' not in sys.modules, 'rewards imported jax'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
