"""Format supplement: canonical chosen responses pass through; small tag defects are repaired; others refused."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specs_jax.distill import parse, supplement
from specs_jax.rewards import extract_answer, format_reward

B = "\\boxed"
CANON = f"<think>2+2=4</think>\n<answer> The answer is ${B}{{4}}$</answer>"


def test_canonical_form():
  assert supplement.canonical(" 2+2=4 ", "4") == CANON
  assert supplement.is_canonical(CANON)
  out = supplement.supplement(CANON)
  assert out.text == CANON and out.answer == "4" and out.repairs == ()   # unchanged, nothing repaired


@pytest.mark.parametrize("text, repairs", [
    ("2+2=4</think>\n<answer>4</answer>", {"missing_think_open", "answer_rewritten"}),
    ("<think>2+2=4\n<answer> The answer is $\\boxed{4}$</answer>", {"missing_think_close"}),
    ("<think>2+2=4</think>\n<answer> The answer is $\\boxed{4}$", {"missing_answer_close"}),
    ("<think>2+2=4</think> The answer is 4</answer>", {"missing_answer_open"}),
    ("<think>2+2=4. So the answer is 4.</think>", {"missing_answer_tags"}),
    ("<think><think>2+2=4</think></think>\n<answer> The answer is $\\boxed{4}$</answer>", {"duplicate_tags"}),
    ("<think>2+2=4 <answer>4</answer></think>", {"answer_inside_think", "answer_rewritten"}),
    ("<answer>4</answer><think>2+2=4</think>", {"answer_before_think", "answer_rewritten"}),
    ("Sure! <think>2+2=4</think>\n<answer> The answer is $\\boxed{4}$</answer>", {"text_outside_tags"}),
    ("<think>2+2=4</think>\n<answer> The answer is $\\boxed{4}$</answer> Hope it helps.", {"trailing_text"}),
    ("<think>2+2=4</think>\n<answer>4</answer>", {"answer_rewritten"}),
    ("<think> 2+2=4 </think>  <answer> The answer is $\\boxed{4}$</answer>", {"whitespace"}),
])
def test_defects_are_repaired(text, repairs):
  out = supplement.supplement(text)
  assert out is not None, text
  assert format_reward(out.text) == 1.0 and supplement.is_canonical(out.text)
  assert extract_answer(out.text) == out.answer == "4"
  assert set(out.repairs) == repairs, out.repairs
  assert set(supplement.find_defects(text)) == repairs


def test_reasoning_is_kept():
  out = supplement.supplement("<think>2+2=4. So the answer is 4.</think>")
  assert out.text == f"<think>2+2=4. So the answer is 4.</think>\n<answer> The answer is ${B}{{4}}$</answer>"
  out = supplement.supplement("Sure! <think>r1</think> r2 <answer>4</answer> bye")
  assert out.text == f"<think>Sure! r1 r2</think>\n<answer> The answer is ${B}{{4}}$</answer>"


@pytest.mark.parametrize("text", [
    "<think>just thinking</think>",                     # no answer
    "<answer>4</answer>",                               # no reasoning
    "<think> </think><answer>4</answer>",               # blank reasoning
    "2+2=4. Thus, the answer is 4.",                    # no tags at all: not a small defect
    "<think>r</think><answer>a}b</answer>",              # an answer that cannot be boxed
])
def test_refusals(text):
  assert supplement.supplement(text) is None


def test_untagged_allowed_on_request():
  out = supplement.supplement("2+2=4. Thus, the answer is 4.", allow_untagged=True)
  assert out.text == f"<think>2+2=4. Thus, the answer is 4.</think>\n<answer> The answer is ${B}{{4}}$</answer>"


def test_judge_view_repairs_tags_only():
  assert supplement.judge_view("<think>2+2=4 <answer>4</answer></think>") == "<think>2+2=4</think>\n<answer>4</answer>"
  assert supplement.judge_view(CANON) == CANON
  assert supplement.judge_view("no answer") == "no answer"


_PIECES = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "The answer is ", "answer: ", f"{B}{{7}}",
                           f"${B}{{12}}$", " 7.5", "(B)", ".", ". ", "\n", "x", "so", " ", "{", "}", "$"])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_PIECES, max_size=25).map("".join), st.booleans())
def test_output_is_always_canonical(text, allow_untagged):
  out = supplement.supplement(text, allow_untagged=allow_untagged)
  if out is not None:
    assert supplement.is_canonical(out.text) and format_reward(out.text) == 1.0
    assert extract_answer(out.text) == out.answer == parse.final_answer(text)
