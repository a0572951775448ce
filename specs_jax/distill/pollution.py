r"""Format pollution for rejected responses: five corruptions, and a seeded mix of them (RECIPE.md §2).

A rejected response is a base-model rollout whose answer passed the answer filter; pollution makes sure
its *format* is wrong while its *answer* stays what it was, so that a decoupled pair differs in format
only. The five corruptions (RECIPE.md §2 names them; their proportions are not reported, so the mix is
a config knob, uniform by default):

| kind                 | result layout (R = reasoning, A = answer statement, X = final answer)          |
|----------------------|--------------------------------------------------------------------------------|
| `remove_all_tags`    | `R\nA` (a text that has no tags is returned as it is)                          |
| `remove_answer_tags` | `<think>R</think>\nA`                                                          |
| `remove_think_tags`  | `R\n<answer>A</answer>`                                                        |
| `answer_line`        | `<think>R</think>\nAnswer: X` (the answer tags become a plain "Answer:" line)   |
| `misplace_tags`      | one of: `swap` `<answer>A</answer>\n<think>R</think>`;                         |
|                      | `answer_in_think` `<think>R\n<answer>A</answer></think>`;                      |
|                      | `interleave` `<think>R\n<answer>A</think></answer>`;                           |
|                      | `empty_think` `<think></think>\nR\n<answer>A</answer>`                         |

R, A and X come from `parse.split_response`, so any input works: tagged, plain prose, an answer inside
<think>, nested or doubled tags. Where A ends up outside an <answer> tag and does not name its answer
itself (it came from `<answer>12</answer>`), it is written as "The answer is 12".

Guarantees, for any input with a final answer (tested on each kind, and checked again by the pipeline):
`rewards.format_reward(out) == 0` and `parse.final_answer(out) == parse.final_answer(text)`. Every
function returns None when the input has no final answer to keep. Pure text, no JAX.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

from specs_jax.distill import parse
from specs_jax.distill.parse import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, Parts

__all__ = ["Corruption", "DEFAULT_WEIGHTS", "KINDS", "MISPLACE_VARIANTS", "answer_line", "corrupt", "draw_kind",
           "misplace_tags", "pollute", "remove_all_tags", "remove_answer_tags", "remove_think_tags",
           "validate_weights"]

KINDS = ("remove_all_tags", "remove_answer_tags", "remove_think_tags", "answer_line", "misplace_tags")
MISPLACE_VARIANTS = ("swap", "answer_in_think", "interleave", "empty_think")
DEFAULT_WEIGHTS: Mapping[str, float] = {k: 1.0 for k in KINDS}


@dataclasses.dataclass(frozen=True)
class Corruption:
  """A polluted response. kind: one of KINDS; variant: the misplacement used (None for other kinds)."""

  text: str
  kind: str
  variant: str | None = None


def _join(*pieces: str) -> str:
  return "\n".join(p for p in pieces if p)


def _named(p: Parts) -> str:
  """The answer statement, made to name its answer when it stands outside an <answer> tag."""
  return p.statement if parse.has_commitment(p.statement) else f"The answer is {p.statement}"


def _tag(open_tag: str, body: str, close_tag: str) -> str:
  return f"{open_tag}{body}{close_tag}"


def remove_all_tags(text: str) -> str | None:
  """Corruption 1: no tags at all. A text without tags is returned unchanged."""
  p = parse.split_response(text)
  if p is None:
    return None
  if not parse.has_tags(text):
    return text
  return _join(p.reasoning, _named(p))


def remove_answer_tags(text: str) -> str | None:
  """Corruption 2: the reasoning in <think> tags, the answer statement bare after it."""
  p = parse.split_response(text)
  if p is None:
    return None
  return _join(_tag(THINK_OPEN, p.reasoning, THINK_CLOSE), _named(p))


def remove_think_tags(text: str) -> str | None:
  """Corruption 3: bare reasoning, then the answer statement in <answer> tags."""
  p = parse.split_response(text)
  if p is None:
    return None
  return _join(p.reasoning, _tag(ANSWER_OPEN, p.statement, ANSWER_CLOSE))


def answer_line(text: str) -> str | None:
  """Corruption 4: the answer tags replaced by a plain last line "Answer: X"."""
  p = parse.split_response(text)
  if p is None:
    return None
  return _join(_tag(THINK_OPEN, p.reasoning, THINK_CLOSE), f"Answer: {p.answer}")


def misplace_tags(text: str, variant: str = "swap") -> str | None:
  """Corruption 5: all four tags present once, in the wrong places (`MISPLACE_VARIANTS`)."""
  if variant not in MISPLACE_VARIANTS:
    raise ValueError(f"unknown misplacement {variant!r}; expected one of {MISPLACE_VARIANTS}")
  p = parse.split_response(text)
  if p is None:
    return None
  answer = _tag(ANSWER_OPEN, p.statement, ANSWER_CLOSE)
  if variant == "swap":
    return _join(answer, _tag(THINK_OPEN, p.reasoning, THINK_CLOSE))
  if variant == "answer_in_think":
    return _tag(THINK_OPEN, _join(p.reasoning, answer), THINK_CLOSE)
  if variant == "interleave":
    return _join(THINK_OPEN + p.reasoning, ANSWER_OPEN + p.statement + THINK_CLOSE + ANSWER_CLOSE)
  return _join(THINK_OPEN + THINK_CLOSE, p.reasoning, answer)


_SIMPLE = {"remove_all_tags": remove_all_tags, "remove_answer_tags": remove_answer_tags,
           "remove_think_tags": remove_think_tags, "answer_line": answer_line}


def corrupt(text: str, kind: str, variant: str | None = None) -> Corruption | None:
  """Applies one corruption by name. `variant` is for `misplace_tags` only (default "swap")."""
  if kind == "misplace_tags":
    variant = variant or "swap"
    out = misplace_tags(text, variant)
  elif kind in _SIMPLE:
    if variant is not None:
      raise ValueError(f"corruption {kind!r} has no variants, got variant={variant!r}")
    out = _SIMPLE[kind](text)
  else:
    raise ValueError(f"unknown corruption {kind!r}; expected one of {KINDS}")
  return None if out is None else Corruption(out, kind, variant)


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
  """A plain dict of the mix weights, or a ValueError naming the problem (unknown kind, negative, all zero)."""
  unknown = sorted(set(weights) - set(KINDS))
  if unknown:
    raise ValueError(f"unknown corruption kinds {unknown}; expected a subset of {KINDS}")
  out = {k: float(weights.get(k, 0.0)) for k in KINDS}
  if any(w < 0 for w in out.values()) or sum(out.values()) <= 0:
    raise ValueError(f"corruption weights must be >= 0 with a positive sum, got {dict(weights)}")
  return out


def draw_kind(rng: random.Random, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> tuple[str, str | None]:
  """Draws (kind, variant) from the mix; variants of `misplace_tags` are drawn uniformly."""
  w = validate_weights(weights)
  kind = rng.choices(KINDS, weights=[w[k] for k in KINDS])[0]
  return kind, (rng.choice(MISPLACE_VARIANTS) if kind == "misplace_tags" else None)


def pollute(text: str, rng: random.Random, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> Corruption | None:
  """One corruption drawn from the seeded mix, applied to `text`; None when it has no final answer."""
  kind, variant = draw_kind(rng, weights)
  return corrupt(text, kind, variant)
