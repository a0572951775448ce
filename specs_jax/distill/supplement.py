r"""Format supplement for chosen responses: normalise to the SPECS format, repairing small tag defects.

The target (RECIPE.md §5, the project page's cases):

  <think>{reasoning}</think>\n<answer> The answer is $\boxed{X}$</answer>

π_zero already writes this ~97 % of the time (RECIPE.md §2), so for most chosen responses nothing
changes; the rest have small defects that `supplement` repairs from `parse.split_response`:

| defect                 | example                                      | repair                                 |
|------------------------|----------------------------------------------|----------------------------------------|
| `missing_think_open`   | `R</think><answer>…`                         | reasoning wrapped in <think>           |
| `missing_think_close`  | `<think>R<answer>…`                          | reasoning wrapped in <think>           |
| `missing_answer_open`  | `<think>R</think> X</answer>`                | answer re-rendered                     |
| `missing_answer_close` | `<think>R</think><answer> X`                 | answer re-rendered                     |
| `missing_answer_tags`  | `<think>R. So the answer is 12.</think>`     | the whole think text kept as reasoning |
| `duplicate_tags`       | `<think><think>R</think>…`                   | extra tags dropped                     |
| `answer_inside_think`  | `<think>R <answer>A</answer></think>`        | answer moved after the reasoning       |
| `answer_before_think`  | `<answer>A</answer><think>R</think>`         | parts put in order                     |
| `text_outside_tags`    | `Sure! <think>R</think>…`, text between tags | kept inside the reasoning              |
| `trailing_text`        | `…</answer> Hope this helps.`                | dropped                                |
| `answer_rewritten`     | `<answer>12</answer>`                        | `The answer is $\boxed{12}$`           |
| `whitespace`           | `<think> R </think> <answer>…`               | stripped                               |

A response with no tags at all is not a small defect: it is refused unless `allow_untagged=True`. Also
refused (None): no final answer, empty reasoning, or an answer that does not survive the round trip
(`rewards.extract_answer` of the result must give X back and `rewards.format_reward` must be 1).
Pure text, no JAX.
"""

from __future__ import annotations

import dataclasses
import re

from specs_jax.distill import parse
from specs_jax.distill.parse import ANSWER_CLOSE, ANSWER_OPEN, TAGS, THINK_CLOSE, THINK_OPEN
from specs_jax.rewards import extract
from specs_jax.rewards.format import format_reward

__all__ = ["DEFECTS", "Supplemented", "canonical", "find_defects", "is_canonical", "judge_view", "supplement"]

DEFECTS = ("missing_think_open", "missing_think_close", "missing_answer_open", "missing_answer_close",
           "missing_answer_tags", "duplicate_tags", "answer_inside_think", "answer_before_think",
           "text_outside_tags", "trailing_text", "answer_rewritten", "whitespace")

_CANONICAL = re.compile(r"<think>(?P<r>\S(?:.*\S)?)</think>\n<answer> The answer is \$\\boxed\{(?P<x>.+)\}\$</answer>",
                        re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Supplemented:
  """A chosen response in the canonical format. repairs: the defects fixed (() if it was canonical)."""

  text: str
  answer: str
  repairs: tuple[str, ...]


def canonical(reasoning: str, answer: str) -> str:
  """`<think>{reasoning}</think>\\n<answer> The answer is $\\boxed{answer}$</answer>` (both stripped)."""
  statement = f" The answer is $\\boxed{{{answer.strip()}}}$"
  return f"{THINK_OPEN}{reasoning.strip()}{THINK_CLOSE}\n{ANSWER_OPEN}{statement}{ANSWER_CLOSE}"


def is_canonical(text: str) -> bool:
  """Whether `text` is already exactly in the canonical form (and passes the format reward)."""
  return _CANONICAL.fullmatch(text) is not None and format_reward(text) == 1.0 and \
      extract.extract_answer(text) is not None


def find_defects(text: str) -> tuple[str, ...]:
  """The tag defects of a response, in `DEFECTS` order (empty for a canonical one)."""
  if is_canonical(text):
    return ()
  counts = {t: text.count(t) for t in TAGS}
  found = set()
  has_answer_tags = counts[ANSWER_OPEN] or counts[ANSWER_CLOSE]
  for tag, name in ((THINK_OPEN, "missing_think_open"), (THINK_CLOSE, "missing_think_close"),
                    (ANSWER_OPEN, "missing_answer_open"), (ANSWER_CLOSE, "missing_answer_close")):
    if counts[tag] == 0 and (has_answer_tags or tag in (THINK_OPEN, THINK_CLOSE)):
      found.add(name)
  if not has_answer_tags:
    found.add("missing_answer_tags")
  if any(c > 1 for c in counts.values()):
    found.add("duplicate_tags")
  t0, t1, a0 = text.find(THINK_OPEN), text.find(THINK_CLOSE), text.find(ANSWER_OPEN)
  if a0 != -1 and t0 != -1 and t1 != -1 and t0 < a0 < t1:
    found.add("answer_inside_think")
  if a0 != -1 and t0 != -1 and a0 < t0:
    found.add("answer_before_think")
  if t0 > 0 and (a0 == -1 or a0 > t0) and parse.strip_tags(text[:t0]).strip():
    found.add("text_outside_tags")
  if t1 != -1 and a0 > t1 and parse.strip_tags(text[t1:a0]).strip():
    found.add("text_outside_tags")
  parts = parse.split_response(text)
  if parts is not None and parts.trailing:
    found.add("trailing_text")
  span = extract.answer_span(text)
  if parts is not None and span is not None and span.strip() != f"The answer is $\\boxed{{{parts.answer}}}$":
    found.add("answer_rewritten")
  if not found:
    found.add("whitespace")
  return tuple(d for d in DEFECTS if d in found)


def supplement(text: str, *, allow_untagged: bool = False) -> Supplemented | None:
  """Normalises a chosen response to the canonical format; None when it cannot (module docstring).

  Args:
    text: the response.
    allow_untagged: also accept a response without any of the four tags (plain prose); its whole
      text becomes the reasoning.
  Returns:
    Supplemented(text, answer, repairs) with `format_reward(text) == 1` and
    `extract_answer(text) == answer`; None if refused.
  """
  if is_canonical(text):
    return Supplemented(text, extract.extract_answer(text) or "", ())
  if not parse.has_tags(text) and not allow_untagged:
    return None
  parts = parse.split_response(text)
  if parts is None:
    return None
  # Without an <answer> tag the whole (tag-free) text is reasoning, its conclusion included.
  reasoning = parts.reasoning if parts.tagged else parse.strip_tags(text)
  if not reasoning.strip():
    return None
  out = canonical(reasoning, parts.answer)
  if format_reward(out) != 1.0 or extract.extract_answer(out) != extract.strip_wrappers(parts.answer):
    return None
  return Supplemented(out, parts.answer, find_defects(text))


def judge_view(text: str) -> str:
  """What the consistency judge reads: the response with its tags put right and its words untouched,
  `<think>{reasoning}</think>\\n<answer>{statement}</answer>`; the text itself when its format is
  already right or it has no answer."""
  if format_reward(text) == 1.0:
    return text
  parts = parse.split_response(text)
  if parts is None:
    return text
  reasoning = parts.reasoning if parts.tagged else parse.strip_tags(text)
  return f"{THINK_OPEN}{reasoning.strip()}{THINK_CLOSE}\n{ANSWER_OPEN}{parts.statement}{ANSWER_CLOSE}"
