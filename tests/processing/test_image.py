"""specs_jax.processing.image against transformers' Qwen2VLImageProcessorPil (the PIL backend)."""

import io
import json
import math

import hf_fixtures
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from specs_jax.processing import image

FIXTURE_LIMITS = dict(min_pixels=hf_fixtures.MIN_PIXELS, max_pixels=hf_fixtures.MAX_PIXELS)


def _hf(ip, images):
  out = ip(images=list(images), return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


def _noise(h, w, channels=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _big(h, w, seed=0):
  """A cheap h x w image with detail at every scale: 8x8 noise blocks times a fine noise tile."""
  rng = np.random.default_rng(seed)
  coarse = np.repeat(np.repeat(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), 8, 0), 8, 1)
  fine = np.tile(rng.integers(0, 64, (16, 16, 3), dtype=np.uint8), (h // 16 + 1, w // 16 + 1, 1))
  return (coarse[:h, :w] // 2 + fine[:h, :w]).astype(np.uint8)


# Edge cases first, then random sizes (log-uniform sides, aspect ratio <= 200).
_EDGE_SIZES = [(1, 1), (1, 2), (3, 5), (27, 29), (28, 28), (56, 56), (14, 14), (112, 140), (3000, 40),
               (40, 3000), (28, 5000), (1, 200), (199, 1)]
_rng = np.random.default_rng(1234)
_RANDOM_SIZES = []
while len(_RANDOM_SIZES) < 15:
  h, w = (int(v) for v in np.exp(_rng.uniform(0, np.log(1500), 2)).round())
  if max(h, w) / min(h, w) <= 200:
    _RANDOM_SIZES.append((max(h, 1), max(w, 1)))


@pytest.mark.parametrize("size", _EDGE_SIZES + _RANDOM_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_equals_hf_random_sizes(image_processor, size):
  img = _noise(*size, seed=size[0] * 7919 + size[1])
  # HF gets a PIL image: for an array it would guess channels-first when the height is 1, 3 or 4.
  ref_pv, ref_thw = _hf(image_processor, [Image.fromarray(img)])
  pv, thw = image.preprocess(img, **FIXTURE_LIMITS)
  assert thw == tuple(ref_thw[0])
  assert pv.dtype == np.float32 and pv.shape == ref_pv.shape == (math.prod(thw), 1176)
  np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(4000, 3000), (600, 9000), (2048, 2048)], ids=str)
def test_preprocess_equals_hf_huge_images_hit_max_pixels(image_processor, size):
  img = _big(*size, seed=size[1])
  ref_pv, ref_thw = _hf(image_processor, [Image.fromarray(img)])
  pv, thw = image.preprocess(img, **FIXTURE_LIMITS)
  assert thw == tuple(ref_thw[0])
  assert math.prod(thw) * 14 * 14 <= hf_fixtures.MAX_PIXELS  # downscaled to the budget
  np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)


def test_preprocess_default_limits_are_hub_values_and_equal_hf():
  from transformers import Qwen2VLImageProcessorPil

  assert (image.MIN_PIXELS, image.MAX_PIXELS) == (3136, 12_845_056)
  ip = Qwen2VLImageProcessorPil(size={"shortest_edge": image.MIN_PIXELS, "longest_edge": image.MAX_PIXELS},
                                image_mean=list(image.CLIP_MEAN), image_std=list(image.CLIP_STD))
  img = _big(700, 1000, seed=3)
  ref_pv, ref_thw = _hf(ip, [Image.fromarray(img)])
  pv, thw = image.preprocess(img)  # module defaults
  assert thw == tuple(ref_thw[0]) == (1, 50, 72)  # round(700/28)*28=700, round(1000/28)*28=1008
  np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)


def test_preprocess_many_concatenates_like_hf(image_processor):
  imgs = [_noise(50, 80, seed=1), _noise(300, 29, seed=2), _noise(9, 9, seed=3)]
  ref_pv, ref_thw = _hf(image_processor, [Image.fromarray(a) for a in imgs])
  pv, thw = image.preprocess_many(imgs, **FIXTURE_LIMITS)
  assert thw.dtype == np.int32
  np.testing.assert_array_equal(thw, ref_thw)
  np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)
  pv0, thw0 = image.preprocess_many([])
  assert pv0.shape == (0, 1176) and thw0.shape == (0, 3)


