"""Format pollution: each corruption on its own (edge cases included), the seeded mix, and a property test."""

import collections
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specs_jax.distill import parse, pollution
from specs_jax.rewards import accuracy, format_reward

B = "\\boxed"
T0, T1, A0, A1 = "<think>", "</think>", "<answer>", "</answer>"

# (name, response, gold): every shape a base-model rollout can take.
INPUTS = [
    ("canonical", f"<think>2+2=4</think>\n<answer> The answer is ${B}{{4}}$</answer>", "4"),
    ("plain_prose", "We add 2 and 2, which gives 4. Thus, the answer is 4.", "4"),
    ("answer_in_think", "<think>2+2=4 <answer>4</answer></think>", "4"),
    ("nested_tags", f"<think><think>2+2=4</think></think>\n<answer><answer>The answer is ${B}{{4}}$</answer></answer>",
     "4"),
    ("unclosed_tags", "<think>2+2=4\n<answer> The answer is 4", "4"),
    ("answer_tag_only", "<answer>4</answer>", "4"),
    ("bare_answer_with_box_in_think", f"<think>first I got ${B}{{5}}$, then 4</think><answer>4</answer>", "4"),
    ("think_only", "<think>2+2=4. So the answer is 4.</think>", "4"),
    ("swapped", "<answer>4</answer>\n<think>2+2=4</think>", "4"),
    ("choice", "The red cube is largest, option B. Thus, the answer is B.", "B"),
    ("fraction", f"<think>3 of 4</think><answer> The answer is ${B}{{\\frac{{3}}{{4}}}}$</answer>", "3/4"),
    ("decimal", "Half of 15 is 7.5.\nAnswer: 7.5", "7.5"),
    ("yes_no", "<think>There is a red cube.</think> <answer>yes</answer> Hope this helps.", "yes"),
]
VARIANTS = [(k, v) for k in pollution.KINDS for v in (pollution.MISPLACE_VARIANTS if k == "misplace_tags" else [None])]


def _corrupt(kind, variant, text):
  return pollution.corrupt(text, kind, variant).text


@pytest.mark.parametrize("kind, variant", VARIANTS)
@pytest.mark.parametrize("name, text, gold", INPUTS, ids=[i[0] for i in INPUTS])
def test_every_corruption_breaks_format_and_keeps_the_answer(kind, variant, name, text, gold):
  out = _corrupt(kind, variant, text)
  assert format_reward(out) == 0.0, out
  answer = parse.final_answer(out)
  assert answer == parse.final_answer(text), out
  assert answer in out                                   # the answer text is still there ...
  assert accuracy.grade_answer(answer, gold) == 1.0       # ... and still correct


@pytest.mark.parametrize("name, text, gold", INPUTS, ids=[i[0] for i in INPUTS])
def test_remove_all_tags(name, text, gold):
  out = pollution.remove_all_tags(text)
  assert not parse.has_tags(out)
  if name == "plain_prose":
    assert out == text                                   # nothing to remove: left as it is


def test_remove_all_tags_names_a_bare_answer():
  # "<answer>4</answer>" alone would leave a bare "4" after the reasoning; it is written as a statement.
  assert pollution.remove_all_tags("<think>r with 5</think><answer>4</answer>") == "r with 5\nThe answer is 4"


@pytest.mark.parametrize("name, text, gold", INPUTS, ids=[i[0] for i in INPUTS])
def test_remove_answer_tags(name, text, gold):
  out = pollution.remove_answer_tags(text)
  assert out.count(T0) == out.count(T1) == 1 and A0 not in out and A1 not in out
  assert out.startswith(T0)


@pytest.mark.parametrize("name, text, gold", INPUTS, ids=[i[0] for i in INPUTS])
def test_remove_think_tags(name, text, gold):
  out = pollution.remove_think_tags(text)
  assert out.count(A0) == out.count(A1) == 1 and T0 not in out and T1 not in out
  assert out.endswith(A1)


@pytest.mark.parametrize("name, text, gold", INPUTS, ids=[i[0] for i in INPUTS])
def test_answer_line(name, text, gold):
  out = pollution.answer_line(text)
  assert A0 not in out and A1 not in out and out.count(T0) == out.count(T1) == 1
  assert out.splitlines()[-1] == f"Answer: {parse.final_answer(text)}"


