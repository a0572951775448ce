r"""Accuracy reward: a table of grading cases, answer extraction, bad golds, adversarial inputs."""

import builtins
import re
import threading
import time

import pytest
import sympy.parsing.sympy_parser
from math_verify import parser as mv_parser

from specs_jax import rewards
from specs_jax.rewards import accuracy, extract


def resp(answer: str) -> str:
  """The SPECS answer format around `answer` (RECIPE.md §5)."""
  return f"<think> Let me work it out. </think>\n<answer> {answer}</answer>"


def boxed(x: str) -> str:
  return resp(f"The answer is $\\boxed{{{x}}}$")


# (response, gold, expected reward). Ids name what each case checks.
CASES = {
    # numbers: equal / unequal, fractions vs decimals
    "int_equal": (boxed("5"), "5", 1.0),
    "int_unequal": (boxed("6"), "5", 0.0),
    "paren_boxed": (resp(r"The answer is \(\boxed{5}\)"), "5", 1.0),
    "decimal_vs_fraction": (boxed("0.75"), "3/4", 1.0),
    "latex_frac_vs_decimal": (boxed(r"\frac{3}{4}"), "0.75", 1.0),
    "decimal_off": (boxed("0.76"), "3/4", 0.0),
    "dfrac": (boxed("0.5"), r"\dfrac{1}{2}", 1.0),
    "unreduced_frac": (boxed(r"\frac{6}{8}"), "3/4", 1.0),
    "third_6_places": (boxed(r"\frac{1}{3}"), "0.333333", 1.0),   # math-verify rounds floats to 6 places
    "third_2_places": (boxed("0.33"), "1/3", 0.0),                # ... so 0.33 is not 1/3 by default
    "negative": (boxed("-3"), "-3", 1.0),
    "unicode_minus": (boxed("\u22123"), "-3", 1.0),
    "sign_matters": (boxed("3"), "-3", 0.0),
    "thousands_sep": (boxed("1,000"), "1000", 1.0),
    "scientific": (resp("1e3"), "1000", 1.0),
    "trailing_zero": (boxed("3.0"), "3", 1.0),
    "trailing_zeros_decimal": (boxed("2.50"), "2.5", 1.0),
    "percent_vs_decimal": (boxed(r"50\%"), "0.5", 1.0),
    "full_width_digit": (boxed("\uff19"), "9", 1.0),
    "plain_number_no_box": (resp("42"), "42", 1.0),
    "sentence_number": (resp("The answer is 4."), "4", 1.0),
    # LaTeX, units, relations, intervals, sets
    "sqrt_forms": (boxed(r"\sqrt{2}/2"), r"\frac{\sqrt{2}}{2}", 1.0),
    "sqrt_simplify": (boxed(r"2\sqrt{3}"), r"\sqrt{12}", 1.0),
    "pi_not_314": (boxed(r"\pi"), "3.14", 0.0),
    "units_word": (boxed("5 cm"), "5", 1.0),
    "units_text": (boxed(r"5\text{ cm}"), "5", 1.0),
    "degrees_circ": (boxed(r"45^\circ"), "45", 1.0),
    "degrees_sign": (resp("45\u00b0"), "45", 1.0),
    "assignment": (boxed("x = 5"), "5", 1.0),
    "polynomial_commutes": (boxed("x^2+1"), "1+x^2", 1.0),
    "interval_equal": (boxed("[1, 2)"), "[1,2)", 1.0),
    "interval_open_vs_closed": (boxed("(1, 2)"), "[1, 2]", 0.0),
    "interval_infinite": (boxed(r"(-\infty, 3]"), r"(-\infty,3]", 1.0),
    "set_order_free": (boxed(r"\{2, 1\}"), r"\{1,2\}", 1.0),
    "set_unequal": (boxed(r"\{1, 3\}"), r"\{1,2\}", 0.0),
    "gold_in_dollars": (boxed("0.5"), r"$\frac{1}{2}$", 1.0),
    "gold_boxed": (boxed("12"), r"\boxed{12}", 1.0),
    "answer_in_dollars_period": (resp(r"$\frac{1}{2}$."), "0.5", 1.0),
    # multiple choice, many spellings
    "mc_boxed": (boxed("A"), "A", 1.0),
    "mc_paren_boxed": (resp(r"The answer is \(\boxed{A}\)"), "A", 1.0),
    "mc_the_answer_is": (resp("The answer is D"), "D", 1.0),
    "mc_parenthesised": (resp("(B)"), "B", 1.0),
    "mc_full_stop": (resp("B."), "B", 1.0),
    "mc_lower_case": (resp("b"), "B", 1.0),
    "mc_letter_and_option_text": (resp("(B) 45\u00b0"), "B", 1.0),
    "mc_letter_dot_text_vs_gold_with_text": (resp("B. 45"), "(B) 45", 1.0),
    "mc_option_text_only": (resp("45"), "(B) 45", 1.0),
    "mc_wrong_option_text": (resp("46"), "(B) 45", 0.0),
    "mc_answer_colon": (resp("Answer: C"), "C", 1.0),
    "mc_option_word": (resp("option C"), "C", 1.0),
    "mc_text_in_box": (boxed(r"\text{C}"), "C", 1.0),
    "mc_gold_boxed": (resp("C"), r"\boxed{C}", 1.0),
    "mc_gold_lower_paren": (resp("C"), "(c)", 1.0),
    "mc_wrong_letter": (boxed("C"), "D", 0.0),
    "mc_two_letters_or": (resp("A or B"), "A", 0.0),
    "mc_two_options_and": (resp("(A) and (C)"), "A", 0.0),
    "mc_letter_in_sentence": (resp("I choose C since it is the largest"), "C", 1.0),
    "mc_number_for_letter_gold": (boxed("4"), "B", 0.0),
    # plain words
    "word_yes": (resp("Yes."), "yes", 1.0),
    "word_no_vs_yes": (resp("No"), "yes", 0.0),
    "word_text_command": (boxed(r"\text{Red}"), "red", 1.0),
    # missing tags, empty answers
    "no_tags_sentence": ("The answer is 5", "5", 0.0),
    "no_tags_boxed": (r"so it is $\boxed{5}$", "5", 1.0),
    "unclosed_answer": ("<think> ok </think><answer> The answer is $\\boxed{5}$", "5", 1.0),
    "think_only": ("<think> the answer is 5 </think>", "5", 0.0),
    "empty_answer": ("<think> x </think><answer></answer>", "5", 0.0),
    "blank_answer": ("<think> x </think><answer>   </answer>", "5", 0.0),
    "empty_box": (boxed(""), "5", 0.0),
    # multiple answers
    "two_answer_tags_last_right": ("<answer>4</answer><answer>5</answer>", "5", 1.0),
    "two_answer_tags_last_wrong": ("<answer>4</answer><answer>5</answer>", "4", 0.0),
    "two_different_boxes": (resp(r"\boxed{3} or \boxed{4}"), "4", 0.0),
    "same_box_twice": (resp(r"\boxed{4}, that is \boxed{4}"), "4", 1.0),
    "two_numbers": (resp("3 and 4"), "4", 0.0),
    "escaped_braces_in_box": (boxed(r"\{1,2\}"), r"\{1,2\}", 1.0),
    # adversarial: all score 0 (and return promptly, see below)
    "power_tower": (boxed("9^9^9^9"), "5", 0.0),
    "braced_power_tower": (boxed("10^{10^{10}}"), "5", 0.0),
    "huge_exponent": (boxed("2^{123456789}"), "5", 0.0),
    "emoji": (resp("\U0001F642\U0001F642"), "5", 0.0),
    "python_code": (resp("__import__('os').system('true')"), "0", 0.0),
}


