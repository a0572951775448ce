"""Format rewards: the MM-EUREKA think -> answer rule, other tag pairs, adversarial strings."""

import time

import pytest

from specs_jax import rewards

GOOD = "<think> Since 1+1=2. </think>\n<answer> The answer is $\\boxed{2}$</answer>"

FORMAT_CASES = {
    "canonical": (GOOD, 1.0),
    "no_whitespace_between": ("<think>a</think><answer>b</answer>", 1.0),
    "prefix_and_suffix_allowed": ("Sure! <think>a</think> <answer>b</answer> bye", 1.0),   # upstream `.*`
    "multiline_content": ("<think>\nline 1\nline 2\n</think>\n\n<answer>\n42\n</answer>", 1.0),
    "unicode_content": ("<think>\u6570\u5b66 \U0001F642</think><answer>\u2212\u0033</answer>", 1.0),
    "answer_first": ("<answer>b</answer><think>a</think>", 0.0),
    "text_between_sections": ("<think>a</think> so <answer>b</answer>", 0.0),
    "missing_think": ("<answer>b</answer>", 0.0),
    "missing_answer": ("<think>a</think>", 0.0),
    "missing_close_answer": ("<think>a</think><answer>b", 0.0),
    "missing_open_think": ("a</think><answer>b</answer>", 0.0),
    "empty_think": ("<think></think><answer>b</answer>", 0.0),
    "blank_think": ("<think>  \n </think><answer>b</answer>", 0.0),          # upstream's .+? accepts this
    "empty_answer": ("<think>a</think><answer></answer>", 0.0),
    "two_answers": ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
    "two_thinks": ("<think>a</think><think>a</think><answer>b</answer>", 0.0),
    "nested_answer_in_think": ("<think><answer>x</answer></think><answer>b</answer>", 0.0),
    "close_before_open": ("</think>a<think><answer>b</answer>", 0.0),
    "upper_case_tags": ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),
    "spaced_tags": ("< think >a</ think ><answer>b</answer>", 0.0),
    "empty_string": ("", 0.0),
}


@pytest.mark.parametrize("text,expected", list(FORMAT_CASES.values()), ids=list(FORMAT_CASES))
def test_format_reward(text, expected):
  assert rewards.format_reward(text) == expected


def test_other_tag_pairs():
  assert rewards.tag_format_reward("<answer>4</answer>", (("<answer>", "</answer>"),)) == 1.0
  assert rewards.tag_format_reward("<answer>4</answer><answer>5</answer>", (("<answer>", "</answer>"),)) == 0.0
  two = (("<reasoning>", "</reasoning>"), ("<final>", "</final>"))
  assert rewards.tag_format_reward("<reasoning>r</reasoning><final>f</final>", two) == 1.0
  assert rewards.tag_format_reward("<final>f</final><reasoning>r</reasoning>", two) == 0.0
  assert rewards.tag_format_reward(GOOD, two) == 0.0


def test_tag_format_options():
  strict = rewards.TagFormat(allow_prefix=False, allow_suffix=False)
  assert rewards.check_format(GOOD, strict)
  assert not rewards.check_format("hi " + GOOD, strict)
  assert not rewards.check_format(GOOD + " bye", strict)
  assert rewards.check_format("<think>a</think> so <answer>b</answer>", rewards.TagFormat(allow_between=True))
  with pytest.raises(ValueError, match="distinct"):
    rewards.TagFormat(sections=(("<a>", "<a>"),))


def test_boxed_format():
  assert rewards.boxed_format_reward(GOOD) == 1.0
  assert rewards.boxed_format_reward("<answer>2</answer>") == 0.0
  assert rewards.boxed_format_reward("<answer>\\boxed{}</answer>") == 0.0
  assert rewards.boxed_format_reward("<answer>\\boxed{1} \\boxed{2}</answer>") == 0.0
  assert rewards.boxed_format_reward("text \\boxed{1}") == 1.0


@pytest.mark.parametrize("text", [
    "<think>" * 200_000 + "</think>" * 200_000 + "<answer>x</answer>",
    "<think>" + "a" * 1_000_000 + "</think><answer>" + "{" * 500_000 + "</answer>",
    "<think>" + "\U0001F642" * 250_000 + "</think><answer>1</answer>",
])
def test_adversarial_strings_are_fast(text):
  t0 = time.perf_counter()
  rewards.format_reward(text)
  rewards.boxed_format_reward(text)
  assert time.perf_counter() - t0 < 1.0


def test_megabyte_valid_response_still_scores():
  assert rewards.format_reward("<think>" + "a" * 1_000_000 + "</think><answer>1</answer>") == 1.0
