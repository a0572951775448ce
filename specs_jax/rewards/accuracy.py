r"""Accuracy reward: math-verify for numbers and expressions, rules for choice letters and words.

`accuracy_reward(text, gold)` = `grade_answer(extract_answer(text), gold)`, 1.0 or 0.0.

How a gold is read (first match wins; `parse_gold`):
1. A choice: "B", "(b)", "B.", "\boxed{B}", "(B) 45°" (letter plus option text), letters from
   `GradeConfig.choice_letters` (A-H). The prediction must commit to that one letter
   (`extract.choice_letter`), or, when the gold carries option text and the prediction has no
   letter, equal that text.
2. Plain words ("yes", "red cube"): compared after `extract.normalize_text` (case, punctuation).
3. Math: parsed with math-verify's LaTeX extractor; plain numbers ("1,000", "0.75", "1e3") directly.
   An unparseable gold raises `GoldError` (a ValueError naming the gold). MM-EUREKA gave such items
   a free 1.0; we refuse to.

Safety: nothing in a response is evaluated as Python. Only math-verify's LaTeX path is used (an
ANTLR parser into SymPy objects); its plain-expression path (`ExprExtractionConfig`) calls
`sympy.parse_expr`, which runs `eval`, and is never used. Answers that are too long, too deeply
nested or contain numeric power towers score 0 before parsing (`GradeConfig` documents the limits).

Timeouts: in-process calls from the main thread use math-verify's signal.alarm timeout
(`GradeConfig.inprocess_timeout_s`); other threads cannot use signals and run without one. For
bulk or untrusted grading use `pool.grade_batch`, whose workers enforce hard per-item timeouts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import threading
from typing import Literal

import sympy
from math_verify import LatexExtractionConfig, parse, verify

from specs_jax.rewards import extract
from specs_jax.rewards.config import GradeConfig
from specs_jax.rewards.extract import extract_answer  # re-exported: distillation and eval use it

__all__ = ["Gold", "GoldError", "accuracy_reward", "extract_answer", "grade_answer", "grade_choice",
           "grade_exact", "guard_reason", "parse_gold", "validate_gold"]

log = logging.getLogger(__name__)

_LATEX_ONLY = (LatexExtractionConfig(),)
_PLAIN_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,4})?")
_FRACTION = re.compile(r"(?P<sign>-)?\s*(?:(?P<n1>\d{1,12})\s*/\s*(?P<d1>\d{1,12})|"
                       r"\\[dt]?frac\s*\{\s*(?P<n2>\d{1,12})\s*\}\s*\{\s*(?P<d2>\d{1,12})\s*\})")
_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])")
_WORDS = re.compile(r"[^\W\d_]{2,}(?:[\s'-]+[^\W\d_]+)*")
_TOWER = re.compile(r"\^\s*[{(]?\s*[-+]?\d[\d.]*\s*[})]?\s*\^")


class GoldError(ValueError):
  """A gold answer that cannot be graded against; the message names the gold."""


@dataclasses.dataclass(frozen=True)
class Gold:
  """A parsed gold answer. kind: "choice" (letter [+ option]), "text" (normalised words) or "math"."""

  kind: Literal["choice", "text", "math"]
  raw: str
  letter: str | None = None
  option: str | None = None
  text: str | None = None
  parsed: tuple = ()


def _short(s: str, n: int = 80) -> str:
  return repr(s if len(s) <= n else s[:n] + "…")


def _signal_timeout(config: GradeConfig) -> int | None:
  if config.inprocess_timeout_s > 0 and threading.current_thread() is threading.main_thread():
    return int(config.inprocess_timeout_s)
  return None


def _number(s: str) -> sympy.Expr:
  s = s.replace(",", "")
  # sympy.Integer/Float read the digits themselves (no eval). Floats keep math-verify's 15 digits.
  return sympy.Float(s) if any(c in s for c in ".eE") else sympy.Integer(s)


def _fast_parse(s: str) -> list | None:
  """Plain numbers, integer fractions and intervals with number endpoints, without the ANTLR parser
  (10-25x faster; the objects equal what math-verify's LaTeX path builds for the same strings)."""
  if _PLAIN_NUMBER.fullmatch(s):
    return [_number(s)]
  m = _FRACTION.fullmatch(s)
  if m:
    num, den = m.group("n1") or m.group("n2"), m.group("d1") or m.group("d2")
    if int(den) != 0:
      return [sympy.Rational(int(num), int(den)) * (-1 if m.group("sign") else 1)]
  m = _INTERVAL.fullmatch(s)
  if m and _PLAIN_NUMBER.fullmatch(m.group(2)) and _PLAIN_NUMBER.fullmatch(m.group(3)):
    lo, hi = _number(m.group(2)), _number(m.group(3))
    if lo < hi:
      return [sympy.Interval(lo, hi, left_open=m.group(1) == "(", right_open=m.group(4) == ")")]
  return None


def _parse_math(s: str, timeout: int | None) -> list:
  s = extract.normalize_unicode(s).strip()
  fast = _fast_parse(s)
  if fast is not None:
    return fast
  latex = s.replace("\n", " ")
  for delim in ("\\(", "\\)", "\\[", "\\]"):
    latex = latex.replace(delim, " ")
  latex = re.sub(r"(?<!\\)\$", " ", latex).strip()
  if not latex:
    return []
  return parse(f"${latex}$", extraction_config=_LATEX_ONLY, fallback_mode="no_fallback",
               parsing_timeout=timeout)


def guard_reason(answer: str, config: GradeConfig) -> str | None:
  """Why an answer is refused before parsing ("too_long", "too_nested", "huge_exponent",
  "power_tower", "huge_factorial"), or None when it may be parsed. Linear in len(answer)."""
  if not config.guard:
    return None
  if len(answer) > config.max_answer_chars:
    return "too_long"
  depth = deepest = 0
  for c in answer:
    if c in "{([":
      depth += 1
      deepest = max(deepest, depth)
    elif c in "})]":
      depth = max(depth - 1, 0)
  if deepest > config.max_nesting:
    return "too_nested"
  if re.search(r"\^\s*[{(]?\s*[-+]?\d{%d,}" % (config.max_exponent_digits + 1), answer):
    return "huge_exponent"
  if _TOWER.search(answer):
    return "power_tower"
  if re.search(r"\d{4,}\s*!", answer):
    return "huge_factorial"
  return None


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str, letters: str, timeout: int | None) -> Gold:
  if not gold.strip():
    raise GoldError(f"gold answer {_short(gold)} is empty")
  choice = extract.parse_choice_gold(gold, letters)
  if choice is not None:
    return Gold("choice", gold, letter=choice[0], option=choice[1])
  boxes = extract.boxed_contents(gold)
  core = extract.strip_wrappers(boxes[-1] if len(boxes) == 1 else gold)
  words = extract.strip_wrappers(extract.unwrap_text_commands(core))
  if _WORDS.fullmatch(words) and "\\" not in words:
    return Gold("text", gold, text=extract.normalize_text(words))
  parsed = tuple(_parse_math(core, timeout))
  if not parsed:
    raise GoldError(f"gold answer {_short(gold)} cannot be parsed: not a choice letter, plain words, "
                    "a number or a LaTeX expression math-verify reads")
  return Gold("math", gold, parsed=parsed)


