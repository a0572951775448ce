r"""RuleJudge: the offline default for both judged steps. No network, no model, deterministic.

Grading (`grade_answers`): the final answer (`extract_answer`) against the gold with the accuracy
rules (choice letters, math-verify); for a gold made of plain words, the normalised words must be
equal, or the gold's words must appear as one contiguous run in an answer at most
`max_extra_words` longer with no negation the gold lacks ("the red cube" matches "red cube";
"not red" does not match "red").

Consistency (`check_consistency`): the conclusion of the `<think>` reasoning must name the final
answer. The conclusion is read from the last `tail_chars` characters of the reasoning: the last
`\boxed{}`, the value after the last "answer is" / "so" / "therefore" / "thus" / "hence", the
right-hand side of the last "=", and the last inline formula; only if none exists, the last number.
Any of these equal to the final answer (by the same grading rules) makes the response consistent.
For a choice, the last option letter named in the tail must be the chosen one.

Documented limits: no synonyms or paraphrases ("rectangle" vs "oblong"), no units conversion,
no check that the reasoning itself is valid, and a reasoning that computes the right value but ends
on an unrelated number can be judged inconsistent. Use `OpenAIJudge` where that matters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from specs_jax.rewards import accuracy, extract
from specs_jax.rewards.config import GradeConfig
from specs_jax.rewards.judge import Verdict, _same_length

__all__ = ["RuleJudge"]

_NEGATIONS = frozenset({"not", "no", "never", "none", "neither", "nor", "cannot", "isn't", "isnt"})
_ANCHOR_VALUE = re.compile(
    r"(?i)\b(?:answer\s+is|so|therefore|thus|hence|total\s+is|result\s+is)\b[\s,:]*"
    r"(?:(?:the\s+)?(?:answer|result|total|value)\s+(?:is\s+)?)?([^\s,;]+(?:\s*[/^]\s*[^\s,;]+)?)")
_EQ_RHS = re.compile(r"=\s*([^=\n,;]+?)\s*(?:[.,;]\s|[.,;]?$|\n)")
_INLINE_MATH = re.compile(r"\$([^$\n]+)\$|\\\((.+?)\\\)")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:/\d+)?")


def _option_mentions(text: str, letters: str) -> list[str]:
  pat = (rf"\\boxed\{{\s*\(?([{letters}])\)?\s*\}}|\(([{letters}])\)|"
         rf"(?i:\b(?:option|choice|answer(?:\s+is)?))\s*:?\s*\(?([{letters}])\b")
  return [next(g for g in m.groups() if g) for m in re.finditer(pat, text)]


@dataclasses.dataclass(frozen=True)
class RuleJudge:
  """Offline judge (see module docstring for the rules and their limits).

  Attributes:
    config: grading tolerances and guards.
    max_extra_words: how many more words than the gold a free-form answer may have.
    tail_chars: how much of the end of the reasoning counts as its conclusion.
  """

  config: GradeConfig = dataclasses.field(default_factory=GradeConfig)
  max_extra_words: int = 3
  tail_chars: int = 400

  def _free_form(self, answer: str, gold_text: str) -> bool:
    a, g = extract.normalize_text(answer).split(), gold_text.split()
    if a == g:
      return True
    if not g or len(a) > len(g) + self.max_extra_words or (set(a) - set(g)) & _NEGATIONS:
      return False
    return any(a[i:i + len(g)] == g for i in range(len(a) - len(g) + 1))

  def _grade_one(self, answer: str | None, gold: str) -> Verdict:
    try:
      g = accuracy.parse_gold(gold, self.config)
    except accuracy.GoldError as e:
      return Verdict(None, "rule", error=str(e))
    if answer is None:
      return Verdict(0.0, "rule", error="no final answer")
    if g.kind == "text":
      ok = len(answer) <= self.config.max_answer_chars and self._free_form(answer, g.text)
      return Verdict(float(ok), "rule")
    return Verdict(accuracy.grade_answer(answer, gold, self.config), "rule")

  def grade_answers(self, questions: Sequence[str], responses: Sequence[str],
                    golds: Sequence[str]) -> list[Verdict]:
    """One Verdict per response: 1.0 if its final answer matches the gold; score None (with the
    error) for a gold that cannot be parsed. `questions` are unused (kept for the Judge protocol)."""
    _same_length(questions=questions, responses=responses, golds=golds)
    return [self._grade_one(extract.extract_answer(r), g) for r, g in zip(responses, golds)]

  def _conclusions(self, tail: str) -> list[str]:
    found = []
    boxes = extract.boxed_contents(tail)
    if boxes:
      found.append(boxes[-1])
    for pattern in (_ANCHOR_VALUE, _EQ_RHS):
      matches = pattern.findall(tail)
      if matches:
        found.append(matches[-1])
    formulas = _INLINE_MATH.findall(tail)
    if formulas:
      found.append(next(g for g in formulas[-1] if g))
    if not found:
      numbers = _NUMBER.findall(tail)
      found += numbers[-1:]
    return [extract.strip_wrappers(f) for f in found if f.strip()]

  def _consistent(self, response: str) -> bool:
    think, final = extract.think_span(response), extract.extract_answer(response)
    if not think or not think.strip() or final is None:
      return False
    if accuracy.guard_reason(final, self.config) is not None:
      return False
    tail = think[-self.tail_chars:]
    letters = self.config.choice_letters
    choice = extract.parse_choice_gold(final, letters) or (
        (extract.choice_letter(final, letters), None) if extract.choice_letter(final, letters) else None)
    if choice is not None:
      mentions = _option_mentions(tail, letters)
      return bool(mentions) and mentions[-1] == choice[0]
    for cand in self._conclusions(tail):
      try:
        if accuracy.grade_answer(cand, final, self.config) == 1.0:
          return True
      except accuracy.GoldError:
        break                              # the final answer is not math: compare words below
    words = extract.normalize_text(final)
    return bool(words) and re.search(rf"(?<!\w){re.escape(words)}(?!\w)", extract.normalize_text(tail)) is not None

  def check_consistency(self, questions: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
    """One Verdict per response: 1.0 if the reasoning's conclusion names the final answer.
    `questions` are unused (kept for the Judge protocol)."""
    _same_length(questions=questions, responses=responses)
    return [Verdict(float(self._consistent(r)), "rule") for r in responses]
