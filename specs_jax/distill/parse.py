r"""Reading a response's parts when its tags may be broken: reasoning, answer statement, final answer.

The preference pairs are built from raw rollouts (RECIPE.md §2). π_zero mostly writes the SPECS format

  <think> reasoning </think>\n<answer> The answer is $\boxed{X}$</answer>

while the base model often writes plain prose ("... Thus, the answer is 12."), and both produce the odd
defect (a missing closing tag, the answer inside <think>, tags twice). The answer filter, the format
supplement and the format pollution all need the same three things from such a text, read here:

- `final_answer(text)`: the last answer the text commits to. Looser than the RL reward's
  `rewards.extract_answer`, which only reads an <answer> tag or a single \boxed{} anywhere: this also reads
  plain prose, so that a base-model response like the one in the paper's `data_example.png` can pass the
  answer filter. Rule: inside the last <answer> tag if there is one, else in the whole text with the tags
  removed, the later of (a) the last \boxed{} and (b) the value after the last "answer is" / "Answer:" /
  "final answer:" anchor, cut at the end of its sentence, wins; an <answer> span with neither is the
  answer itself ("12"). Several boxes are not an error here (the last one wins): this reads data for
  filtering, the strict rule stays the reward's.
- `split_response(text)`: (reasoning, answer statement, final answer), all tag-free. With an <answer>
  tag, the statement is the last tag's content and the reasoning is everything else (text after the
  answer block counts only when it holds think tags, as in `<answer>…</answer><think>…</think>` or an
  answer inside <think>; otherwise it is trailing text and dropped). Without one, the statement is the
  sentence that holds the final answer, to the end of the text.

Pure string functions, no JAX; linear-ish in the text length (a few regex scans).
"""

from __future__ import annotations

import dataclasses
import re

from specs_jax.rewards import extract

__all__ = ["ANSWER_CLOSE", "ANSWER_OPEN", "TAGS", "THINK_CLOSE", "THINK_OPEN", "Parts", "final_answer",
           "has_commitment", "has_tags", "is_plain_answer", "split_response", "strip_tags"]

THINK_OPEN, THINK_CLOSE = extract.THINK_OPEN, extract.THINK_CLOSE
ANSWER_OPEN, ANSWER_CLOSE = extract.ANSWER_OPEN, extract.ANSWER_CLOSE
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# The anchors of `extract._ANCHOR` (kept in step by hand: that one is private).
_ANCHOR = re.compile(
    r"(?i)\b(?:final\s+answer|correct\s+answer|correct\s+option|correct\s+choice|answer)"
    r"\s*(?:(?:is|would\s+be|should\s+be)\b\s*:?|:|=)\s*")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_WORD = re.compile(r"\\(?:boxed|fbox)")
# A sentence ends at . ! ? followed by whitespace (or the end), or at a line break; "7.5" does not end one.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def strip_tags(text: str) -> str:
  """`text` with every <think>, </think>, <answer>, </answer> removed (nothing else changes)."""
  for tag in TAGS:
    text = text.replace(tag, "")
  return text


def has_tags(text: str) -> bool:
  """Whether any of the four format tags occurs in `text`."""
  return any(tag in text for tag in TAGS)


@dataclasses.dataclass(frozen=True)
class _Commitment:
  start: int    # where the anchor or the box starts
  value: str    # the cleaned answer it commits to


def _clean(value: str) -> str:
  boxes = extract.boxed_contents(value)
  if boxes:
    value = boxes[-1]
  return extract.strip_wrappers(value)


def _last_box(text: str) -> _Commitment | None:
  for m in reversed(list(_BOX.finditer(text))):
    boxes = extract.boxed_contents(text[m.start():])
    if boxes and boxes[0].strip():
      value = extract.strip_wrappers(boxes[0])
      if value:
        return _Commitment(m.start(), value)
  return None


def _last_anchor(text: str) -> _Commitment | None:
  for m in reversed(list(_ANCHOR.finditer(text))):
    rest = text[m.end():]
    end = _SENTENCE_END.search(rest)
    value = rest[:end.start()] if end else rest
    # A box that starts in the sentence is read whole, even when its content has a full stop.
    box = _BOX.search(rest)
    if box and (end is None or box.start() < end.start()):
      boxes = extract.boxed_contents(rest[box.start():])
      if boxes:
        value = boxes[0]
    value = _clean(value)
    if value:
      return _Commitment(m.start(), value)
  return None


