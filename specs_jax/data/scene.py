"""Scene descriptions for the synthetic tasks, and their PIL renderer.

A scene is pure data: one `Panel` per image, each a canvas size, a background and a tuple of items
(`Shape`, `Number`, `Figure`). The task generators in `synthetic.py` build scenes and read gold answers
off them; tests recount answers from `Panel.to_dict()` alone and check rendered pixels against it.

Geometry conventions: boxes are half-open pixel boxes (x0, y0, x1, y1), x0 <= x < x1. Items never overlap
and stay inside their canvas. Numbers are drawn as seven-segment digits with filled rectangles (no fonts),
so renders are byte-identical on every machine and every Pillow version with the same drawing rules, and
stay legible at 7 px height. Drawing is not anti-aliased, so every pixel of an item has its exact colour.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
}
INK: dict[str, tuple[int, int, int]] = {"black": (20, 20, 20), "grey": (90, 90, 90)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "ivory": (250, 248, 236),
    "mist": (236, 242, 248),
}
SHAPES = ("circle", "square", "triangle")

Box = tuple[int, int, int, int]


def rgb(name: str) -> tuple[int, int, int]:
  for table in (COLOURS, INK, BACKGROUNDS):
    if name in table:
      return table[name]
  raise KeyError(f"unknown colour {name!r}")


# ----------------------------------------------------------------------------------------------------------
# Seven-segment digits
#
#    aaa        segment rectangles for a digit at (x, y) of height h, width w, stroke t:
#   f   b       a top, g middle, d bottom (full width, t rows);
#    ggg        f/b upper left/right and e/c lower left/right (t columns).
#   e   c
#    ddd

SEGMENTS: dict[int, str] = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def digit_geometry(height: int) -> tuple[int, int]:
  """(width, stroke) of one seven-segment digit of this height (height >= 7)."""
  t = max(1, round(height / 9))
  w = max(2 * t + 2, round(height * 0.55))
  return w, t


def segment_boxes(x: int, y: int, height: int) -> dict[str, Box]:
  """Half-open box of each segment of a digit whose top-left corner is (x, y)."""
  w, t = digit_geometry(height)
  mid = y + (height - t) // 2
  return {
      "a": (x, y, x + w, y + t),
      "g": (x, mid, x + w, mid + t),
      "d": (x, y + height - t, x + w, y + height),
      "f": (x, y, x + t, mid + t),
      "b": (x + w - t, y, x + w, mid + t),
      "e": (x, mid, x + t, y + height),
      "c": (x + w - t, mid, x + w, y + height),
  }


def number_width(value: int, height: int) -> int:
  w, t = digit_geometry(height)
  n = len(str(value))
  return n * w + (n - 1) * (t + 1)


# ----------------------------------------------------------------------------------------------------------
# Items


@dataclasses.dataclass(frozen=True)
class Shape:
  """A filled shape: a disc, a square, or an upward isosceles triangle, inscribed in `box`."""

  kind: str
  colour: str
  box: Box

  def to_dict(self) -> dict:
    return {"type": "shape", "kind": self.kind, "colour": self.colour, "box": list(self.box)}


@dataclasses.dataclass(frozen=True)
class Number:
  """A non-negative integer in seven-segment digits, top-left corner (x, y)."""

  value: int
  x: int
  y: int
  height: int
  colour: str = "black"

  @property
  def box(self) -> Box:
    return (self.x, self.y, self.x + number_width(self.value, self.height), self.y + self.height)

  def digit_origins(self) -> list[tuple[int, int, int]]:
    """(digit, x, y) of each digit, left to right."""
    w, t = digit_geometry(self.height)
    return [(int(d), self.x + i * (w + t + 1), self.y) for i, d in enumerate(str(self.value))]

  def to_dict(self) -> dict:
    return {"type": "number", "value": self.value, "box": list(self.box), "height": self.height,
            "colour": self.colour}


@dataclasses.dataclass(frozen=True)
class Figure:
  """An outlined rectangle, or a right triangle with its right angle at the bottom-left corner of `box`.

  The side lengths are given by separate `Number` labels: the width centred below the box, the height to
  the left of it. `width_label` / `height_label` record those values (they are also the labels' values).
  """

  kind: str  # "rectangle" | "right_triangle"
  box: Box
  width_label: int
  height_label: int
  line: int = 1
  colour: str = "grey"

  def to_dict(self) -> dict:
    return {"type": "figure", "kind": self.kind, "box": list(self.box), "width_label": self.width_label,
            "height_label": self.height_label, "line": self.line}


Item = Union[Shape, Number, Figure]


@dataclasses.dataclass(frozen=True)
class Panel:
  """One image: canvas size, background colour name, items (drawn in order; they never overlap)."""

  width: int
  height: int
  background: str
  items: tuple[Item, ...]

  def to_dict(self) -> dict:
    return {"width": self.width, "height": self.height, "background": self.background,
            "items": [it.to_dict() for it in self.items]}

  def shapes(self) -> list[Shape]:
    return [it for it in self.items if isinstance(it, Shape)]

  def numbers(self) -> list[Number]:
    return [it for it in self.items if isinstance(it, Number)]


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
  x0, y0, x1, y1 = s.box
  fill = COLOURS[s.colour]
  if s.kind == "circle":
    draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
  elif s.kind == "square":
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
  elif s.kind == "triangle":
    draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
  else:
    raise ValueError(f"unknown shape kind {s.kind!r}")


def _draw_number(draw: ImageDraw.ImageDraw, n: Number) -> None:
  fill = rgb(n.colour)
  for digit, x, y in n.digit_origins():
    boxes = segment_boxes(x, y, n.height)
    for seg in SEGMENTS[digit]:
      bx0, by0, bx1, by1 = boxes[seg]
      draw.rectangle((bx0, by0, bx1 - 1, by1 - 1), fill=fill)


def _draw_figure(draw: ImageDraw.ImageDraw, f: Figure) -> None:
  x0, y0, x1, y1 = f.box
  ink = rgb(f.colour)
  if f.kind == "rectangle":
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=ink, width=f.line)
  elif f.kind == "right_triangle":
    draw.polygon([(x0, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], outline=ink, width=f.line)
    m = max(2, min(x1 - x0, y1 - y0) // 6)  # right-angle marker
    draw.line([(x0, y1 - 1 - m), (x0 + m, y1 - 1 - m), (x0 + m, y1 - 1)], fill=ink, width=1)
  else:
    raise ValueError(f"unknown figure kind {f.kind!r}")


def render_panel(panel: Panel) -> Image.Image:
  """Draws a panel as an RGB PIL image of size (panel.width, panel.height)."""
  im = Image.new("RGB", (panel.width, panel.height), BACKGROUNDS[panel.background])
  draw = ImageDraw.Draw(im)
  for item in panel.items:
    if isinstance(item, Shape):
      _draw_shape(draw, item)
    elif isinstance(item, Number):
      _draw_number(draw, item)
    else:
      _draw_figure(draw, item)
  return im


@dataclasses.dataclass(frozen=True)
class SyntheticImage:
  """A lazy image: renders its panel on `load()`. Equal panels give byte-identical images."""

  panel: Panel

  def load(self) -> Image.Image:
    return render_panel(self.panel)

  @property
  def size(self) -> tuple[int, int]:
    return (self.panel.width, self.panel.height)


# ----------------------------------------------------------------------------------------------------------
# Layout helpers


def grid_cells(width: int, height: int, gx: int, gy: int) -> list[Box]:
  """The gx * gy cells of a regular grid over the canvas, row by row."""
  cw, ch = width // gx, height // gy
  return [(i * cw, j * ch, (i + 1) * cw, (j + 1) * ch) for j in range(gy) for i in range(gx)]


def box_in_cell(cell: Box, w: int, h: int, offset: tuple[float, float]) -> Box:
  """A w x h box inside `cell` with a 1 px margin; offset in [0, 1]^2 places it (0.5, 0.5 = centred)."""
  x0, y0, x1, y1 = cell
  free_x, free_y = (x1 - x0) - w - 2, (y1 - y0) - h - 2
  if free_x < 0 or free_y < 0:
    raise ValueError(f"a {w}x{h} box does not fit in cell {cell}")
  bx = x0 + 1 + round(free_x * offset[0])
  by = y0 + 1 + round(free_y * offset[1])
  return (bx, by, bx + w, by + h)


def centre(box: Box) -> tuple[float, float]:
  return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def where(box: Box, width: int, height: int) -> str:
  """Coarse position words for the reasoning texts: "top left", "centre", "bottom right", ..."""
  cx, cy = centre(box)
  col = ("left", "centre", "right")[min(2, int(3 * cx / width))]
  row = ("top", "middle", "bottom")[min(2, int(3 * cy / height))]
  if row == "middle" and col == "centre":
    return "centre"
  return f"{row} {col}"
