"""Property-based tests (hypothesis) over inputs nobody wrote by hand: images of any size, mode and aspect
ratio and random bytes given as images; arbitrary unicode given to answer extraction and grading; arbitrary
JSON rows and lines given to the dataset readers; arbitrary GRPO rewards. Each property says what a valid
result looks like, and which one error type is allowed otherwise: never another exception, never a hang.

Derandomized (a fixed seed per test, no example database), so CI sees the same examples every run; the
example counts keep the whole file to about 25 s on 2 CPU cores.
"""

import io
import json
import time

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from specs_jax import rewards
from specs_jax.data.types import ERROR_REASONS, DataError
from specs_jax.processing import image
from specs_jax.rewards import judge as judge_lib
from specs_jax.rewards.judge_rules import RuleJudge
from specs_jax.training import grpo, rollout
from data_readers import read


def fixed(max_examples: int, deadline_ms: int | None = 5000):
  return settings(max_examples=max_examples, deadline=deadline_ms, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------------------------
# Image preprocessing

CFG = image.ImageConfig(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 64)
LOWEST = min((0 - m) / s for m, s in zip(image.CLIP_MEAN, image.CLIP_STD))
HIGHEST = max((1 - m) / s for m, s in zip(image.CLIP_MEAN, image.CLIP_STD))
MODES = ["RGB", "RGBA", "RGBX", "L", "LA", "La", "P", "PA", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV"]

sides = st.one_of(st.integers(1, 300), st.integers(1, 8), st.integers(1000, 3000))


def check_patches(pv: np.ndarray, thw: tuple, h: int, w: int) -> None:
  """The documented invariants of `preprocess` for an h x w input."""
  t, gh, gw = thw
  assert t == 1 and gh % CFG.merge_size == 0 and gw % CFG.merge_size == 0
  assert pv.shape == (t * gh * gw, CFG.patch_dim) and pv.dtype == np.float32
  assert thw == CFG.grid_thw(h, w)                    # the pixel-free arithmetic agrees with the pixels
  assert np.isfinite(pv).all() and LOWEST - 1e-5 <= pv.min() and pv.max() <= HIGHEST + 1e-5
  area = gh * gw * CFG.patch_size**2
  if max(h, w) / min(h, w) <= CFG.min_pixels / (4 * 28 * 28):   # where smart_resize can keep both bounds
    assert CFG.min_pixels <= area <= CFG.max_pixels


@fixed(60)
@given(h=sides, w=sides, mode=st.sampled_from(MODES), as_array=st.booleans(), seed=st.integers(0, 2**16))
def test_preprocess_any_size_and_mode(h, w, mode, as_array, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  if as_array:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}.get(mode, 3)
    src = pixels[..., :1].repeat(channels, -1) if channels != 3 else pixels
    src = src[..., 0] if mode == "L" and seed % 2 else src        # HW as well as HW1
  else:
    try:
      src = Image.fromarray(pixels).convert(mode)
    except ValueError:                                               # a conversion Pillow itself lacks
      assume(False)
  try:
    pv, thw = image.preprocess(src, **CFG.kwargs())
  except image.ImageError as e:
    if "aspect ratio" in str(e):
      assert max(h, w) / min(h, w) > image.MAX_ASPECT_RATIO
    else:  # premultiplied "La": Pillow cannot composite it onto white, nor can transformers' convert_to_rgb
      assert f"mode={mode}" in str(e)
      with pytest.raises(ValueError):
        src.convert("RGBA")
    return
  assert max(h, w) / min(h, w) <= image.MAX_ASPECT_RATIO
  check_patches(pv, thw, h, w)


MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"P6\n",
         b"RIFF\x00\x00\x00\x00WEBP", b"\x00\x00\x01\x00"]


def encoded(fmt: str, seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (int(rng.integers(1, 60)), int(rng.integers(1, 60)), 3), np.uint8)).save(
      buf, format=fmt)
  return buf.getvalue()


damaged = st.builds(
    lambda fmt, seed, cut, flips: _damage(encoded(fmt, seed), cut, flips),
    st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]), st.integers(0, 2**16),
    st.floats(0.0, 1.0), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4))


