"""Format specs: MM-EUREKA's tag rule, the OOD formats, answer extraction."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specs_jax.data import formats
from specs_jax.data.formats import (DEFAULT_FORMAT, OOD_FORMATS, extract_answer_for_format, format_follows,
                                    render_response)

# MM-EUREKA `format_reward_func` (branch qwen), verbatim ...
UPSTREAM_PATTERN = (
    r"^(?=(?:.*<think>){1})(?=(?:.*<\/think>){1})"
    r"(?=(?:.*<answer>){1})(?=(?:.*<\/answer>){1})"
    r"(?!.*<think>.*<think>)"
    r"(?!.*<\/think>.*<\/think>)"
    r"(?!.*<answer>.*<answer>)"
    r"(?!.*<\/answer>.*<\/answer>)"
    r".*<think>(.+?)</think>\s*<answer>.+?</answer>.*$")
# ... with our one change: contents need a non-whitespace character (`\s*\S.*?` instead of `.+?`; the `\S`
# cannot be the `<` of the only closing tag, since the lookaheads allow just one).
REFERENCE_PATTERN = UPSTREAM_PATTERN.replace("(.+?)</think>", r"\s*\S.*?</think>").replace(
    "<answer>.+?</answer>", r"<answer>\s*\S.*?</answer>")


def upstream_follows(text: str) -> bool:
  return re.search(UPSTREAM_PATTERN, text, re.DOTALL) is not None


def reference_follows(text: str) -> bool:
  return re.search(REFERENCE_PATTERN, text, re.DOTALL) is not None


@pytest.mark.parametrize("text, ok", [
    ("<think>x</think>\n<answer> The answer is $\\boxed{3}$</answer>", True),
    ("preamble <think>a\nb</think>  <answer>3</answer> trailing", True),  # text around is allowed upstream
    ("<think> </think><answer>3</answer>", False),  # blank think: upstream's `.+?` accepts it, we do not
    ("<think>x</think><answer>\n\t</answer>", False),  # blank answer
    ("<think></think><answer>3</answer>", False),  # empty think
    ("<think>x</think><answer></answer>", False),  # empty answer
    ("<think>x</think> so <answer>3</answer>", False),  # only whitespace between </think> and <answer>
    ("<think>x</think><think>y</think><answer>3</answer>", False),  # two <think>
    ("<think>x<think>y</think></think><answer>3</answer>", False),  # nested
    ("<answer>3</answer><think>x</think>", False),  # wrong order
    ("<think>x</think><answer>3", False),  # unclosed answer
    ("<think>x</think>\n<answer>3</answer></answer>", False),  # extra closing tag
    ("<THINK>x</THINK><ANSWER>3</ANSWER>", False),  # case-sensitive, as upstream
    ("<think>∠AED = ∠B ⇒ 12</think>\n<answer>１２</answer>", True),  # unicode
    ("The answer is 12.", False),
    ("<think>" + "9" * 100_000 + "</think><answer>" + "9" * 5000 + "</answer>", True),  # huge
])
def test_default_tags_by_hand(text, ok):
  assert format_follows(text) is ok
  assert reference_follows(text) is ok
  blank = re.search(r"<think>\s+</think>|<answer>\s+</answer>", text) is not None
  assert upstream_follows(text) is (ok or blank)  # MM-EUREKA agrees except on blank contents


_PIECES = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "x", " ", "\n", "<", ">", "/", "3",
                           "<thinking>", "think", "answer>"])


@settings(max_examples=600, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_default_tags_equal_reference_regex(text):
  assert format_follows(text, DEFAULT_FORMAT) == reference_follows(text)
  if format_follows(text, DEFAULT_FORMAT):
    assert upstream_follows(text)  # we are never more lenient than MM-EUREKA


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_default_tags_equal_the_rl_format_reward(text):
  """The evaluated format rate and the GRPO format reward use the same rule."""
  reward_format = pytest.importorskip("specs_jax.rewards.format")
  assert format_follows(text, DEFAULT_FORMAT) == reward_format.check_format(text)


def test_other_tag_names_use_the_same_rule():
  spec = {"kind": "tags", "think": "reasoning", "answer": "final"}
  assert format_follows("<reasoning>r</reasoning>\n<final>7</final>", spec)
  assert not format_follows("<think>r</think>\n<answer>7</answer>", spec)
  assert not format_follows("<reasoning>r</reasoning><reasoning>s</reasoning><final>7</final>", spec)
  assert not format_follows("<reasoning>r</reasoning>\n<final>7</final>", DEFAULT_FORMAT)


@pytest.mark.parametrize("text, ok", [
    ("I count 3 circles.\nAnswer: 3", True),
    ("I count 3 circles.\nAnswer: 3\n\n", True),
    ("Answer: 3", False),  # no reasoning line
    ("I count.\nAnswer: 3\nAnswer: 4", False),  # two answer lines
    ("I count.\nAnswer: 3\nDone.", False),  # answer line not last
    ("I count.\nAnswer:", False),  # empty answer
    ("I count.\nanswer: 3", False),  # case-sensitive "Answer:"
])
def test_answer_line(text, ok):
  assert format_follows(text, {"kind": "answer_line"}) is ok


@pytest.mark.parametrize("text, ok", [
    ('{"reasoning": "3 circles", "answer": "3"}', True),
    ('  {"reasoning": "3 circles", "answer": 3}\n', True),
    ('{"reasoning": "3 circles", "answer": "3", "confidence": 1}', False),  # extra key
    ('{"reasoning": "", "answer": "3"}', False),
    ('{"reasoning": "r", "answer": ""}', False),
    ('{"reasoning": "r", "answer": true}', False),
    ('{"reasoning": "r", "answer": [3]}', False),
    ('```json\n{"reasoning": "r", "answer": "3"}\n```', False),  # fenced: not the format
    ('["reasoning", "answer"]', False),
    ('{"reasoning": "r", "answer": "3"', False),
    ('[' * 5000 + ']' * 5000, False),  # deep nesting does not crash
])
def test_json(text, ok):
  assert format_follows(text, {"kind": "json"}) is ok


@pytest.mark.parametrize("text, ok", [
    ("So the final answer is $\\boxed{3}$.", True),
    ("r \\[\\boxed{\\frac{3}{4}}\\]", True),
    ("r \\boxed{3} and \\boxed{4}", False),
    ("r \\boxed{}", False),
    ("r \\boxed{3", False),
    ("<think>r</think>\n<answer> The answer is $\\boxed{3}$</answer>", False),  # the ID format is not this one
    ("r $\\boxed{3}$. Hope this helps!", False),
])
def test_boxed(text, ok):
  assert format_follows(text, {"kind": "boxed"}) is ok


ALL_FORMATS = (DEFAULT_FORMAT,) + OOD_FORMATS


@pytest.mark.parametrize("spec", ALL_FORMATS, ids=formats.format_name)
@pytest.mark.parametrize("answer", ["12", "3/4", "7.5", "B", "yes", "-3", "\\frac{1}{2}"])
def test_render_follows_and_extracts(spec, answer):
  text = render_response("I look at the image. 2 + 1 = 3.\nThen I check.", answer, spec)
  assert format_follows(text, spec)
  assert extract_answer_for_format(text, spec) == answer
  # Each format is told apart from every other one: a response in one format follows no other.
  for other in ALL_FORMATS:
    if other != spec:
      assert not format_follows(text, other), (spec, other)


def test_extraction_is_lenient_where_the_check_is_strict():
  # Unclosed <answer>: MM-EUREKA's fallback takes the text after the last <answer>.
  assert extract_answer_for_format("<think>x</think><answer> The answer is 5.") == "5"
  assert extract_answer_for_format("<think>x</think><answer>$\\boxed{7}$</answer> and <answer>8</answer>") == "8"
  assert extract_answer_for_format("no tags at all, the answer is 5") is None
  assert extract_answer_for_format('```json\n{"reasoning": "r", "answer": 4}\n```', {"kind": "json"}) == "4"
  assert extract_answer_for_format("r\nAnswer: $\\boxed{B}$.\nmore", {"kind": "answer_line"}) == "B"
  assert extract_answer_for_format("r \\boxed{1} then \\boxed{2}", {"kind": "boxed"}) == "2"
  assert extract_answer_for_format('{"answer": null}', {"kind": "json"}) is None


def test_instructions_name_their_tags_and_default_is_specs():
  assert "The response need to enclose within <think> </think> and <answer> </answer> tags" in \
      formats.format_instruction(DEFAULT_FORMAT)
  text = formats.format_instruction({"kind": "tags", "think": "analysis", "answer": "result"})
  assert "<analysis>" in text and "</result>" in text and "<think>" not in text
  assert "Answer:" in formats.format_instruction({"kind": "answer_line"})
  assert '"reasoning"' in formats.format_instruction({"kind": "json"})
  assert len({formats.format_instruction(s) for s in ALL_FORMATS}) == len(ALL_FORMATS)
  json.dumps(list(ALL_FORMATS))  # specs are JSON-able (they go into Example.meta)


@pytest.mark.parametrize("spec", [
    {"kind": "xml"}, {"think": "a"}, {"kind": "tags", "think": "a"}, {"kind": "tags", "think": "a", "answer": "a"},
    {"kind": "tags", "think": "a b", "answer": "c"}, {"kind": "json", "think": "a"}, "json",
])
def test_bad_specs_are_rejected(spec):
  with pytest.raises(ValueError):
    format_follows("x", spec)