def test_patch_layout_by_hand():
  """Row r of pixel_values is patch (t, bh, bw, mh, mw) with values ordered (C, T, ph, pw)."""
  # A 56x56 image whose pixel (y, x) has value (y*56 + x) % 256 in the red channel: after rescale
  # and normalise, undo the normalisation and check where each pixel went.
  y, x = np.mgrid[:56, :56]
  img = np.stack([(y * 56 + x) % 256, np.zeros_like(y), np.full_like(y, 255)], -1).astype(np.uint8)
  pv, thw = image.preprocess(img, min_pixels=56 * 56, max_pixels=56 * 56)
  assert thw == (1, 4, 4)
  red = pv.reshape(16, 3, 2, 14, 14)[:, 0] * image.CLIP_STD[0] + image.CLIP_MEAN[0]  # [16, T, 14, 14]
  red = np.rint(red * 255).astype(int)
  np.testing.assert_array_equal(red[:, 0], red[:, 1])  # both temporal frames are the image
  # rows 0..3 are the top-left 2x2 block of patches (merge window), in (mh, mw) order
  expected_patch = lambda py, px: ((y[py * 14:(py + 1) * 14, px * 14:(px + 1) * 14] * 56
                                    + x[py * 14:(py + 1) * 14, px * 14:(px + 1) * 14]) % 256)
  order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
           (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
  for row, (py, px) in enumerate(order):
    np.testing.assert_array_equal(red[row, 0], expected_patch(py, px), err_msg=f"row {row}")


# ---------------------------------------------------------------------------------------------------
# Modes and sources


def _mode_images():
  rng = np.random.default_rng(7)
  rgb = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (45, 61, 1), dtype=np.uint8)], -1)
  out = {
      "RGB": Image.fromarray(rgb),
      "RGBA": Image.fromarray(rgba),
      "LA": Image.fromarray(np.ascontiguousarray(rgba[..., 2:])),
      "L": Image.fromarray(rgb[..., 0]),
      "1": Image.fromarray(rgb[..., 0] > 127),
      "P": Image.fromarray(rgb).quantize(16),
      "CMYK": Image.fromarray(rgba).convert("CMYK"),
      "YCbCr": Image.fromarray(rgb).convert("YCbCr"),
      "I": Image.fromarray(rgb[..., 0].astype(np.int32) * 100),
  }
  p_trans = Image.fromarray(rgb).quantize(8)
  p_trans.info["transparency"] = 3
  out["P+transparency"] = p_trans
  rgb_trans = Image.fromarray(rgb)
  rgb_trans.info["transparency"] = tuple(int(v) for v in rgb[0, 0])
  out["RGB+transparency"] = rgb_trans
  return out


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_modes_equal_hf(image_processor, mode):
  img = _mode_images()[mode]
  assert img.mode == mode.split("+")[0]
  ref_pv, ref_thw = _hf(image_processor, [img])
  pv, thw = image.preprocess(img, **FIXTURE_LIMITS)
  assert thw == tuple(ref_thw[0])
  np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_uint8_arrays_equal_hf(image_processor, channels):
  a = _noise(37, 90, channels, seed=channels)
  ref_pv, ref_thw = _hf(image_processor, [a])  # HWC with H=37: HF infers channels-last correctly
  pv, thw = image.preprocess(a, **FIXTURE_LIMITS)
  assert thw == tuple(ref_thw[0])
  np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)


def test_alpha_is_composited_onto_white():
  rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)  # 1x3
  # transparent -> white; opaque -> itself; half black -> 255*(1-128/255) = 127
  np.testing.assert_array_equal(np.asarray(image.load_image(rgba)),
                                [[[255, 255, 255], [10, 20, 30], [127, 127, 127]]])
  np.testing.assert_array_equal(np.asarray(image.load_image(Image.fromarray(rgba))),
                                [[[255, 255, 255], [10, 20, 30], [127, 127, 127]]])
  assert image.load_image(np.zeros((4, 5), np.uint8)).mode == "RGB"