def parse_gold(gold: str, config: GradeConfig | None = None) -> Gold:
  """Parses a gold answer (see the module docstring). Raises GoldError (a ValueError) naming it."""
  config = config or GradeConfig()
  if not isinstance(gold, str):
    raise GoldError(f"gold answer must be a string, got {type(gold).__name__}: {_short(repr(gold))}")
  return _parse_gold_cached(gold, config.choice_letters, _signal_timeout(config))


validate_gold = parse_gold


def _within_tolerance(gold: list, pred: list, config: GradeConfig) -> bool:
  if config.rel_tol <= 0 and config.abs_tol <= 0:
    return False
  for g in gold:
    for p in pred:
      if isinstance(g, sympy.Number) and isinstance(p, sympy.Number):
        try:
          gf, pf = float(g), float(p)
        except (OverflowError, TypeError, ValueError):
          continue
        if math.isfinite(gf) and math.isfinite(pf) and abs(pf - gf) <= max(config.abs_tol, config.rel_tol * abs(gf)):
          return True
  return False


def _math_equal(gold: tuple, answer: str, config: GradeConfig) -> bool:
  timeout = _signal_timeout(config)
  pred = _parse_math(answer, timeout)
  if not pred:
    return False
  if verify(list(gold), pred, float_rounding=config.float_rounding, timeout_seconds=timeout):
    return True
  return _within_tolerance(list(gold), pred, config)