def _damage(data: bytes, cut: float, flips: list) -> bytes:
  b = bytearray(data[:max(1, int(len(data) * cut))] if cut < 0.95 else data)
  for where, value in flips:
    b[min(len(b) - 1, int(where * len(b)))] = value
  return bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning")   # Pillow's "Truncated File Read", "Corrupt EXIF data", ...
@fixed(120)
@given(data=st.one_of(st.tuples(st.sampled_from(MAGIC), st.binary(max_size=300)).map(b"".join), damaged))
def test_random_or_damaged_bytes_are_an_image_error_or_an_image(data):
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = 2_000_000   # a flipped size byte may claim a huge image: keep the test's memory small
  try:
    t0 = time.perf_counter()
    try:
      pv, thw = image.preprocess(data, **CFG.kwargs())
    except image.ImageError as e:
      assert "bytes starting" in str(e)                              # names the source
      return
    finally:
      assert time.perf_counter() - t0 < 5.0
  finally:
    Image.MAX_IMAGE_PIXELS = old
  w, h = Image.open(io.BytesIO(data)).size
  check_patches(pv, thw, h, w)


# ----------------------------------------------------------------------------------------------------------
# Answer extraction, format and grading

PIECES = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "\\fbox{", "{", "}", "\\{", "\\}", "$", "$$",
          "\\(", "\\)", "\\frac{1}{2}", "The answer is ", "Answer:", "**", "(B)", "B", "3", "-4.5", "1,000", "^",
          "9^9^9", "\\sqrt{", "\\text{", "\n", " ", ".", "=", "yes", "no", "\u2028", "\U0001F4A9", "\u202e", "\x00",
          "\ufeff", "٣", "½", "𝟑", "\\infty", "\\pi", "[1, 2)", "x", "\\\\", "\\left(", "\\right)"]
texts = st.one_of(st.text(max_size=200),
                  st.lists(st.sampled_from(PIECES) | st.text(max_size=5), max_size=40).map("".join))
GOLDS = ["3", "-4.5", "\\frac{1}{2}", "B", "(C) 12", "yes", "red cube", "1000", "[1, 2)", "x^2+1"]


@fixed(150)
@given(text=texts, gold=st.sampled_from(GOLDS))
def test_extraction_format_and_grading_accept_any_text(text, gold):
  t0 = time.perf_counter()
  answer = rewards.extract_answer(text)
  assert answer is None or isinstance(answer, str)
  assert rewards.format_reward(text) in (0.0, 1.0)
  assert rewards.accuracy_reward(text, gold) in (0.0, 1.0)
  assert rewards.grade_answer(answer, gold) in (0.0, 1.0)
  (v,) = RuleJudge().grade_answers(["Q"], [text], [gold])
  assert v.score in (None, 0.0, 1.0)
  (c,) = RuleJudge().check_consistency(["Q"], [text])
  assert c.score in (None, 0.0, 1.0)
  assert judge_lib.parse_verdict(text, "correct") in (None, 0.0, 1.0)
  assert time.perf_counter() - t0 < 4.0          # math-verify's own timeout is 3 s; typical is milliseconds


integers = st.integers(-10**9, 10**9).map(str)
decimals = st.tuples(st.integers(-10**6, 10**6), st.integers(1, 4)).map(lambda t: f"{t[0] / 10**t[1]:.{t[1]}f}")
fractions = st.tuples(st.integers(0, 999), st.integers(1, 999), st.booleans()).map(
    lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}" if t[2] else f"{t[0]}/{t[1]}")
letters = st.sampled_from("ABCDEFGH")
words = st.from_regex(r"[a-z]{2,8}( [a-z]{2,8}){0,2}", fullmatch=True)
small = st.integers(1, 99)
expressions = st.one_of(  # through math-verify's LaTeX parser rather than the plain-number fast path
    st.builds(lambda a, b, c: f"{a}x^{{{b}}}+{c}", small, st.integers(2, 5), small),
    st.builds(lambda s, n: f"{s}\\sqrt{{{n}}}", st.sampled_from(["", "-", "2"]), st.integers(2, 99)),
    st.builds(lambda n, m: f"\\frac{{\\sqrt{{{n}}}}}{{{m}}}", st.integers(2, 99), small),
    st.builds(lambda n: f"{n}\\pi", small),
    st.builds(lambda a, d, o, c: f"{o}{a}, {a + d}{c}", st.integers(-50, 50), small, st.sampled_from("[("),
              st.sampled_from("])")),
    st.builds(lambda a, b: f"{a}\\times10^{{{b}}}", st.integers(1, 9), st.integers(1, 6)),
    st.builds(lambda n: f"{n}^\\circ", small),
    st.builds(lambda n: f"{n}\\%", small))