def test_path_bytes_dict_sources_equal_pil(tmp_path):
  img = Image.fromarray(_noise(33, 47, 4, seed=5))
  path = tmp_path / "x.png"
  img.save(path)
  data = path.read_bytes()
  want, thw = image.preprocess(img, **FIXTURE_LIMITS)
  for src in (path, str(path), data, bytearray(data), {"bytes": data, "path": "ignored.png"},
              {"bytes": None, "path": str(path)}):
    pv, thw2 = image.preprocess(src, **FIXTURE_LIMITS)
    assert thw2 == thw
    np.testing.assert_array_equal(pv, want)


# ---------------------------------------------------------------------------------------------------
# Errors


def test_aspect_ratio_over_200_is_a_clear_error(image_processor):
  image.preprocess(np.zeros((1, 200, 3), np.uint8), **FIXTURE_LIMITS)  # exactly 200 is allowed, as in HF
  with pytest.raises(ValueError):
    _hf(image_processor, [Image.new("RGB", (201, 1))])
  for shape in [(1, 201, 3), (3000, 14, 3)]:
    with pytest.raises(image.ImageError, match=r"aspect ratio .* is (201|214)\.\d.*at most 200") as e:
      image.preprocess(np.zeros(shape, np.uint8), **FIXTURE_LIMITS)
    assert "array shape" in str(e.value)  # names the image


def test_non_image_file_and_bytes_errors_name_the_source(tmp_path):
  txt = tmp_path / "notes.txt"
  txt.write_text("definitely not an image\n")
  with pytest.raises(image.ImageError, match="notes.txt"):
    image.preprocess(txt)
  with pytest.raises(image.ImageError, match="notes.txt"):
    image.preprocess({"path": str(txt)})
  with pytest.raises(image.ImageError, match=r"<11 bytes starting b'hello world'>"):
    image.preprocess(b"hello world")
  with pytest.raises(image.ImageError, match="missing.png"):
    image.load_image(tmp_path / "missing.png")
  # truncated PNG: PIL opens lazily, the error must still surface here and name the file
  good = tmp_path / "good.png"
  Image.fromarray(_noise(64, 64)).save(good)
  bad = tmp_path / "truncated.png"
  bad.write_bytes(good.read_bytes()[:300])
  with pytest.raises(image.ImageError, match="truncated.png"):
    image.preprocess(bad)
  assert isinstance(image.ImageError("x"), ValueError)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8),
                                 np.zeros((0, 8, 3), np.uint8), 42, {"other": 1}])
def test_bad_inputs_raise_image_error(bad):
  with pytest.raises(image.ImageError):
    image.load_image(bad)


# ---------------------------------------------------------------------------------------------------
# smart_resize


def test_smart_resize_by_hand():
  assert image.smart_resize(112, 140, 28, 3136, 50176) == (112, 140)  # already multiples of 28
  assert image.smart_resize(1, 1, 28, 3136, 50176) == (56, 56)  # min branch: beta = 56
  # max branch: 1000x1000 -> beta = sqrt(1e6/50176) = 4.464; floor(224.0/28)*28 = 224
  assert image.smart_resize(1000, 1000, 28, 3136, 50176) == (224, 224)
  assert image.smart_resize(42, 42, 28, 0, 10**9) == (56, 56)  # round(1.5) = 2 (half to even)
  assert image.smart_resize(70, 70, 28, 0, 10**9) == (56, 56)  # round(2.5) = 2, not 3


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 20000), w=st.integers(1, 20000), min_k=st.integers(1, 64), max_mult=st.integers(1, 4096))
def test_smart_resize_equals_hf(h, w, min_k, max_mult):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

  min_pixels, max_pixels = 784 * min_k, 784 * min_k * max_mult
  if max(h, w) / min(h, w) > 200:
    with pytest.raises(image.ImageError):
      image.smart_resize(h, w, 28, min_pixels, max_pixels)
  else:
    assert image.smart_resize(h, w, 28, min_pixels, max_pixels) == hf_smart_resize(h, w, 28, min_pixels, max_pixels)


