r"""Format rewards: does a response have the required tag structure? 1.0 or 0.0, linear time.

The SPECS/MM-EUREKA rule (RECIPE.md §5, `reward_func_qwen_instruct.py`): exactly one each of
`<think>`, `</think>`, `<answer>`, `</answer>`, in the order think -> answer, i.e. the regex
`.*<think>(.+?)</think>\s*<answer>.+?</answer>.*` with DOTALL plus the exactly-once counts.
Two deliberate differences, both stricter:
- the content of each tag pair must contain a non-whitespace character (upstream's `.+?` accepts a
  lone space);
- the weight is not applied here: `format_reward` returns 1.0, and the 0.5 of the paper is
  `RewardConfig.format_weight`.
Text before the first tag and after the last one is allowed, as upstream (`.*`); `TagFormat` can
forbid it. Tags are case-sensitive and matched literally; nothing is parsed with a backtracking
regex, so 1 MB of nested tags costs a few `str.count` passes.
"""

from __future__ import annotations

import dataclasses

from specs_jax.rewards import extract

__all__ = ["ANSWER_ONLY", "THINK_ANSWER", "TagFormat", "boxed_format_reward", "check_format",
           "format_reward", "tag_format_reward"]


@dataclasses.dataclass(frozen=True)
class TagFormat:
  r"""A required sequence of tag pairs.

  Attributes:
    sections: (open, close) pairs in the required order; each tag must occur exactly once.
    allow_prefix: text (not only whitespace) may precede the first open tag.
    allow_suffix: text may follow the last close tag.
    allow_between: text may sit between one section's close tag and the next open tag
      (upstream allows only whitespace there: `</think>\s*<answer>`).
  """

  sections: tuple[tuple[str, str], ...] = ((extract.THINK_OPEN, extract.THINK_CLOSE),
                                           (extract.ANSWER_OPEN, extract.ANSWER_CLOSE))
  allow_prefix: bool = True
  allow_suffix: bool = True
  allow_between: bool = False

  def __post_init__(self):
    tags = [t for pair in self.sections for t in pair]
    if not self.sections or any(not t for t in tags) or len(set(tags)) != len(tags):
      raise ValueError(f"TagFormat needs at least one pair of distinct, non-empty tags, got {self.sections}")


THINK_ANSWER = TagFormat()
ANSWER_ONLY = TagFormat(sections=((extract.ANSWER_OPEN, extract.ANSWER_CLOSE),))


def check_format(text: str, fmt: TagFormat = THINK_ANSWER) -> bool:
  """True iff `text` has exactly the tag structure `fmt` asks for (see TagFormat)."""
  prev_end = None
  for open_tag, close_tag in fmt.sections:
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
      return False
    i, j = text.find(open_tag), text.find(close_tag)
    body_start = i + len(open_tag)
    if j < body_start or not text[body_start:j].strip():
      return False
    if prev_end is None:
      if not fmt.allow_prefix and text[:i].strip():
        return False
    elif i < prev_end or (not fmt.allow_between and text[prev_end:i].strip()):
      return False
    prev_end = j + len(close_tag)
  return fmt.allow_suffix or not text[prev_end:].strip()


def format_reward(text: str) -> float:
  """1.0 iff exactly one non-empty <think>…</think> followed (only whitespace between) by exactly one
  non-empty <answer>…</answer>; else 0.0. The paper's 0.5 weight is applied in the total."""
  return float(check_format(text, THINK_ANSWER))


def tag_format_reward(text: str, tags: tuple[tuple[str, str], ...] | TagFormat) -> float:
  """`format_reward` for other tag pairs, e.g. `(("<answer>", "</answer>"),)` or
  `(("<reasoning>", "</reasoning>"), ("<final>", "</final>"))`."""
  fmt = tags if isinstance(tags, TagFormat) else TagFormat(sections=tuple(tuple(p) for p in tags))
  return float(check_format(text, fmt))


def boxed_format_reward(text: str) -> float:
  r"""1.0 iff the answer (the `<answer>` span, else the whole text) has exactly one non-empty
  `\boxed{}`; for evaluation prompts that ask for a boxed answer."""
  span = extract.answer_span(text)
  boxes = extract.boxed_contents(span if span is not None else text)
  return float(len(boxes) == 1 and bool(boxes[0].strip()))