@fixed(150)
@given(x=st.one_of(integers, decimals, fractions, letters, words, expressions), plain=st.booleans())
def test_a_well_formed_answer_equal_to_the_gold_is_correct(x, plain):
  boxed = f"<think> working </think><answer> The answer is $\\boxed{{{x}}}$</answer>"
  assert rewards.format_reward(boxed) == 1.0
  assert rewards.accuracy_reward(boxed, x) == 1.0, (x, boxed)
  if plain and not any(c.isalpha() for c in x.replace("frac", "")):   # unboxed: numbers, fractions, intervals
    assert rewards.accuracy_reward(f"<think> w </think><answer>{x}</answer>", x) == 1.0
  assert RuleJudge().grade_answers(["Q"], [boxed], [x])[0].score == 1.0


# ----------------------------------------------------------------------------------------------------------
# Dataset readers: every row is read or skipped and counted; only DataError ever escapes (in "fail" mode)

odd_numbers = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1, 0, 10**30, True])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | odd_numbers | st.text(st.characters() | st.sampled_from("\u2028\u2029\x85\ufeff\x00"), max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
literals = st.sampled_from(["['a', 'b']", "[1, [2]]", "{[]: 1}", "[" * 300 + "]" * 300, "__import__('os')",
                            "('a',) * 3", "['a'", "", "[]", "{'a': 1}"])
image_values = st.sampled_from(["images/ok.png", "images", "", "../outside.png", "/etc/passwd", "a\x00b.png",
                                "x" * 300, "images/../images/ok.png", "images/missing.png"])
image_fields = image_values | st.lists(image_values | st.fixed_dictionaries({"path": image_values}), max_size=2) \
    | st.fixed_dictionaries({"bytes": st.text(max_size=12) | st.none(), "path": image_values})

TEMPLATES = {
    "rl": {"qid": "q", "question": "<image>How many?", "answer": "\\boxed{3}", "image": ["images/ok.png"]},
    "orsta": {"prompt": [{"role": "user", "content": "<image>Count."}], "images": ["images/ok.png"],
              "reward_model": {"ground_truth": "3", "verifier": "acc"}, "extra_info": {"id": 7},
              "data_source": "orsta"},
    "pairs": {"conversations": [{"from": "human", "value": "<image>Q"}], "chosen": {"from": "gpt", "value": "a"},
              "rejected": {"from": "gpt", "value": "b"}, "images": ["images/ok.png"], "meta": "{}"},
    "mathvista": {"pid": "1", "question": "How long?", "query": "How long?", "image": "images/ok.png", "answer": "2",
                  "question_type": "free_form", "answer_type": "integer", "precision": 1, "choices": None,
                  "metadata": {"category": "x"}},
    "mathverse": {"sample_index": "1", "question": "Q?", "query_cot": "Q?", "image": "images/ok.png",
                  "answer": "B", "question_type": "multi-choice", "metadata": {}},
    "mathvision": {"id": "1", "question": "Q?", "options": ["1", "2"], "image": "images/ok.png", "answer": "A"},
    "mmmu": {"id": "v_Art_1", "question": "Q?", "options": "['x', 'y']", "answer": "A",
             "question_type": "multiple-choice", "image_1": "images/ok.png"},
    "generic": {"id": "g1", "question": "Q?", "images": ["images/ok.png"], "answer": "4", "answer_type": "integer",
                "choices": None, "precision": None},
}
IMAGE_KEYS = {"image", "images", "image_1", "decoded_image"}


@st.composite
def rows(draw, kind: str) -> dict:
  """A template row with some fields replaced by arbitrary JSON (image fields by path-like values, option
  lists by Python-literal-like strings), some deleted, some added."""
  row = dict(TEMPLATES[kind])
  keys = sorted(row) + ["decoded_image", "choices", "options", "answer_type", "precision", "id"]
  for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
    if key in IMAGE_KEYS:
      row[key] = draw(image_fields)
    elif key in ("options", "choices"):
      row[key] = draw(literals | json_values)
    else:
      row[key] = draw(json_values)
  for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=2, unique=True)):
    del row[key]
  return row


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("rows")
  (d / "images").mkdir()
  Image.new("RGB", (10, 6), (5, 6, 7)).save(d / "images" / "ok.png")
  Image.new("RGB", (4, 4)).save(d.parent / "outside.png")
  return d


