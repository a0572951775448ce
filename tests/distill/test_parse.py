"""parse.final_answer / split_response: the tolerant reading that the answer filter and the rewrites share."""

import pytest

from specs_jax.distill import parse
from specs_jax.rewards import extract_answer

B = "\\boxed"


@pytest.mark.parametrize("text, answer", [
    (f"<think>2+2=4</think>\n<answer> The answer is ${B}{{4}}$</answer>", "4"),           # canonical
    ("We add 2 and 2. Thus, the answer is 4.", "4"),                                       # plain prose
    ("The answer is 7.5.", "7.5"),                                                  # "7.5" does not end a sentence
    ("<think>2+2=4 <answer>4</answer></think>", "4"),                                      # answer inside think
    ("<think><think>r</think></think><answer><answer>4</answer></answer>", "4"),           # nested tags
    ("<think>r<answer> The answer is 4", "4"),                                              # unclosed tags
    (f"<think>first ${B}{{5}}$, then 4</think><answer>4</answer>", "4"),                    # span beats think
    (f"first ${B}{{5}}$ but in the end the answer is 4. Done.", "4"),                       # later anchor beats box
    (f"the answer is 5, no: ${B}{{6}}$", "6"),                                              # later box beats anchor
    ("Counting: 3 red. So the answer is the red cube, option B.", "the red cube, option B"),
    ("reasoning\nAnswer: yes", "yes"),
    (f"<answer>{B}{{\\frac{{1}}{{2}}}}</answer>", "\\frac{1}{2}"),
])
def test_final_answer(text, answer):
  assert parse.final_answer(text) == answer


@pytest.mark.parametrize("text", [
    "no answer here",
    "<think>only reasoning</think>",
    "<answer></answer>",
    "The answer is",                     # an anchor with nothing after it
    "<answer>x. the answer is</answer>",  # junk: an anchor inside the answer
    "<answer>a}b</answer>",               # unbalanced braces
])
def test_no_final_answer(text):
  assert parse.final_answer(text) is None
  assert parse.split_response(text) is None


def test_looser_than_the_reward_but_equal_on_the_format():
  plain = "2+2=4. Thus, the answer is 4."
  assert extract_answer(plain) is None and parse.final_answer(plain) == "4"
  tagged = f"<think>2+2=4</think>\n<answer> The answer is ${B}{{4}}$</answer>"
  assert extract_answer(tagged) == parse.final_answer(tagged) == "4"


def test_split_parts():
  p = parse.split_response(f"Sure! <think>r1</think> mid <answer>The answer is ${B}{{4}}$</answer> bye")
  assert (p.reasoning, p.statement, p.answer, p.tagged, p.trailing) == (
      "Sure! r1 mid", f"The answer is ${B}{{4}}$", "4", True, "bye")
  # text after the answer block counts as reasoning when it holds think tags (answer before / inside think)
  p = parse.split_response("<answer>4</answer>\n<think>because 2+2</think>")
  assert (p.reasoning, p.statement, p.trailing) == ("because 2+2", "4", "")
  p = parse.split_response("<think>a. b</think> So the answer is 4. Bye")
  assert (p.reasoning, p.statement, p.tagged) == ("a.", "b So the answer is 4. Bye", False)
  p = parse.split_response("2+2=4.\nThus, the answer is 4.")
  assert (p.reasoning, p.statement) == ("2+2=4.", "Thus, the answer is 4.")


def test_strip_tags_and_plain_answers():
  assert parse.strip_tags("<think>a</think><answer>b</answer>") == "ab"
  assert parse.is_plain_answer("7.5") and parse.is_plain_answer("\\frac{1}{2}")
  for junk in ("", "a\nb", "3. 4", "x}", "the answer is 3", "<answer>3", f"{B}{{3}}"):
    assert not parse.is_plain_answer(junk), junk
