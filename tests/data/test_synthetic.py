"""Synthetic tasks: determinism, gold answers recounted independently, rendering checked against pixels."""

import collections
import json
import re
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage

from specs_jax.data import formats, synthetic
from specs_jax.data.scene import BACKGROUNDS, COLOURS, INK, digit_geometry
from specs_jax.data.types import count_image_parts, example_fingerprint, matches_answer_type

ALL_FAMILIES = synthetic.ID_FAMILIES + synthetic.OOD_FAMILIES
N_RECOUNT = 1000  # per family


def family_examples(family: str, n: int, seed: int = 1, **kw):
  split = "eval_ood_task" if family in synthetic.OOD_FAMILIES else "train"
  return synthetic.make_split(split, n, seed, families=[family], **kw)


# ----------------------------------------------------------------------------------------------------------
# An independent answer key: parses the question text and recounts from the scene description alone.

COL = "red|green|blue|yellow|purple|orange"
SHP = "circle|square|triangle"


def _shapes(scene):
  return [it for p in scene for it in p["items"] if it["type"] == "shape"]


def _options(question, pattern):
  return {m[1]: m[2] for m in re.finditer(rf"^([A-D])\. {pattern}$", question, re.M)}


def _unique(seq):
  assert len(seq) == 1, seq
  return seq[0]


def _letter_of_extreme(values: dict, largest: bool, margin: float) -> str:
  ranked = sorted(values.items(), key=lambda kv: kv[1], reverse=largest)
  assert abs(ranked[0][1] - ranked[1][1]) >= margin, ranked  # unambiguous
  return ranked[0][0]


def _side_labels(panel):
  fig = _unique([it for it in panel["items"] if it["type"] == "figure"])
  fx0, fy0, fx1, fy1 = fig["box"]
  nums = [it for it in panel["items"] if it["type"] == "number"]
  below = _unique([n for n in nums if n["box"][1] >= fy1])  # the width is written below the figure
  left = _unique([n for n in nums if n["box"][2] <= fx0])  # the height to its left
  return fig["kind"], below["value"], left["value"]


def recount(question: str, scene: list) -> str:
  shapes = _shapes(scene)
  numbers = [it["value"] for p in scene for it in p["items"] if it["type"] == "number"]
  if m := re.match(rf"How many (?:({COL}) )?({SHP}|object)s are there (?:in the image|in total in the (\d) images)\?",
                   question):
    assert len(scene) == int(m[3] or 1)
    colour, kind = m[1], (None if m[2] == "object" else m[2])
    return str(sum((colour is None or s["colour"] == colour) and (kind is None or s["kind"] == kind) for s in shapes))
  if m := re.match(r"What is the sum of all the numbers shown (?:in the image|across the (\d) images)\?", question):
    assert len(scene) == int(m[1] or 1)
    return str(sum(numbers))
  if m := re.match(rf"Which ({SHP}) is the (largest|smallest)\?", question):
    opts = _options(question, rf"the ({COL}) {m[1]}")
    assert len(opts) == 4
    sizes = {}
    for letter, colour in opts.items():
      s = _unique([s for s in shapes if s["colour"] == colour and s["kind"] == m[1]])
      sizes[letter] = s["box"][2] - s["box"][0]
    return _letter_of_extreme(sizes, m[2] == "largest", margin=1)
  if m := re.match(r"Which of these objects is (furthest to the left|furthest to the right|closest to the top|"
                   r"closest to the bottom)\?", question):
    opts = _options(question, rf"the ((?:{COL}) (?:{SHP}))")
    axis = 0 if "left" in m[1] or "right" in m[1] else 1
    coords = {}
    for letter, desc in opts.items():
      s = _unique([s for s in shapes if f"{s['colour']} {s['kind']}" == desc])
      coords[letter] = (s["box"][axis] + s["box"][axis + 2]) / 2
    return _letter_of_extreme(coords, "right" in m[1] or "bottom" in m[1], margin=2)
  if m := re.search(r"What is the (area|ratio|perimeter) of (?:the (rectangle|triangle)|its width to its height)\?",
                    question):
    kind, w, h = _side_labels(_unique(scene))
    if m[1] == "perimeter":
      assert kind == "rectangle"
      return str(2 * (w + h))
    if m[1] == "ratio":
      assert kind == "rectangle"
      return str(Fraction(w, h))
    if m[2] == "rectangle":
      assert kind == "rectangle"
      return str(w * h)
    assert kind == "right_triangle"
    area = Fraction(w * h, 2)
    return str(area.numerator) if area.denominator == 1 else f"{float(area):.1f}"
  if m := re.match(rf"Is there a ({COL}) ({SHP}) in the image\?", question):
    return "yes" if any(s["colour"] == m[1] and s["kind"] == m[2] for s in shapes) else "no"
  if m := re.match(rf"Are there more ({COL}) objects than ({COL}) objects in the image\?", question):
    n1, n2 = (sum(s["colour"] == c for s in shapes) for c in (m[1], m[2]))
    return "yes" if n1 > n2 else "no"
  if re.match(r"What is the product of the two numbers shown in the image\?", question):
    a, b = numbers
    return str(a * b)
  if re.match(r"Which colour appears most often among the objects in the image\?", question):
    opts = _options(question, f"({COL})")
    counts = collections.Counter(s["colour"] for s in shapes)
    assert set(counts) <= set(opts.values())
    return _letter_of_extreme({k: counts[c] for k, c in opts.items()}, largest=True, margin=1)
  raise AssertionError(f"no answer key for question {question!r}")