def check_read(kind: str, path, n_rows: int) -> None:
  res = read(kind, path, "skip")
  assert len(res.examples) + res.num_skipped == n_rows, res.summary()   # nothing lost, nothing doubled
  assert all(isinstance(e, DataError) and e.reason in ERROR_REASONS and str(e).startswith(str(path))
             for e in res.errors)
  try:
    strict = read(kind, path, "fail")
  except DataError as e:
    assert res.num_skipped and (e.row, e.reason) == (res.errors[0].row, res.errors[0].reason)
  else:
    assert res.num_skipped == 0 and len(strict) == n_rows


@fixed(400, deadline_ms=None)
@given(kind=st.sampled_from(sorted(TEMPLATES)), data=st.data())
def test_arbitrary_rows_are_read_or_skipped_and_counted(data_dir, kind, data):
  batch = data.draw(st.lists(rows(kind), min_size=1, max_size=4))
  path = data_dir / "rows.jsonl"
  # ensure_ascii=False writes U+2028, NEL and friends raw, as the pair writer does (and a lone surrogate
  # as bytes that are not UTF-8); NaN / Infinity are written as Python's json does, and read back by it
  ascii_only = data.draw(st.booleans())
  text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in batch)
  path.write_bytes(text.encode("utf-8", "surrogatepass"))
  check_read(kind, path, len(batch))


lines = st.one_of(st.binary(max_size=80), st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass")),
                  json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")))


@fixed(150, deadline_ms=None)
@given(kind=st.sampled_from(sorted(TEMPLATES)), chunks=st.lists(lines, max_size=6), array=st.booleans())
def test_arbitrary_bytes_are_bad_rows_or_a_clear_file_error(data_dir, kind, chunks, array):
  data = b"\n".join(chunks)
  path = data_dir / ("rows.json" if array else "rows.jsonl")
  path.write_bytes(b"[" + data if array else data)
  try:
    res = read(kind, path, "skip")
  except DataError as e:                         # a .json file that is not a readable array: one file error
    assert array and e.row is None and "invalid JSON array" in str(e)
    return
  if not array:
    assert len(res.examples) + res.num_skipped == sum(1 for line in data.split(b"\n") if line.strip())


# ----------------------------------------------------------------------------------------------------------
# GRPO advantages of arbitrary rewards


@fixed(60)
@given(groups=st.lists(st.one_of(                                     # always 6 groups: one shape, few compiles
    st.lists(st.floats(-100, 100, width=32), min_size=4, max_size=4),
    st.floats(-100, 100, width=32).map(lambda r: [r] * 4)), min_size=6, max_size=6),
    keep_bits=st.lists(st.booleans(), min_size=6, max_size=6))
def test_advantages_are_finite_and_zero_for_constant_groups(groups, keep_bits):
  r = np.asarray(groups, np.float32)                                  # [P, G]
  adv = np.asarray(grpo.group_advantages(jnp.asarray(r.reshape(-1)), 4)).reshape(r.shape)
  assert np.isfinite(adv).all()
  constant = (r == r[:, :1]).all(1)
  assert (adv[constant] == 0).all()
  np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-3)            # centred within each group
  keep = np.repeat(np.asarray(keep_bits), 4)
  kept = rollout.advantages_for(r.reshape(-1), keep, 4)
  assert np.isfinite(kept).all() and (kept[~keep] == 0).all()
  np.testing.assert_allclose(kept[keep], adv.reshape(-1)[keep], rtol=1e-5, atol=1e-5)