def is_plain_answer(value: str) -> bool:
  """Whether `value` can stand as a final answer: non-empty, one line, balanced braces, no tag, no
  sentence end inside, no box and no answer anchor ("answer is", "Answer:") of its own. Values failing
  this are junk that a rewrite could not keep readable, so `final_answer` gives None for them."""
  if not value or "\n" in value or any(t in value for t in TAGS) or _ANCHOR.search(value) or \
      _SENTENCE_END.search(value) or _BOX_WORD.search(value):
    return False
  depth = 0
  for tok in re.findall(r"\\.|[{}]", value):
    depth += {"{": 1, "}": -1}.get(tok, 0)
    if depth < 0:
      return False
  return depth == 0


def _last_commitment(text: str) -> _Commitment | None:
  """The later of the last \\boxed{} and the last anchored value in `text`; its value is "" when it
  is not a plain answer; None when `text` commits to nothing."""
  found = [c for c in (_last_box(text), _last_anchor(text)) if c is not None]
  if not found:
    return None
  last = max(found, key=lambda c: c.start)
  return last if is_plain_answer(last.value) else _Commitment(last.start, "")


def has_commitment(text: str) -> bool:
  """Whether `text` names its answer explicitly (a \\boxed{} or an "answer is" / "Answer:" anchor)."""
  c = _last_commitment(text)
  return c is not None and bool(c.value)


def _span_answer(span: str) -> str | None:
  c = _last_commitment(span)
  value = c.value if c is not None else extract.strip_wrappers(span)
  return value if is_plain_answer(value) else None


@dataclasses.dataclass(frozen=True)
class Parts:
  """A response split into tag-free parts (see the module docstring).

  Attributes:
    reasoning: the reasoning, tags removed, stripped (may be empty).
    statement: the answer statement ("The answer is $\\boxed{12}$", "Thus, the answer is 12."), tags
      removed, stripped, never empty.
    answer: the final answer read from `statement` ("12").
    tagged: the statement came from an <answer> tag.
    trailing: text after the answer block that belongs to neither part (dropped), stripped.
  """

  reasoning: str
  statement: str
  answer: str
  tagged: bool
  trailing: str = ""


def _split_tagged(text: str) -> Parts | None:
  a0 = text.rfind(ANSWER_OPEN)
  body_start = a0 + len(ANSWER_OPEN)
  a1 = text.find(ANSWER_CLOSE, body_start)
  body_end, block_end = (len(text), len(text)) if a1 == -1 else (a1, a1 + len(ANSWER_CLOSE))
  statement = strip_tags(text[body_start:body_end]).strip()
  answer = _span_answer(statement)
  if answer is None:
    return None
  before, after = text[:a0], text[block_end:]
  if THINK_OPEN in after or THINK_CLOSE in after:   # answer inside <think>, or before it
    reasoning, trailing = strip_tags(before + after), ""
  else:
    reasoning, trailing = strip_tags(before), strip_tags(after)
  return Parts(reasoning.strip(), statement, answer, True, trailing.strip())


def _split_plain(text: str) -> Parts | None:
  plain = strip_tags(text)
  c = _last_commitment(plain)
  if c is None or not c.value:
    return None
  start = 0
  for m in _SENTENCE_END.finditer(plain, 0, c.start):
    start = m.end()
  statement = plain[start:].strip()
  return Parts(plain[:start].strip(), statement, c.value, False)


def split_response(text: str) -> Parts | None:
  """Splits a response into reasoning, answer statement and final answer; None without a final answer.

  Examples:
    "<think>2+2=4</think>\\n<answer> The answer is $\\boxed{4}$</answer>"
        -> Parts("2+2=4", "The answer is $\\boxed{4}$", "4", tagged=True)
    "2+2=4. Thus, the answer is 4."      -> Parts("2+2=4.", "Thus, the answer is 4.", "4", tagged=False)
    "<think>2+2=4 <answer>4</answer></think>"   -> Parts("2+2=4", "4", "4", tagged=True)
  """
  if ANSWER_OPEN in text:
    parts = _split_tagged(text)
    if parts is not None:
      return parts
  return _split_plain(text)


def final_answer(text: str) -> str | None:
  """The last answer a response commits to, tolerant of broken or missing tags (module docstring)."""
  parts = split_response(text)
  return parts.answer if parts is not None else None
