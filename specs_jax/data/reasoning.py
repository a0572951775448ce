"""Templated reasoning texts for the synthetic tasks, and the text corpus for the demo tokenizer.

`reasoning_text(example, style)` writes a chain of reasoning read off the example's scene description
(`meta["scene"]`, `meta["task"]`) and its final answer, in one of two styles:

  tagged: <think>{chain}</think>\\n<answer> The answer is $\\boxed{X}$</answer>     (SPECS's format)
  plain:  {chain} Thus, the answer is X.                                          (an untagged base model)

or in any format spec of `formats.py` (`style={"kind": "json"}`, ...). With probability `error_rate` the
chain contains one mistake (a misread number, a missed or extra object, a slip in arithmetic, a wrong
comparison) that it carries through consistently to a wrong final answer, as a weak model would.

The demo trains its tiny base model on a mix of both styles so that, like Qwen2.5-VL-7B (~42 %), it
follows the tag format only part of the time.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

from specs_jax.data import formats as formats_lib
from specs_jax.data.scene import where
from specs_jax.data.types import Example

STYLES = ("tagged", "plain")


@dataclasses.dataclass(frozen=True)
class Reasoning:
  """A written response: its text, the final answer it gives, and whether that answer is the gold one."""

  text: str
  chain: str
  answer: str
  correct: bool
  style: str


def _list_words(words: Sequence[str]) -> str:
  words = list(words)
  if not words:
    return ""
  if len(words) == 1:
    return words[0]
  return ", ".join(words[:-1]) + " and " + words[-1]


def _shapes(panel: Mapping) -> list[dict]:
  return [it for it in panel["items"] if it["type"] == "shape"]


def _numbers(panel: Mapping) -> list[dict]:
  nums = [it for it in panel["items"] if it["type"] == "number"]
  return sorted(nums, key=lambda it: (it["box"][1] // 8, it["box"][0]))  # reading order, row bands


def _at(item: Mapping, panel: Mapping) -> str:
  pos = where(tuple(item["box"]), panel["width"], panel["height"])
  return "in the centre" if pos == "centre" else f"at the {pos}"


def _desc(item: Mapping) -> str:
  return f"{item['colour']} {item['kind']}"


def _sum_steps(values: Sequence[int], slip_at: int | None = None) -> tuple[str, int]:
  """ "3 + 7 = 10, 10 + 5 = 15", with an optional off-by-one slip in one step."""
  total = values[0]
  steps = []
  for i, v in enumerate(values[1:]):
    new = total + v + (1 if slip_at == i else 0)
    steps.append(f"{total} + {v} = {new}")
    total = new
  return ", ".join(steps), total


# ----------------------------------------------------------------------------------------------------------
# One chain writer per family: (meta, rng, error) -> (chain, answer)


def _count(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  t = meta["task"]

  def is_target(s):
    return (t["colour"] is None or s["colour"] == t["colour"]) and (t["shape"] is None or s["kind"] == t["shape"])

  what = {"colour_shape": f"{t['colour']} {t['shape']}s", "colour": f"{t['colour']} objects",
          "shape": f"{t['shape']}s"}[t["variant"]]
  panels = meta["scene"]
  found = [[(s, p) for s in _shapes(p) if is_target(s)] for p in panels]
  others = [(s, k) for k, p in enumerate(panels) for s in _shapes(p) if not is_target(s)]
  if error:  # miss one target, or take a non-target (or a phantom) for one
    flat = [(k, j) for k, f in enumerate(found) for j in range(len(f))]
    if flat and (rng.random() < 0.5 or not others):
      k, j = rng.choice(flat)
      found[k] = found[k][:j] + found[k][j + 1:]
    elif others:
      s, k = rng.choice(others)
      seen_as = {**s, "kind": t["shape"] or s["kind"], "colour": t["colour"] or s["colour"]}
      found[k].append((seen_as, panels[k]))
    else:
      p = panels[0]
      fake = {"kind": t["shape"] or "circle", "colour": t["colour"] or "red",
              "box": [0, 0, p["width"] // 3, p["height"] // 3]}
      found[0].append((fake, p))
  lines = [f"I need to count the {what}."]
  for k, f in enumerate(found):
    prefix = "Looking at the image" if len(panels) == 1 else f"In image {k + 1}"
    if f:
      lines.append(f"{prefix}, I see " + _list_words([f"a {_desc(s)} {_at(s, p)}" for s, p in f]) + ".")
    else:
      lines.append(f"{prefix}, I do not see any {what}.")
  if others and not error:
    shown = list(dict.fromkeys(f"the {_desc(s)}" for s, _ in others))[:3]
    lines.append(f"The other objects, such as {_list_words(shown)}, do not count.")
  counts = [len(f) for f in found]
  n = sum(counts)
  if len(panels) > 1:
    lines.append(f"In total: {' + '.join(map(str, counts))} = {n}.")
  elif n:
    lines.append(f"Counting them: {', '.join(str(i + 1) for i in range(n))}.")
  lines.append(f"So there {'is' if n == 1 else 'are'} {n} {what if n != 1 else what[:-1]}.")
  return " ".join(lines), str(n)


def _digit_sum(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  per_panel = [[it["value"] for it in _numbers(p)] for p in meta["scene"]]
  slip = None
  if error:
    if rng.random() < 0.5 or sum(len(v) for v in per_panel) < 2:  # misread one number
      k = rng.choice([i for i, v in enumerate(per_panel) if v])
      j = rng.randrange(len(per_panel[k]))
      v = per_panel[k][j]
      per_panel[k][j] = v + 1 if v == 0 or rng.random() < 0.5 else v - 1
    else:
      slip = rng.randrange(sum(len(v) for v in per_panel) - 1)
  values = [v for vs in per_panel for v in vs]
  if len(per_panel) == 1:
    lines = [f"The numbers shown are {_list_words(map(str, values))}."]
  else:
    lines = [f"Image {k + 1} shows {_list_words(map(str, vs))}." for k, vs in enumerate(per_panel)]
  steps, total = _sum_steps(values, slip)
  lines.append(f"Adding them: {steps}.")
  lines.append(f"So the sum is {total}.")
  return " ".join(lines), str(total)


_AXIS = {"left": (0, False, "left to right"), "right": (0, True, "right to left"),
         "top": (1, False, "top to bottom"), "bottom": (1, True, "bottom to top")}


def _compare(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  t = meta["task"]
  panel = meta["scene"][0]
  by_desc = {(s["colour"], s["kind"]): s for s in _shapes(panel)}
  opts = [by_desc[tuple(o)] for o in t["options"]]
  letters = "ABCD"
  if t["variant"] in ("largest", "smallest"):
    order = sorted(range(4), key=lambda i: opts[i]["box"][2] - opts[i]["box"][0], reverse=t["variant"] == "largest")
    first = "largest to smallest" if t["variant"] == "largest" else "smallest to largest"
    intro = f"I compare the sizes of the four {opts[0]['kind']}s."
  else:
    axis, rev, first = _AXIS[t["variant"]]
    order = sorted(range(4), key=lambda i: (opts[i]["box"][axis] + opts[i]["box"][axis + 2]), reverse=rev)
    places = [f"the {_desc(o)} ({letters[i]}) is {_at(o, panel)}" for i, o in enumerate(opts)]
    intro = f"Locating the options: {_list_words(places)}."
  if error:
    order[0], order[1] = order[1], order[0]
  ranked = _list_words([f"the {_desc(opts[i])}" for i in order])
  pick = order[0]
  chain = f"{intro} Ordered from {first}: {ranked}. So the answer is the {_desc(opts[pick])}, option {letters[pick]}."
  return chain, letters[pick]


def _measure(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  t = meta["task"]
  w, h = t["width"], t["height"]
  variant = t["variant"]
  if variant == "rect_area":
    area = w * h + (rng.choice((-1, 1)) * rng.randint(1, 2) if error else 0)
    chain = (f"The width of the rectangle is {w} and its height is {h}. The area of a rectangle is its width "
             f"times its height: {w} × {h} = {area}.")
    return chain, str(area)
  if variant == "tri_area":
    chain = f"The two legs of the right triangle are {w} and {h}."
    if error:  # forgets the half
      return chain + f" The area is the product of the legs: {w} × {h} = {w * h}.", str(w * h)
    area = Fraction(w * h, 2)
    value = str(area.numerator) if area.denominator == 1 else f"{w * h // 2}.5"
    return (chain + f" The area of a right triangle is half the product of its legs: {w} × {h} / 2 = "
            f"{w * h} / 2 = {value}.", value)
  if variant == "ratio":
    seen_w = w + 1 if error and w == h else w  # the error misreads a side of a square ...
    a, b = (h, seen_w) if error and w != h else (seen_w, h)  # ... or inverts the ratio
    r = Fraction(a, b)
    chain = (f"The width of the rectangle is {seen_w} and its height is {h}. The ratio of width to height is "
             f"{a}/{b}")
    if r.denominator == 1:
      chain += f", which equals {r.numerator}."
    elif r.numerator == a:
      chain += ", which is already in lowest terms."
    else:
      chain += f". Dividing both by {a // r.numerator} gives {r}."
    return chain, str(r)
  raise ValueError(f"unknown measure variant {variant!r}")


def _yes_no(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  t = meta["task"]
  panel = meta["scene"][0]
  shapes = _shapes(panel)
  if t["variant"] == "exists":
    target = f"{t['colour']} {t['shape']}"
    hits = [s for s in shapes if _desc(s) == target]
    near = [s for s in shapes if _desc(s) != target and (s["colour"] == t["colour"] or s["kind"] == t["shape"])]
    yes = bool(hits) != error
    lines = [f"I look for a {target}."]
    if yes:
      s = hits[0] if hits else (near or shapes)[0]
      lines.append(f"There is a {target} {_at(s, panel)}.")
    elif near:
      lines.append("I see " + _list_words([f"a {_desc(s)} {_at(s, panel)}" for s in near[:3]])
                   + f", but no {target}.")
    else:
      lines.append(f"None of the objects is a {target}.")
    lines.append(f"So the answer is {'yes' if yes else 'no'}.")
    return " ".join(lines), "yes" if yes else "no"
  c1, c2 = t["colour1"], t["colour2"]
  n1 = sum(s["colour"] == c1 for s in shapes)
  n2 = sum(s["colour"] == c2 for s in shapes)
  if error:  # miscounts the first colour so that the comparison flips
    n1 = n2 if n1 > n2 else n2 + 1
  rel = "more than" if n1 > n2 else ("the same as" if n1 == n2 else "fewer than")
  ans = "yes" if n1 > n2 else "no"
  chain = (f"I count the objects of each colour. There {'is' if n1 == 1 else 'are'} {n1} {c1} "
           f"object{'s' if n1 != 1 else ''} and {n2} {c2} object{'s' if n2 != 1 else ''}. "
           f"{n1} is {rel} {n2}, so the answer is {ans}.")
  return chain, ans


def _digit_product(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  a, b = [it["value"] for it in _numbers(meta["scene"][0])]
  if error:
    b = b + 1 if rng.random() < 0.5 else b - 1
  return f"The numbers shown are {a} and {b}. Their product is {a} × {b} = {a * b}.", str(a * b)


def _perimeter(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  w, h = meta["task"]["width"], meta["task"]["height"]
  chain = f"The width of the rectangle is {w} and its height is {h}."
  if error:  # forgets to double
    return chain + f" The perimeter is {w} + {h} = {w + h}.", str(w + h)
  return chain + f" The perimeter of a rectangle is 2 × (width + height) = 2 × ({w} + {h}) = {2 * (w + h)}.", \
      str(2 * (w + h))


def _majority_colour(meta: Mapping, rng: random.Random, error: bool) -> tuple[str, str]:
  t = meta["task"]
  shapes = _shapes(meta["scene"][0])
  counts = [sum(s["colour"] == c for s in shapes) for c in t["options"]]
  if error:  # over-counts a runner-up past the true majority
    i = rng.choice([k for k in range(4) if k != t["answer_index"]])
    counts[i] = max(counts) + 1
  best = max(range(4), key=lambda k: counts[k])
  listed = _list_words([f"{c} {n}" for c, n in zip(t["options"], counts)])
  chain = f"Counting the objects by colour: {listed}. {t['options'][best].capitalize()} appears most often, " \
          f"which is option {'ABCD'[best]}."
  return chain, "ABCD"[best]


WRITERS = {
    "count": _count,
    "digit_sum": _digit_sum,
    "compare": _compare,
    "measure": _measure,
    "yes_no": _yes_no,
    "digit_product": _digit_product,
    "perimeter": _perimeter,
    "majority_colour": _majority_colour,
}


# ----------------------------------------------------------------------------------------------------------
# Public API


def reasoning_sample(example: Example, style: str | Mapping[str, str] = "tagged", error_rate: float = 0.0,
                     rng: random.Random | None = None) -> Reasoning:
  """A reasoning text for a synthetic example, with its final answer and correctness.

  Args:
    example: an example from `synthetic.make_split` / `make_example` (needs meta "family", "task", "scene").
    style: "tagged", "plain", or a format spec dict from `formats.py`.
    error_rate: probability in [0, 1] that the chain contains one mistake leading to a wrong answer.
    rng: source of randomness (phrasing choices and errors); default `random.Random(example.id)`.
  """
  family = example.meta.get("family")
  if family not in WRITERS or "scene" not in example.meta:
    raise ValueError(f"{example.id}: reasoning texts need a synthetic example (meta['family'] in "
                     f"{sorted(WRITERS)}), got family {family!r}")
  if not 0.0 <= error_rate <= 1.0:
    raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
  rng = rng if rng is not None else random.Random(example.id)
  error = rng.random() < error_rate
  chain, answer = WRITERS[family](example.meta, rng, error)
  if style == "tagged":
    text = formats_lib.render_response(chain, answer, formats_lib.DEFAULT_FORMAT)
    name = "tagged"
  elif style == "plain":
    text = f"{chain} Thus, the answer is {answer}."
    name = "plain"
  elif isinstance(style, Mapping):
    text = formats_lib.render_response(chain, answer, style)
    name = formats_lib.format_name(style)
  else:
    raise ValueError(f"style must be 'tagged', 'plain' or a format spec, got {style!r}")
  return Reasoning(text=text, chain=chain, answer=answer, correct=answer == example.gold, style=name)


def reasoning_text(example: Example, style: str | Mapping[str, str] = "tagged", error_rate: float = 0.0,
                   rng: random.Random | None = None) -> str:
  """The text of `reasoning_sample(...)`: a chain of reasoning and the answer, in the given style."""
  return reasoning_sample(example, style, error_rate, rng).text


def corpus(n: int, seed: int = 0, *, image_size: tuple[int, int] = (56, 112)) -> Iterator[str]:
  """n representative strings for training the demo tokenizer.

  A mix of prompts (questions with every format instruction), responses (tagged, plain and every OOD
  format, some with errors) over all families, and the system prompts. Deterministic in (n, seed).
  """
  from specs_jax.data import synthetic  # local import: synthetic re-exports this module

  families = synthetic.ID_FAMILIES + synthetic.OOD_FAMILIES
  all_formats = (formats_lib.DEFAULT_FORMAT,) + formats_lib.OOD_FORMATS
  rng = random.Random(f"specs_jax.corpus:{seed}")
  for i in range(n):
    r = rng.random()
    if r < 0.02:
      yield formats_lib.MM_EUREKA_SYSTEM_PROMPT
      continue
    spec = all_formats[rng.randrange(len(all_formats))]
    ex = synthetic.make_example("corpus", i, seed, family=families[i % len(families)], format_spec=spec,
                                image_size=image_size, side=None)
    if r < 0.4:
      yield ex.meta["question"] + "\n" + ex.meta["instruction"]
    else:
      style: Any = rng.choice(("tagged", "plain", spec))
      yield reasoning_text(ex, style, error_rate=0.2, rng=rng)