@pytest.mark.parametrize("name, text, gold", INPUTS, ids=[i[0] for i in INPUTS])
@pytest.mark.parametrize("variant", pollution.MISPLACE_VARIANTS)
def test_misplace_tags(name, text, gold, variant):
  out = pollution.misplace_tags(text, variant)
  assert all(out.count(t) == 1 for t in (T0, T1, A0, A1)), out   # every tag present once: only the places are wrong
  t0, t1, a0, a1 = (out.index(t) for t in (T0, T1, A0, A1))
  expected_order = {"swap": a0 < a1 < t0 < t1, "answer_in_think": t0 < a0 < a1 < t1,
                    "interleave": t0 < a0 < t1 < a1, "empty_think": t1 == t0 + len(T0) < a0 < a1}
  assert expected_order[variant], out


def test_edge_cases_by_hand():
  assert pollution.misplace_tags("<think>r <answer>4</answer></think>", "swap") == \
      "<answer>4</answer>\n<think>r</think>"
  assert pollution.remove_answer_tags("<think><think>r</think></think><answer><answer>4</answer></answer>") == \
      "<think>r</think>\nThe answer is 4"
  assert pollution.remove_think_tags("We add. Thus, the answer is 4.") == \
      "We add.\n<answer>Thus, the answer is 4.</answer>"
  assert pollution.answer_line(f"<think>r</think><answer>The answer is ${B}{{4}}$</answer>") == \
      "<think>r</think>\nAnswer: 4"
  # empty reasoning still gives a format failure (an empty <think> fails the reward)
  out = pollution.remove_answer_tags("<answer>4</answer>")
  assert out == "<think></think>\nThe answer is 4" and format_reward(out) == 0.0


@pytest.mark.parametrize("kind, variant", VARIANTS)
def test_no_answer_gives_none(kind, variant):
  assert pollution.corrupt("<think>just thinking</think>", kind, variant) is None


def test_bad_names_raise():
  with pytest.raises(ValueError, match="unknown corruption"):
    pollution.corrupt("x. The answer is 4.", "shuffle_words")
  with pytest.raises(ValueError, match="unknown misplacement"):
    pollution.misplace_tags("x. The answer is 4.", "sideways")
  with pytest.raises(ValueError, match="no variants"):
    pollution.corrupt("x. The answer is 4.", "answer_line", "swap")


def test_mix_is_seeded_and_follows_the_weights():
  draws = [pollution.draw_kind(random.Random(f"s:{i}")) for i in range(1000)]
  assert draws == [pollution.draw_kind(random.Random(f"s:{i}")) for i in range(1000)]   # seeded
  kinds = collections.Counter(k for k, _ in draws)
  assert set(kinds) == set(pollution.KINDS)
  assert all(140 <= kinds[k] <= 260 for k in pollution.KINDS), kinds                   # 200 +- 4.5 sd
  variants = collections.Counter(v for k, v in draws if k == "misplace_tags")
  assert set(variants) == set(pollution.MISPLACE_VARIANTS)
  assert all(v is None for k, v in draws if k != "misplace_tags")

  rng = random.Random(0)
  only = [pollution.draw_kind(rng, {"answer_line": 1.0, "remove_all_tags": 3.0})[0] for _ in range(800)]
  counts = collections.Counter(only)
  assert set(counts) == {"answer_line", "remove_all_tags"} and 500 <= counts["remove_all_tags"] <= 700


def test_pollute_draws_and_applies():
  text = "We add 2 and 2. Thus, the answer is 4."
  outs = [pollution.pollute(text, random.Random(i)) for i in range(60)]
  assert {o.kind for o in outs} == set(pollution.KINDS)
  assert all(format_reward(o.text) == 0.0 and parse.final_answer(o.text) == "4" for o in outs)
  assert [o.text for o in outs] == [pollution.pollute(text, random.Random(i)).text for i in range(60)]


@pytest.mark.parametrize("weights, match", [({"remove_everything": 1.0}, "unknown corruption kinds"),
                                            ({"answer_line": -1.0}, ">= 0"),
                                            ({k: 0.0 for k in pollution.KINDS}, "positive sum")])
def test_bad_weights(weights, match):
  with pytest.raises(ValueError, match=match):
    pollution.validate_weights(weights)


_PIECES = st.sampled_from([T0, T1, A0, A1, "The answer is ", "answer: ", "Final answer is", f"{B}{{7}}", f"${B}{{12}}$",
                           f"{B}{{{B}{{3}}}}", "\\fbox{x}", f"{B} 5", " 7.5", "(B)", "?", ".", ". ", "\n", "x", "so",
                           " ", "=", "{", "}", "$", "\\frac{1}{2}"])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_guarantees_hold_for_any_text(text):
  answer = parse.final_answer(text)
  for kind, variant in VARIANTS:
    out = pollution.corrupt(text, kind, variant)
    if answer is None:
      assert out is None
    else:
      assert format_reward(out.text) == 0.0 and parse.final_answer(out.text) == answer, (kind, variant, out.text)