def check_layout(scene, size_range):
  lo, hi = size_range
  for p in scene:
    assert lo <= p["width"] <= hi and lo <= p["height"] <= hi
    boxes = []
    for it in p["items"]:
      x0, y0, x1, y1 = it["box"]
      assert 0 <= x0 < x1 <= p["width"] and 0 <= y0 < y1 <= p["height"], it
      if it["type"] == "shape":
        assert x1 - x0 >= 5 and x1 - x0 == y1 - y0
      if it["type"] == "number":
        assert it["height"] >= 7
      boxes.append((x0 - 1, y0 - 1, x1 + 1, y1 + 1))  # grown by 1 px: items never even touch
    for i in range(len(boxes)):
      for j in range(i):
        a, b = boxes[i], boxes[j]
        assert a[2] <= b[0] + 1 or b[2] <= a[0] + 1 or a[3] <= b[1] + 1 or b[3] <= a[1] + 1, (a, b)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_gold_equals_independent_recount(family):
  exs = family_examples(family, N_RECOUNT, image_size=(56, 224))
  variants = collections.Counter()
  for ex in exs:
    assert ex.meta["family"] == family
    question = ex.meta["question"]
    assert recount(question, ex.meta["scene"]) == ex.gold, (ex.id, question, ex.gold)
    assert matches_answer_type(ex.gold, ex.answer_type, 4 if ex.answer_type == "multiple_choice" else None)
    assert question.endswith(synthetic.HINTS[ex.answer_type])
    check_layout(ex.meta["scene"], (56, 224))
    variants[ex.meta["variant"]] += 1
  assert all(v >= 50 for v in variants.values()), variants  # every variant is exercised


def test_answer_balance():
  yes = sum(ex.gold == "yes" for ex in family_examples("yes_no", 600))
  assert 240 <= yes <= 360  # 50% +- 5 sd
  letters = collections.Counter(ex.gold for ex in family_examples("compare", 600))
  assert set(letters) == set("ABCD") and min(letters.values()) >= 100


# ----------------------------------------------------------------------------------------------------------
# Rendering, checked against the pixels

# Seven-segment decoding table, written out independently of scene.SEGMENTS.
_DIGIT_OF_SEGMENTS = {"abcdef": 0, "bc": 1, "abdeg": 2, "abcdg": 3, "bcfg": 4, "acdfg": 5, "acdefg": 6, "abc": 7,
                      "abcdefg": 8, "abcdfg": 9}