def _grade_choice(gold: Gold, answer: str, config: GradeConfig) -> float:
  letter = extract.choice_letter(answer, config.choice_letters)
  if letter is not None:
    return float(letter == gold.letter)
  if gold.option:
    if extract.normalize_text(answer) == extract.normalize_text(gold.option):
      return 1.0
    try:
      option = parse_gold(gold.option, config)
    except GoldError:
      return 0.0
    if option.kind == "math" and guard_reason(answer, config) is None:
      return float(_math_equal(option.parsed, answer, config))
  return 0.0


def grade_answer(answer: str | None, gold: str, config: GradeConfig | None = None) -> float:
  """1.0 if an extracted answer matches the gold, else 0.0 (choice, words or math; module docstring).

  Args:
    answer: the final answer string (`extract_answer(text)`); None or blank scores 0.
    gold: the gold answer. Parsed first, so an unparseable gold raises even when answer is None.
    config: tolerances and guards.
  Raises:
    GoldError: the gold cannot be parsed (message names it).
  """
  config = config or GradeConfig()
  g = parse_gold(gold, config)
  if answer is None or not answer.strip() or guard_reason(answer, config) is not None:
    return 0.0
  answer = extract.normalize_unicode(answer)
  if g.kind == "choice":
    return _grade_choice(g, answer, config)
  if g.kind == "text":
    return float(extract.normalize_text(answer) == g.text)
  return float(_math_equal(g.parsed, answer, config))


def grade_choice(answer: str | None, gold: str, config: GradeConfig | None = None) -> float:
  """Multiple-choice only: the gold must be a choice letter (GoldError otherwise)."""
  config = config or GradeConfig()
  g = parse_gold(gold, config)
  if g.kind != "choice":
    raise GoldError(f"gold answer {_short(gold)} is not a choice letter in {config.choice_letters!r}")
  if answer is None or len(answer) > config.max_answer_chars:
    return 0.0
  return _grade_choice(g, extract.normalize_unicode(answer), config)


def grade_exact(answer: str | None, gold: str, config: GradeConfig | None = None) -> float:
  """Normalised string equality (`extract.normalize_text`); for free-form labels."""
  config = config or GradeConfig()
  if not isinstance(gold, str) or not extract.normalize_text(gold):
    raise GoldError(f"gold answer {_short(str(gold))} is empty after normalisation")
  if answer is None or len(answer) > config.max_answer_chars:
    return 0.0
  return float(extract.normalize_text(answer) == extract.normalize_text(gold))


def accuracy_reward(text: str, gold: str, config: GradeConfig | None = None) -> float:
  r"""1.0 if the response's final answer matches the gold, else 0.0 (in-process).

  Example: accuracy_reward("<think>…</think><answer> The answer is $\boxed{0.75}$</answer>", "3/4") == 1.0
  Raises:
    GoldError (a ValueError): the gold cannot be parsed.
  """
  return grade_answer(extract_answer(text), gold, config)