@settings(max_examples=300, deadline=None)
@given(short=st.integers(1, 5000), ratio=st.floats(1.0, 200.0), tall=st.booleans(), min_k=st.integers(4, 64),
       max_mult=st.integers(4, 1024))
def test_smart_resize_invariants(short, ratio, tall, min_k, max_mult):
  long_ = min(int(short * ratio), short * 200)
  h, w = (long_, short) if tall else (short, long_)
  min_pixels, max_pixels = 784 * min_k, 784 * min_k * max_mult
  rh, rw = image.smart_resize(h, w, 28, min_pixels, max_pixels)
  assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
  # Within bounds when feasible: with max >= 4*min and the aspect ratio <= min_pixels/(4*784), every
  # scaled side is >= 56, so the rounding loses/gains at most a factor 2 per side.
  if max(h, w) / min(h, w) <= min_pixels / (4 * 784):
    assert min_pixels <= rh * rw <= max_pixels
  # A size already within bounds is a fixed point (unless rounding pushed the aspect ratio past 200:
  # e.g. 32x5632 (176) -> 28x5628 (201), which smart_resize itself would then reject, as HF's does).
  if min_pixels <= rh * rw <= max_pixels and max(rh, rw) / min(rh, rw) <= 200:
    assert image.smart_resize(rh, rw, 28, min_pixels, max_pixels) == (rh, rw)


def test_smart_resize_rejects_nonpositive():
  with pytest.raises(image.ImageError, match="positive"):
    image.smart_resize(0, 10)


# ---------------------------------------------------------------------------------------------------
# ImageConfig


def test_image_config_from_hf_dir_and_hub_style(hf_dir, tmp_path):
  cfg = image.ImageConfig.from_preprocessor_config(hf_dir)  # transformers-5 file: size = {shortest, longest}_edge
  assert (cfg.min_pixels, cfg.max_pixels) == (hf_fixtures.MIN_PIXELS, hf_fixtures.MAX_PIXELS)
  assert cfg.image_mean == image.CLIP_MEAN and cfg.factor == 28 and cfg.patch_dim == 1176
  hub = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_mean": list(image.CLIP_MEAN), "image_std": list(image.CLIP_STD),
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
  assert image.ImageConfig.from_preprocessor_config(hub) == image.ImageConfig()
  both = dict(hub, size={"shortest_edge": 1, "longest_edge": 2}, max_pixels=999_999)  # top-level keys win
  assert image.ImageConfig.from_preprocessor_config(both).max_pixels == 999_999
  assert image.ImageConfig.from_preprocessor_config({"size": {"min_pixels": 5, "max_pixels": 6}}).min_pixels == 5
  with pytest.raises(ValueError, match="do_resize"):
    image.ImageConfig.from_preprocessor_config(dict(hub, do_resize=False))
  with pytest.raises(ValueError, match="resample"):
    image.ImageConfig.from_preprocessor_config(dict(hub, resample=2))
  with pytest.raises(ValueError, match="min_pixels"):
    image.ImageConfig(min_pixels=10, max_pixels=5)


def test_image_config_roundtrips_through_hf(tmp_path):
  from transformers import AutoImageProcessor

  cfg = image.ImageConfig(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_preprocessor_config()))
  ip = AutoImageProcessor.from_pretrained(tmp_path)
  assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (cfg.min_pixels, cfg.max_pixels)
  assert image.ImageConfig.from_preprocessor_config(tmp_path / "preprocessor_config.json") == cfg
  img = _noise(300, 500, seed=9)
  ref_pv, ref_thw = _hf(ip, [Image.fromarray(img)])
  pv, thw = image.preprocess(img, **cfg.kwargs())
  assert thw == cfg.grid_thw(300, 500) == tuple(ref_thw[0])
  assert cfg.num_image_tokens(300, 500) == math.prod(thw) // 4
  np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)


def test_load_image_returns_fresh_rgb(tmp_path):
  path = tmp_path / "a.jpg"
  Image.fromarray(_noise(20, 30)).save(path, quality=95)
  img = image.load_image(path)
  assert img.mode == "RGB" and img.size == (30, 20)
  buf = io.BytesIO()
  img.save(buf, format="PNG")  # the file handle is closed, the pixels are loaded