def read_number(arr, item) -> int:
  """Reads a seven-segment number off the pixels, from its box and digit height only."""
  h = item["height"]
  w, t = digit_geometry(h)
  x, y = item["box"][0], item["box"][1]
  ink = np.array(INK[item["colour"]])
  n_digits = (item["box"][2] - x + t + 1) // (w + t + 1)
  digits = []
  for i in range(n_digits):
    dx = x + i * (w + t + 1)
    mid = y + (h - t) // 2
    upper, lower = (y + t + mid) // 2, (mid + t + y + h - t) // 2
    probes = {"a": (dx + w // 2, y + t // 2), "g": (dx + w // 2, mid + t // 2), "d": (dx + w // 2, y + h - 1 - t // 2),
              "f": (dx + t // 2, upper), "b": (dx + w - 1 - t // 2, upper),
              "e": (dx + t // 2, lower), "c": (dx + w - 1 - t // 2, lower)}
    lit = "".join(sorted(s for s, (px, py) in probes.items() if (arr[py, px] == ink).all()))
    assert not (arr[upper, dx + w // 2] == ink).all() and not (arr[lower, dx + w // 2] == ink).all()  # holes
    assert lit in _DIGIT_OF_SEGMENTS, (item, lit)
    digits.append(str(_DIGIT_OF_SEGMENTS[lit]))
  return int("".join(digits))


FILL = {"square": (0.99, 1.0), "circle": (0.62, 0.9), "triangle": (0.45, 0.62)}


def check_render(ex):
  images = ex.load_images()
  assert len(images) == len(ex.meta["scene"]) == count_image_parts(ex.messages)
  for panel, im in zip(ex.meta["scene"], images):
    assert im.mode == "RGB" and im.size == (panel["width"], panel["height"])
    arr = np.asarray(im)
    assert (arr[0, 0] == BACKGROUNDS[panel["background"]]).all()
    shapes = [it for it in panel["items"] if it["type"] == "shape"]
    for colour, value in COLOURS.items():
      # Each object of a colour is one connected blob of exactly that colour: recount them from pixels.
      _, n_blobs = ndimage.label((arr == value).all(-1))
      assert n_blobs == sum(s["colour"] == colour for s in shapes), (ex.id, colour)
    for s in shapes:
      x0, y0, x1, y1 = s["box"]
      fill = (arr[y0:y1, x0:x1] == COLOURS[s["colour"]]).all(-1).mean()
      lo, hi = FILL[s["kind"]]
      assert lo <= fill <= hi, (ex.id, s, fill)  # the fill ratio tells the three shapes apart
    for it in panel["items"]:
      if it["type"] == "number":
        assert read_number(arr, it) == it["value"], (ex.id, it)
      if it["type"] == "figure":
        x0, y0, x1, y1 = it["box"]
        grey = np.array(INK["grey"])
        assert (arr[y0, x0] == grey).all() and (arr[y1 - 1, x1 - 1] == grey).all()
        assert (arr[y0, x1 - 1] == grey).all() == (it["kind"] == "rectangle")  # triangles have no top-right
        assert not (arr[(y0 + y1) // 2 + 1, (x0 + 2 * x1) // 3] == grey).all() or it["kind"] == "right_triangle"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_render_matches_scene_fast(family):
  for ex in family_examples(family, 40, seed=2, image_size=(56, 224)):
    check_render(ex)


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_render_matches_scene_all(family):
  for ex in family_examples(family, N_RECOUNT, image_size=(56, 224)):
    check_render(ex)


# ----------------------------------------------------------------------------------------------------------
# Determinism and splits


def test_same_seed_gives_byte_identical_examples():
  for split in synthetic.SPLITS:
    a = synthetic.make_split(split, 24, seed=7)
    b = synthetic.make_split(split, 24, seed=7)
    assert a == b
    assert [example_fingerprint(x) for x in a] == [example_fingerprint(x) for x in b]
    # Example i does not depend on n.
    assert synthetic.make_split(split, 5, seed=7) == a[:5]


def test_different_seeds_differ():
  a = [example_fingerprint(x) for x in synthetic.make_split("train", 24, seed=0)]
  b = [example_fingerprint(x) for x in synthetic.make_split("train", 24, seed=1)]
  assert len(set(a) & set(b)) == 0
  assert len(set(a)) == len(a)


def _scene_key(ex):
  return json.dumps([ex.meta["question"], ex.meta["scene"]], sort_keys=True)


def test_splits():
  train = synthetic.make_split("train", 1500, seed=0)
  eval_id = synthetic.make_split("eval_id", 500, seed=0)
  ood_format = synthetic.make_split("eval_ood_format", 100, seed=0)
  ood_task = synthetic.make_split("eval_ood_task", 60, seed=0)
  # Train and eval scenes are disjoint (and train seldom repeats a scene).
  train_keys = {_scene_key(ex) for ex in train}
  assert len(train_keys) >= 0.995 * len(train)
  assert not train_keys & {_scene_key(ex) for ex in eval_id + ood_format}
  # Families and formats.
  for exs, fams in ((train, synthetic.ID_FAMILIES), (eval_id, synthetic.ID_FAMILIES),
                    (ood_format, synthetic.ID_FAMILIES), (ood_task, synthetic.OOD_FAMILIES)):
    assert collections.Counter(ex.meta["family"] for ex in exs) == {f: len(exs) // len(fams) for f in fams}
  assert not set(synthetic.ID_FAMILIES) & set(synthetic.OOD_FAMILIES)
  for ex in train + eval_id + ood_task:
    assert ex.meta["format"] == formats.DEFAULT_FORMAT
  pairs = {(ex.meta["family"], formats.format_name(ex.meta["format"])) for ex in ood_format}
  assert len(pairs) == len(synthetic.ID_FAMILIES) * len(formats.OOD_FORMATS)  # every family meets every format
  assert all(ex.meta["format"] in formats.OOD_FORMATS for ex in ood_format)


def test_example_structure():
  for ex in synthetic.make_split("eval_ood_format", 20, seed=3):
    (msg,) = ex.messages
    assert msg["role"] == "user"
    *image_parts, text_part = msg["content"]
    assert image_parts == [{"type": "image"}] * len(ex.images)
    assert text_part == {"type": "text", "text": ex.meta["question"] + "\n" + ex.meta["instruction"]}
    assert ex.meta["instruction"] == formats.format_instruction(ex.meta["format"])
    assert ex.source == "synthetic" and ex.id.startswith("synthetic/eval_ood_format/3/")
    json.dumps(ex.meta)  # JSON-able


def test_difficulty_and_image_size():
  def n_objects(ex):
    return sum(len(p["items"]) for p in ex.meta["scene"])

  easy = family_examples("count", 200, levels=(1,))
  hard = family_examples("count", 200, levels=(3,))
  assert {ex.meta["level"] for ex in easy} == {1} and {ex.meta["level"] for ex in hard} == {3}
  assert max(map(n_objects, easy)) <= 5 <= min(map(n_objects, hard))  # level 1: <= 3 + 2; level 3: >= 2 + 3
  assert np.mean([n_objects(ex) for ex in hard]) > 2 * np.mean([n_objects(ex) for ex in easy])
  assert any(len(ex.images) == 2 for ex in hard) and all(len(ex.images) == 1 for ex in easy)
  assert any(len(ex.images) == 3 for ex in family_examples("digit_sum", 200, levels=(3,)))
  big = family_examples("measure", 30, image_size=(224, 224))
  assert {im.size for ex in big for im in ex.images} == {(224, 224)}
  sizes = {s for ex in family_examples("yes_no", 200) for im in ex.images for s in im.size}
  assert sizes == {56, 84, 112}  # multiples of 28 in the default range


@pytest.mark.parametrize("kwargs", [
    dict(name="test", n=3), dict(name="train", n=3, image_size=(28, 56)), dict(name="train", n=3, levels=(4,)),
    dict(name="train", n=3, families=["sudoku"]), dict(name="train", n=3, formats=[{"kind": "yaml"}]),
    dict(name="train", n=-1),
])
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    synthetic.make_split(**kwargs)


def test_answer_key_is_not_vacuous():
  """The recount changes when the scene does: it reads the scene, not the generator's choices."""
  import copy

  changed = 0
  for family in ALL_FAMILIES:
    for ex in family_examples(family, 30, seed=4):
      scene = copy.deepcopy(ex.meta["scene"])
      items = scene[0]["items"]
      nums = [it for it in items if it["type"] == "number"]
      shapes = [it for it in items if it["type"] == "shape"]
      if nums:
        nums[0]["value"] += 1  # a different label or summand
      elif shapes and family in ("count", "yes_no"):
        items.remove(shapes[0])
      else:
        continue
      try:
        changed += recount(ex.meta["question"], scene) != ex.gold
      except AssertionError:
        changed += 1  # e.g. an option object is gone
  assert changed >= 100


def test_examples_pickle():
  """Data-loader workers receive examples by pickle."""
  import pickle

  for ex in synthetic.make_split("eval_ood_format", 10, seed=9):
    back = pickle.loads(pickle.dumps(ex))
    assert back == ex and example_fingerprint(back) == example_fingerprint(ex)
