"""Procedural visual-reasoning tasks with verifiable gold answers: the embedded default data.

Nothing is downloaded. A task is a scene description (`scene.Panel`s: shapes, seven-segment numbers,
labelled figures), a question about it, and a gold answer read off the scene. Images are rendered lazily
by `scene.SyntheticImage` (PIL, no fonts), so building thousands of prompts is cheap.

Families (in-distribution, used by "train" and "eval_id"):

| family      | question                                              | answer types                 |
|-------------|-------------------------------------------------------|------------------------------|
| count       | how many (colour) (shape)s, across 1-2 images          | integer                      |
| digit_sum   | sum of the numbers shown, across 1-3 images            | integer                      |
| compare     | largest / smallest / furthest left, right, up, down    | multiple_choice (A-D)        |
| measure     | area of a labelled rectangle or right triangle, ratio  | integer, float, fraction     |
| yes_no      | is there a (colour) (shape); more X than Y objects     | yes_no                       |

Out-of-distribution families ("eval_ood_task"), never in "train": digit_product, perimeter, majority_colour.

Splits (`make_split`): "train" (the RL prompt pool), "eval_id" (held out: the same families and format),
"eval_ood_format" (held-out in-distribution tasks asked with the `formats.OOD_FORMATS` instructions) and
"eval_ood_task" (the unseen families with the default instruction). Every item is a pure function of
(split, seed, index): item i does not depend on n, and the same seed gives byte-identical examples.
Train and eval scenes are disjoint: a scene belongs to the eval side iff a hash of (family, question,
scene) falls below `EVAL_FRACTION`, and each split only accepts scenes from its side.

Difficulty `level` 1-3 sets the object counts, the distractors, the grid density and how many images a
sample has. Image sides are multiples of 28 px (Qwen2.5-VL's patch 14 x merge 2) within `image_size`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from fractions import Fraction

from specs_jax.data import formats as formats_lib
from specs_jax.data.scene import (COLOURS, SHAPES, Figure, Number, Panel, Shape, SyntheticImage, box_in_cell,
                                  grid_cells, number_width)
from specs_jax.data.types import Example, user_message

ID_FAMILIES = ("count", "digit_sum", "compare", "measure", "yes_no")
OOD_FAMILIES = ("digit_product", "perimeter", "majority_colour")
SPLITS = ("train", "eval_id", "eval_ood_format", "eval_ood_task")
LEVELS = (1, 2, 3)
EVAL_FRACTION = 0.2
DEFAULT_IMAGE_SIZE = (56, 112)
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 56, 448
MIN_CELL = 14  # smallest grid cell (px): shapes stay >= 5 px and digits >= 7 px tall

HINTS = {
    "integer": "Answer with an integer.",
    "float": "Answer with a decimal number.",
    "fraction": "Answer with a fraction in lowest terms, such as 3/4 (or an integer if it is whole).",
    "multiple_choice": "Answer with the option's letter.",
    "yes_no": "Answer yes or no.",
}
LETTERS = "ABCD"


@dataclasses.dataclass
class Task:
  """What a family generator returns. `params` is JSON-able and tells the reasoning writer what was asked."""

  family: str
  variant: str
  question: str  # the question proper, with its options and answer-type hint
  gold: str
  answer_type: str
  panels: list[Panel]
  params: dict
  choices: list[str] | None = None


# ----------------------------------------------------------------------------------------------------------
# Layout helpers


def _canvas(rng: random.Random, size_range: tuple[int, int]) -> tuple[int, int]:
  lo, hi = size_range
  sides = [s for s in range(lo, hi + 1) if s % 28 == 0] or list(range(lo, hi + 1))
  return rng.choice(sides), rng.choice(sides)


def _grid(w: int, h: int, g: int) -> list[tuple[int, int, int, int]]:
  return grid_cells(w, h, min(g, w // MIN_CELL), min(g, h // MIN_CELL))


def _cell_side(cell) -> int:
  return min(cell[2] - cell[0], cell[3] - cell[1])


def _offset(rng: random.Random, lo: float = 0.0, hi: float = 1.0) -> tuple[float, float]:
  return (rng.uniform(lo, hi), rng.uniform(lo, hi))


def _shape_size(rng: random.Random, cell, lo: float = 0.45, hi: float = 0.85) -> int:
  c = _cell_side(cell)
  return rng.randint(max(5, round(lo * c)), max(5, min(c - 2, round(hi * c))))


def _scatter_shapes(rng: random.Random, w: int, h: int, g: int, specs: Sequence[tuple[str, str]]) -> list[Shape]:
  """One shape per (kind, colour) spec, each in its own random grid cell at a random offset and size."""
  cells = _grid(w, h, g)
  if len(specs) > len(cells):
    raise ValueError(f"{len(specs)} shapes do not fit in {len(cells)} cells")
  out = []
  for (kind, colour), cell in zip(specs, rng.sample(cells, len(specs))):
    s = _shape_size(rng, cell)
    out.append(Shape(kind, colour, box_in_cell(cell, s, s, _offset(rng))))
  return out


def _split_across(rng: random.Random, items: list, n_panels: int) -> list[list]:
  """Assigns items to panels at random, every panel getting at least one item when there are enough."""
  items = list(items)
  rng.shuffle(items)
  groups: list[list] = [[] for _ in range(n_panels)]
  for i, it in enumerate(items):
    groups[i if i < n_panels else rng.randrange(n_panels)].append(it)
  return groups


def _background(rng: random.Random) -> str:
  return rng.choice(("white", "white", "ivory", "mist"))


def _plural(shape: str) -> str:
  return shape + "s"


def _in_image(n_panels: int) -> str:
  return "in the image" if n_panels == 1 else f"in total in the {n_panels} images"


def _options_text(options: Sequence[str]) -> str:
  return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


# ----------------------------------------------------------------------------------------------------------
# In-distribution families


def gen_count(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  n_target = rng.randint(*{1: (0, 3), 2: (1, 5), 3: (2, 7)}[level])
  n_distract = rng.randint(*{1: (0, 2), 2: (1, 5), 3: (3, 7)}[level])
  n_panels = 2 if (level == 3 and rng.random() < 0.5) or (level == 2 and rng.random() < 0.2) else 1
  variant = rng.choice(("colour_shape", "colour_shape", "colour", "shape"))
  colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
  other_colours = [c for c in COLOURS if c != colour]
  other_shapes = [s for s in SHAPES if s != shape]
  targets, distractors = [], []
  for _ in range(n_target):
    targets.append((shape if variant != "colour" else rng.choice(SHAPES),
                    colour if variant != "shape" else rng.choice(list(COLOURS))))
  for _ in range(n_distract):
    if variant == "colour":
      distractors.append((rng.choice(SHAPES), rng.choice(other_colours)))
    elif variant == "shape":
      distractors.append((rng.choice(other_shapes), rng.choice(list(COLOURS))))
    else:  # mostly hard distractors that share one attribute with the target
      r = rng.random()
      if r < 0.35:
        distractors.append((shape, rng.choice(other_colours)))
      elif r < 0.7:
        distractors.append((rng.choice(other_shapes), colour))
      else:
        distractors.append((rng.choice(other_shapes), rng.choice(other_colours)))
  g = 3 if level == 1 else 4
  panels = []
  for group in _split_across(rng, targets + distractors, n_panels):
    w, h = _canvas(rng, size_range)
    panels.append(Panel(w, h, _background(rng), tuple(_scatter_shapes(rng, w, h, g, group))))
  what = {"colour_shape": f"{colour} {_plural(shape)}", "colour": f"{colour} objects",
          "shape": _plural(shape)}[variant]
  question = f"How many {what} are there {_in_image(n_panels)}?\n{HINTS['integer']}"
  params = {"variant": variant, "colour": colour if variant != "shape" else None,
            "shape": shape if variant != "colour" else None}
  return Task("count", variant, question, str(n_target), "integer", panels, params)


def _place_numbers(rng: random.Random, w: int, h: int, values: Sequence[int]) -> list[Number]:
  cells = rng.sample(_grid(w, h, 3), len(values))
  out = []
  for v, cell in zip(values, cells):
    c = _cell_side(cell)
    height = max(7, min(24, round(0.6 * c)))
    while height > 7 and number_width(v, height) > (cell[2] - cell[0]) - 2:
      height -= 1
    nw = number_width(v, height)
    x0, y0, x1, y1 = box_in_cell(cell, nw, height, _offset(rng))
    out.append(Number(v, x0, y0, height))
  return out


def gen_digit_sum(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  n = {1: 2, 2: 3, 3: rng.randint(3, 4)}[level]
  values = [rng.randint(10, 30) if level == 3 and rng.random() < 0.5 else rng.randint(0, 9) for _ in range(n)]
  n_panels = {1: 1, 2: rng.choice((1, 1, 2)), 3: rng.choice((1, 2, 3))}[level]
  panels = []
  for group in _split_across(rng, values, n_panels):
    w, h = _canvas(rng, size_range)
    panels.append(Panel(w, h, _background(rng), tuple(_place_numbers(rng, w, h, group))))
  where = "in the image" if n_panels == 1 else f"across the {n_panels} images"
  question = f"What is the sum of all the numbers shown {where}?\n{HINTS['integer']}"
  return Task("digit_sum", "sum", question, str(sum(values)), "integer", panels, {"variant": "sum"})


def _compare_size(rng: random.Random, level: int, size_range) -> Task:
  variant = rng.choice(("largest", "smallest"))
  shape = rng.choice(SHAPES)
  colours = rng.sample(list(COLOURS), 4)
  n_distract = {1: 0, 2: 1, 3: rng.randint(2, 3)}[level]
  w, h = _canvas(rng, size_range)
  cells = rng.sample(_grid(w, h, 3 if level < 3 else 4), 4 + n_distract)
  c = min(_cell_side(cell) for cell in cells)
  # The extreme differs from every other option by a factor >= 1.3 in side length.
  if variant == "largest":
    ext = rng.randint(round(0.75 * c), c - 2)
    others = [rng.randint(max(5, round(0.35 * c)), int(ext / 1.3)) for _ in range(3)]
  else:
    ext = rng.randint(5, max(5, round(0.4 * c)))
    others = [rng.randint(-(-ext * 13 // 10), c - 2) for _ in range(3)]
  answer_index = rng.randrange(4)
  sizes = others[:answer_index] + [ext] + others[answer_index:]
  items = [Shape(shape, col, box_in_cell(cell, s, s, _offset(rng)))
           for col, s, cell in zip(colours, sizes, cells[:4])]
  for cell in cells[4:]:
    s = _shape_size(rng, cell)
    kind = rng.choice([k for k in SHAPES if k != shape])
    items.append(Shape(kind, rng.choice(list(COLOURS)), box_in_cell(cell, s, s, _offset(rng))))
  rng.shuffle(items)
  options = [f"the {col} {shape}" for col in colours]
  question = f"Which {shape} is the {variant}?\n{_options_text(options)}\n{HINTS['multiple_choice']}"
  params = {"variant": variant, "options": [[col, shape] for col in colours], "answer_index": answer_index}
  return Task("compare", variant, question, LETTERS[answer_index], "multiple_choice",
              [Panel(w, h, _background(rng), tuple(items))], params, options)


_DIRECTION = {  # variant -> (axis, sign, question words); the target minimises sign * cell coordinate
    "left": (0, 1, "furthest to the left"),
    "right": (0, -1, "furthest to the right"),
    "top": (1, 1, "closest to the top"),
    "bottom": (1, -1, "closest to the bottom"),
}


def _compare_position(rng: random.Random, level: int, size_range) -> Task:
  variant = rng.choice(tuple(_DIRECTION))
  axis, sign, words = _DIRECTION[variant]
  n_distract = {1: 0, 2: 1, 3: rng.randint(2, 3)}[level]
  w, h = _canvas(rng, size_range)
  grid = _grid(w, h, 3 if level < 3 else 4)
  while True:  # 4 option cells whose extreme along the axis is unique (a strictly smaller grid index)
    cells = rng.sample(grid, 4)
    keys = sorted(sign * cell[axis] for cell in cells)
    if keys[0] < keys[1]:
      break
  target = min(range(4), key=lambda i: sign * cells[i][axis])
  rest = [cell for cell in grid if cell not in cells]
  cells += rng.sample(rest, min(n_distract, len(rest)))
  descs = rng.sample([(col, kind) for col in COLOURS for kind in SHAPES], len(cells))  # all distinct
  items = []
  for (col, kind), cell in zip(descs, cells):
    s = _shape_size(rng, cell)
    items.append(Shape(kind, col, box_in_cell(cell, s, s, _offset(rng, 0.4, 0.6))))
  order = list(range(4))
  rng.shuffle(order)  # option letter -> object index
  options = [f"the {descs[i][0]} {descs[i][1]}" for i in order]
  answer_index = order.index(target)
  rng.shuffle(items)
  question = f"Which of these objects is {words}?\n{_options_text(options)}\n{HINTS['multiple_choice']}"
  params = {"variant": variant, "options": [list(descs[i]) for i in order], "answer_index": answer_index}
  return Task("compare", variant, question, LETTERS[answer_index], "multiple_choice",
              [Panel(w, h, _background(rng), tuple(items))], params, options)


def gen_compare(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  return (_compare_size if rng.random() < 0.5 else _compare_position)(rng, level, size_range)


def _labelled_figure(rng: random.Random, kind: str, wl: int, hl: int, size_range) -> Panel:
  """A rectangle or right triangle drawn to scale, width label below it, height label to its left."""
  w, h = _canvas(rng, size_range)
  dh = max(7, min(20, round(min(w, h) / 7)))  # label digit height
  left = number_width(max(wl, hl, 10), dh) + 4
  bottom = dh + 4
  aw, ah = w - left - 3, h - bottom - 3
  scale = min(aw / wl, ah / hl) * rng.uniform(0.7, 1.0)
  fw, fh = max(5, round(wl * scale)), max(5, round(hl * scale))
  x0, y0 = left + rng.randint(0, aw - fw), 3 + rng.randint(0, ah - fh)
  figure = Figure(kind, (x0, y0, x0 + fw, y0 + fh), wl, hl, line=max(1, min(w, h) // 56))
  nw = number_width(wl, dh)
  width_label = Number(wl, min(max(1, x0 + (fw - nw) // 2), w - nw - 1), y0 + fh + 2, dh)
  hw = number_width(hl, dh)
  height_label = Number(hl, x0 - 2 - hw, min(max(1, y0 + (fh - dh) // 2), h - dh - 1), dh)
  return Panel(w, h, _background(rng), (figure, width_label, height_label))


def _side_labels(rng: random.Random, level: int) -> tuple[int, int]:
  lo, hi = {1: (1, 6), 2: (2, 9), 3: (3, 15)}[level]
  while True:
    wl, hl = rng.randint(lo, hi), rng.randint(lo, hi)
    if max(wl, hl) <= 3 * min(wl, hl):
      return wl, hl


_RECT_INTRO = "The figure shows a rectangle. Its width is written below it and its height to its left."


def gen_measure(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  variant = rng.choice(("rect_area", "tri_area", "ratio"))
  wl, hl = _side_labels(rng, level)
  params = {"variant": variant, "width": wl, "height": hl}
  if variant == "rect_area":
    panel = _labelled_figure(rng, "rectangle", wl, hl, size_range)
    gold, answer_type = str(wl * hl), "integer"
    question = f"{_RECT_INTRO} What is the area of the rectangle?"
  elif variant == "tri_area":
    panel = _labelled_figure(rng, "right_triangle", wl, hl, size_range)
    area = Fraction(wl * hl, 2)
    gold, answer_type = (str(area.numerator), "integer") if area.denominator == 1 else (f"{wl * hl // 2}.5", "float")
    question = ("The figure shows a right triangle. The lengths of its two legs are written next to them. "
                "What is the area of the triangle?")
  else:
    panel = _labelled_figure(rng, "rectangle", wl, hl, size_range)
    ratio = Fraction(wl, hl)
    gold, answer_type = str(ratio), "fraction"
    question = f"{_RECT_INTRO} What is the ratio of its width to its height?"
  return Task("measure", variant, f"{question}\n{HINTS[answer_type]}", gold, answer_type, [panel], params)


def gen_yes_no(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  yes = rng.random() < 0.5
  w, h = _canvas(rng, size_range)
  g = 3 if level == 1 else 4
  if rng.random() < 0.5:
    variant = "exists"
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    n_target = rng.randint(1, 1 if level == 1 else 2) if yes else 0
    n_distract = rng.randint(*{1: (1, 3), 2: (3, 6), 3: (5, 9)}[level])
    specs = [(shape, colour)] * n_target
    for _ in range(n_distract):
      other_shape = rng.choice([s for s in SHAPES if s != shape])
      other_colour = rng.choice([c for c in COLOURS if c != colour])
      specs.append(rng.choice(((shape, other_colour), (other_shape, colour), (other_shape, other_colour))))
    question = f"Is there a {colour} {shape} in the image?"
    params = {"variant": variant, "colour": colour, "shape": shape}
  else:
    variant = "more"
    c1, c2 = rng.sample(list(COLOURS), 2)
    top = {1: 3, 2: 5, 3: 6}[level]
    if yes:
      n2 = rng.randint(0, top - 1)
      n1 = rng.randint(n2 + 1, top)
    else:
      n1 = rng.randint(0, top - 1 if level == 1 else top)
      n2 = rng.randint(max(n1, 1), top) if level == 1 or rng.random() < 0.7 else n1
    others = [c for c in COLOURS if c not in (c1, c2)]
    n_other = 0 if level == 1 else rng.randint(1, 3)
    specs = ([(rng.choice(SHAPES), c1) for _ in range(n1)] + [(rng.choice(SHAPES), c2) for _ in range(n2)]
             + [(rng.choice(SHAPES), rng.choice(others)) for _ in range(n_other)])
    question = f"Are there more {c1} objects than {c2} objects in the image?"
    params = {"variant": variant, "colour1": c1, "colour2": c2}
  rng.shuffle(specs)
  panel = Panel(w, h, _background(rng), tuple(_scatter_shapes(rng, w, h, g, specs)))
  return Task("yes_no", variant, f"{question}\n{HINTS['yes_no']}", "yes" if yes else "no", "yes_no", [panel],
              params)


# ----------------------------------------------------------------------------------------------------------
# Out-of-distribution families


def gen_digit_product(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  hi = {1: 5, 2: 9, 3: 12}[level]
  a, b = rng.randint(2, hi), rng.randint(2, hi)
  w, h = _canvas(rng, size_range)
  panel = Panel(w, h, _background(rng), tuple(_place_numbers(rng, w, h, [a, b])))
  question = f"What is the product of the two numbers shown in the image?\n{HINTS['integer']}"
  return Task("digit_product", "product", question, str(a * b), "integer", [panel], {"variant": "product"})


def gen_perimeter(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  wl, hl = _side_labels(rng, level)
  panel = _labelled_figure(rng, "rectangle", wl, hl, size_range)
  question = f"{_RECT_INTRO} What is the perimeter of the rectangle?\n{HINTS['integer']}"
  return Task("perimeter", "rect_perimeter", question, str(2 * (wl + hl)), "integer", [panel],
              {"variant": "rect_perimeter", "width": wl, "height": hl})


def gen_majority_colour(rng: random.Random, level: int, size_range: tuple[int, int]) -> Task:
  colours = rng.sample(list(COLOURS), 4)
  m = rng.randint(2, {1: 3, 2: 4, 3: 4}[level])
  answer_index = rng.randrange(4)
  counts = [m if i == answer_index else rng.randint(0 if level == 1 else 1, m - 1) for i in range(4)]
  specs = [(rng.choice(SHAPES), col) for col, k in zip(colours, counts) for _ in range(k)]
  rng.shuffle(specs)
  w, h = _canvas(rng, size_range)
  panel = Panel(w, h, _background(rng), tuple(_scatter_shapes(rng, w, h, 4, specs)))
  question = (f"Which colour appears most often among the objects in the image?\n{_options_text(colours)}\n"
              f"{HINTS['multiple_choice']}")
  params = {"variant": "majority", "options": colours, "answer_index": answer_index}
  return Task("majority_colour", "majority", question, LETTERS[answer_index], "multiple_choice", [panel],
              params, list(colours))


GENERATORS: dict[str, Callable[[random.Random, int, tuple[int, int]], Task]] = {
    "count": gen_count,
    "digit_sum": gen_digit_sum,
    "compare": gen_compare,
    "measure": gen_measure,
    "yes_no": gen_yes_no,
    "digit_product": gen_digit_product,
    "perimeter": gen_perimeter,
    "majority_colour": gen_majority_colour,
}


# ----------------------------------------------------------------------------------------------------------
# Examples and splits


def _scene_hash(task: Task) -> float:
  key = json.dumps([task.family, task.question, [p.to_dict() for p in task.panels]], sort_keys=True)
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _check_size_range(image_size: tuple[int, int]) -> tuple[int, int]:
  lo, hi = image_size
  if not (MIN_IMAGE_SIDE <= lo <= hi <= MAX_IMAGE_SIDE):
    raise ValueError(f"image_size must satisfy {MIN_IMAGE_SIDE} <= lo <= hi <= {MAX_IMAGE_SIDE}, got {image_size}")
  return lo, hi


def make_example(split: str, index: int, seed: int = 0, *, family: str, level: int | None = None,
                 format_spec: formats_lib.FormatSpec = formats_lib.DEFAULT_FORMAT,
                 image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, side: str | None = None,
                 levels: Sequence[int] = LEVELS) -> Example:
  """One synthetic example, a pure function of its arguments.

  Args:
    split: any name; it seeds the draw (the four `SPLITS` names also pick the held-out side).
    index: position in the split.
    seed: global seed.
    family: one of `GENERATORS`.
    level: difficulty 1-3; None draws one from `levels`.
    format_spec: the output format the prompt asks for (`formats.py`).
    image_size: (lo, hi) range of image sides in px.
    side: "train", "eval" or None (accept any scene); defaults from the split name.
    levels: the levels to draw from when `level` is None.
  """
  if family not in GENERATORS:
    raise ValueError(f"unknown family {family!r}; expected one of {sorted(GENERATORS)}")
  size_range = _check_size_range(image_size)
  spec = formats_lib.validate_format_spec(format_spec)
  if side is None:
    side = "train" if split == "train" else ("eval" if split in SPLITS else None)
  for attempt in range(10_000):
    rng = random.Random(f"specs_jax.synthetic:{seed}:{split}:{index}:{attempt}")
    lvl = level if level is not None else rng.choice(tuple(levels))
    task = GENERATORS[family](rng, lvl, size_range)
    if side is None or (_scene_hash(task) < EVAL_FRACTION) == (side == "eval"):
      break
  else:  # pragma: no cover - probability ~ 0.8 ** 10000
    raise RuntimeError("could not draw a scene for the requested side")
  instruction = formats_lib.format_instruction(spec)
  meta = {
      "question": task.question,
      "instruction": instruction,
      "format": spec,
      "family": task.family,
      "variant": task.variant,
      "level": lvl,
      "split": split,
      "choices": task.choices,
      "task": task.params,
      "scene": [p.to_dict() for p in task.panels],
  }
  return Example(
      id=f"synthetic/{split}/{seed}/{index:06d}",
      messages=[user_message(f"{task.question}\n{instruction}", num_images=len(task.panels))],
      images=[SyntheticImage(p) for p in task.panels],
      gold=task.gold,
      answer_type=task.answer_type,
      source="synthetic",
      meta=meta,
  )


def make_split(name: str, n: int, seed: int = 0, *, families: Sequence[str] | None = None,
               levels: Sequence[int] = LEVELS, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
               formats: Sequence[formats_lib.FormatSpec] | None = None) -> list[Example]:
  """The first n examples of a synthetic split.

  Args:
    name: "train", "eval_id", "eval_ood_format" or "eval_ood_task".
    n: number of examples; example i is the same for every n > i.
    seed: global seed; the same seed gives byte-identical examples.
    families: override the split's families (default: ID families, or OOD ones for "eval_ood_task").
      Families take turns (example i has family i % len(families)), so every family is balanced.
    levels: difficulty levels to draw from, uniformly.
    image_size: (lo, hi) image side range in px, 56 <= lo <= hi <= 448; sides are multiples of 28 when
      the range contains one.
    formats: override the format specs; they take turns over blocks of len(families) examples, so each
      family meets each format. Default: the SPECS tags, or `formats.OOD_FORMATS` for "eval_ood_format".

  Returns:
    A list of `Example`s with lazy images (`example.load_images()` renders them).
  """
  if name not in SPLITS:
    raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if not levels or any(lvl not in LEVELS for lvl in levels):
    raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
  fams = tuple(families) if families is not None else (OOD_FAMILIES if name == "eval_ood_task" else ID_FAMILIES)
  if not fams:
    raise ValueError("families must not be empty")
  specs = tuple(formats) if formats is not None else (
      formats_lib.OOD_FORMATS if name == "eval_ood_format" else (formats_lib.DEFAULT_FORMAT,))
  if not specs:
    raise ValueError("formats must not be empty")
  return [
      make_example(name, i, seed, family=fams[i % len(fams)], levels=levels, image_size=image_size,
                   format_spec=specs[(i // len(fams)) % len(specs)])
      for i in range(n)
  ]


# Re-exported so that `synthetic` is the one import the demo needs.
from specs_jax.data.reasoning import Reasoning, corpus, reasoning_sample, reasoning_text  # noqa: E402

__all__ = [
    "ID_FAMILIES", "OOD_FAMILIES", "SPLITS", "LEVELS", "GENERATORS", "Task", "make_example", "make_split",
    "Reasoning", "reasoning_sample", "reasoning_text", "corpus",
]