@pytest.mark.parametrize("text,gold,expected", list(CASES.values()), ids=list(CASES))
def test_accuracy_table(text, gold, expected):
  assert rewards.accuracy_reward(text, gold) == expected


def test_table_is_large_and_balanced():
  scores = [e for _, _, e in CASES.values()]
  assert len(scores) >= 60
  assert 20 <= sum(scores) <= len(scores) - 20      # a grader that always says 1 (or 0) fails many


def test_no_python_evaluation(monkeypatch):
  """The whole table grades the same while eval, exec and parse_expr are booby-trapped.

  The one eval on the path is SymPy's own: latex2sympy turns a NUMBER token of its LaTeX lexer into
  `sympy.Number(token)`, which goes through `parse_expr`. The trap lets exactly that through (the
  string must be a plain decimal literal) and fails on anything else, including math-verify's
  plain-expression path (`math_verify.parser.parse_expr`), which we never use.
  """
  real_parse_expr, real_eval, real_exec = sympy.parsing.sympy_parser.parse_expr, builtins.eval, builtins.exec
  vetted = threading.local()
  seen = []

  def guarded_parse_expr(s, *args, **kwargs):
    if not (isinstance(s, str) and re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", s)):
      raise AssertionError(f"parse_expr on a non-literal: {s!r:.80}")
    seen.append(s)
    vetted.on = True
    try:
      return real_parse_expr(s, *args, **kwargs)
    finally:
      vetted.on = False

  def guard(real):
    def guarded(*args, **kwargs):
      if not getattr(vetted, "on", False):
        raise AssertionError(f"{real.__name__}: {args[:1]!r:.80}")
      return real(*args, **kwargs)
    return guarded

  def trap(*args, **kwargs):
    raise AssertionError(f"called with {args[:1]!r:.80}")

  monkeypatch.setattr(builtins, "eval", guard(real_eval))
  monkeypatch.setattr(builtins, "exec", guard(real_exec))   # parse_expr runs `from sympy import *`
  monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", guarded_parse_expr)
  monkeypatch.setattr(mv_parser, "parse_expr", trap)
  accuracy._parse_gold_cached.cache_clear()
  mv_parser.parse_latex_cached.cache_clear()
  mv_parser.parse_expr_cached.cache_clear()
  for name, (text, gold, expected) in CASES.items():
    assert rewards.accuracy_reward(text, gold) == expected, name
  assert seen                               # the trap was on the path, so it could have fired


def test_code_in_answer_has_no_effect(tmp_path):
  target = tmp_path / "pwned"
  payloads = [f"__import__('pathlib').Path('{target}').touch()",
              f"(lambda: open('{target}', 'w'))()",
              f"$\\boxed{{__import__('os').system('touch {target}')}}$"]
  for p in payloads:
    assert rewards.accuracy_reward(resp(p), "1") == 0.0
  assert not target.exists()


@pytest.mark.parametrize("gold", ["", "   ", r"\frac{", "???", "#@!"])
def test_bad_gold_is_an_error_naming_it(gold):
  with pytest.raises(ValueError, match=re.escape(repr(gold))):
    rewards.accuracy_reward(boxed("1"), gold)
  with pytest.raises(ValueError, match=re.escape(repr(gold))):
    rewards.grade_answer(None, gold)            # even without an answer: no free 1.0, no silent 0


def test_gold_must_be_a_string():
  with pytest.raises(ValueError, match="string"):
    rewards.accuracy_reward(boxed("1"), 1)


ADVERSARIAL = {
    "power_tower": boxed("9^9^9^9"),
    "braced_tower": boxed("9^{9^{9^{9}}}"),
    "megabyte_answer": resp("1" * 1_000_000),
    "megabyte_boxes": resp("\\boxed{" * 150_000 + "1" + "}" * 150_000),
    "megabyte_unclosed_boxes": resp("\\boxed{" * 150_000),
    "megabyte_braces": resp("{" * 500_000 + "}" * 500_000),
    "nested_braces_in_box": boxed("{" * 5000 + "1" + "}" * 5000),
    "megabyte_tags": "<answer>" * 100_000 + "</answer>" * 100_000,
    "megabyte_text_no_tags": "The answer is " * 80_000,
    "unicode_soup": resp("\u0000\ud7ff\ufeff\u202e" * 1000 + "\U0001F4A9"),
    "latex_soup": boxed("\\frac" * 100 + "{1}{2}"),
    "factorial": boxed("1000000!"),
}


@pytest.mark.parametrize("text", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_adversarial_inputs_return_promptly(text):
  t0 = time.perf_counter()
  assert rewards.accuracy_reward(text, "5") == 0.0
  assert rewards.format_reward(text) in (0.0, 1.0)
  assert time.perf_counter() - t0 < 2.0        # typically < 0.2 s on 2 shared cores


EXTRACT = {
    "box_in_answer": (resp(r"The answer is $\boxed{\frac{1}{2}}$"), r"\frac{1}{2}"),
    "nested_braces": (boxed(r"\frac{\sqrt{2}}{2}"), r"\frac{\sqrt{2}}{2}"),
    "fbox": (resp(r"\fbox{7}"), "7"),
    "unbraced_box": (resp(r"$\boxed 7$"), "7"),
    "anchor_colon": (resp("Answer: (B) 45\u00b0"), "(B) 45\u00b0"),
    "anchor_is": (resp("Therefore, the final answer is 12."), "12"),
    "plain": (resp("  3/4  "), "3/4"),
    "ambiguous_boxes": (resp(r"\boxed{3} or \boxed{4}"), None),
    "no_tags_no_box": ("just 42", None),
    "no_tags_box": (r"we get \boxed{42}", "42"),
    "box_outside_answer_ignored": (r"<think>\boxed{1}</think><answer>2</answer>", "2"),
    "empty": (resp(""), None),
}


@pytest.mark.parametrize("text,expected", list(EXTRACT.values()), ids=list(EXTRACT))
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected
  assert accuracy.extract_answer is extract.extract_answer


@pytest.mark.parametrize("answer,expected", [
    ("D", "D"), ("(d)", "D"), ("The answer is $\\boxed{D}$", "D"), ("The answer is D.", "D"),
    ("Answer: (B)", "B"), ("option C", "C"), ("B. 45", "B"), ("(B) 45", "B"), ("\\text{C}", "C"),
    ("A or B", None), ("(A) and (C)", None), ("I pick C", "C"), ("A is correct", "A"), ("42", None),
    ("Z", None), ("C, not D", None),
    ("A triangle", "A"),   # known limit: the article "A" reads as option A (MM-EUREKA's rule is looser still)
])
def test_choice_letter(answer, expected):
  assert rewards.choice_letter(answer, "ABCDEFGH") == expected


def test_numeric_tolerance_is_configurable():
  text = boxed("1.33")
  assert rewards.accuracy_reward(text, "4/3") == 0.0                   # |1.33 - 1.3333| = 3.3e-3
  loose = rewards.GradeConfig(rel_tol=1e-2)                            # allows 1.3e-2
  assert rewards.accuracy_reward(text, "4/3", loose) == 1.0
  assert rewards.accuracy_reward(boxed("1.5"), "4/3", loose) == 0.0   # 0.17 > 1.3e-2
  assert rewards.accuracy_reward(boxed("101"), "100", rewards.GradeConfig(abs_tol=1.0)) == 1.0
  assert rewards.accuracy_reward(boxed("102"), "100", rewards.GradeConfig(abs_tol=1.0)) == 0.0


def test_works_off_the_main_thread():
  """math-verify's signal.alarm would raise in a thread; we pass no signal timeout there."""
  out = []
  t = threading.Thread(target=lambda: out.append(rewards.accuracy_reward(boxed(r"\frac{3}{4}"), "0.75")))
  t.start()
  t.join(30)
  assert out == [1.0]


def test_guard_reasons():
  cfg = rewards.GradeConfig()
  assert rewards.guard_reason("x" * 600, cfg) == "too_long"
  assert rewards.guard_reason("{" * 30 + "}" * 30, cfg) == "too_nested"
  assert rewards.guard_reason("2^{1234567}", cfg) == "huge_exponent"
  assert rewards.guard_reason("9^9^9", cfg) == "power_tower"
  assert rewards.guard_reason("10^{10^{10}}", cfg) == "power_tower"
  assert rewards.guard_reason("12345!", cfg) == "huge_factorial"
  for fine in ("2^{10}", "e^{x^2}", "x^2 + y^2 + z^2", r"\frac{1}{2}", "10!"):
    assert rewards.guard_reason(fine, cfg) is None, fine
  assert rewards.guard_reason("9^9^9", rewards.GradeConfig(guard=False)) is None
