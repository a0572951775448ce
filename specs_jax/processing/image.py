"""Qwen2.5-VL image preprocessing in numpy + PIL: load, smart-resize, normalise, patchify.

Matches transformers' `Qwen2VLImageProcessorPil` (image_processing_pil_qwen2_vl.py, the PIL backend
that `AutoImageProcessor` returns when torchvision is absent) value for value:

  load + convert to RGB    alpha composited onto white, as transformers' `convert_to_rgb`
  resize                   `smart_resize` to multiples of 28 (= patch 14 * merge 2), PIL BICUBIC
  rescale                  uint8 -> float64 * (1/255) -> float32
  normalise                (x - mean) / std in float32, CLIP mean/std
  patchify                 one image = 2 identical frames (temporal_patch_size), grid (1, H/14, W/14)

Patch layout (rows of `pixel_values`): rows are ordered (t, h/2, w/2, mh, mw), i.e. the 2x2 patches
that the vision merger fuses are contiguous; each row is (C, T, ph, pw) flattened = 3*2*14*14 = 1176
values. This is HF's `.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)` of `(t, T, C, h/2, 2, 14, w/2, 2, 14)`.

Arrays given as images are uint8 HWC (or HW). transformers instead guesses the layout of an array and
reads one whose first axis is 1, 3 or 4 long as channels-first; we never guess.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

# Qwen2.5-VL hub preprocessor_config.json values (PEERS.md §6.4). transformers' class defaults
# differ (max 28*28*1280), so pin these explicitly.
MIN_PIXELS = 56 * 56  # 3,136
MAX_PIXELS = 28 * 28 * 16384  # 12,845,056
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
MAX_ASPECT_RATIO = 200
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value HF writes as "resample"

ImageSource = Union[Image.Image, np.ndarray, str, os.PathLike, bytes, bytearray, memoryview, Mapping]


class ImageError(ValueError):
  """An image that cannot be read or preprocessed; the message names its source."""


# --------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """Image processor settings (the fields of a HF `preprocessor_config.json` that we use).

  `factor` = patch_size * merge_size is what `smart_resize` rounds sides to; `patch_dim` =
  3 * temporal_patch_size * patch_size**2 is the width of `pixel_values`.
  """

  min_pixels: int = MIN_PIXELS
  max_pixels: int = MAX_PIXELS
  patch_size: int = PATCH_SIZE
  temporal_patch_size: int = TEMPORAL_PATCH_SIZE
  merge_size: int = MERGE_SIZE
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  rescale_factor: float = RESCALE_FACTOR

  def __post_init__(self):
    object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
    object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
    for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ImageConfig.{name} must be positive, got {getattr(self, name)}")
    if self.min_pixels > self.max_pixels:
      raise ValueError(f"ImageConfig: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ValueError(f"ImageConfig: image_mean/image_std need 3 values, got {self.image_mean}, {self.image_std}")

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size**2

  def kwargs(self) -> dict[str, Any]:
    """Keyword arguments for `preprocess` / `preprocess_many`."""
    return dataclasses.asdict(self)

  def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a `height` x `width` image, without touching pixels."""
    h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
    return 1, h // self.patch_size, w // self.patch_size

  def num_image_tokens(self, height: int, width: int) -> int:
    """Number of `<|image_pad|>` tokens (merged vision tokens) for a `height` x `width` image."""
    return math.prod(self.grid_thw(height, width)) // self.merge_size**2

  @classmethod
  def from_preprocessor_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> ImageConfig:
    """Reads a HF `preprocessor_config.json` (a file, the directory holding it, or its dict).

    Pixel limits are taken as transformers 5 does: `size = {shortest_edge, longest_edge}` (also
    accepted: `size = {min_pixels, max_pixels}`), then top-level `min_pixels` / `max_pixels` (the
    keys of the Qwen2.5-VL hub file) override. Missing keys get the Qwen2.5-VL hub defaults.
    Settings this module does not implement (no resize, no RGB conversion, a resample other than
    bicubic, ...) raise a ValueError rather than being ignored.
    """
    if isinstance(path_or_dict, Mapping):
      d, where = dict(path_or_dict), "preprocessor config dict"
    else:
      path = os.fspath(path_or_dict)
      if os.path.isdir(path):
        path = os.path.join(path, "preprocessor_config.json")
      with open(path) as f:
        d, where = json.load(f), path
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
      if d.get(key, True) is not True:
        raise ValueError(f"{where}: {key}={d[key]} is not supported (Qwen2.5-VL preprocessing needs it true)")
    if d.get("resample", _BICUBIC) != _BICUBIC:
      raise ValueError(f"{where}: resample={d['resample']} is not supported (only bicubic, 3)")
    size = d.get("size") or {}
    min_pixels = size.get("shortest_edge", size.get("min_pixels", MIN_PIXELS))
    max_pixels = size.get("longest_edge", size.get("max_pixels", MAX_PIXELS))
    if d.get("min_pixels") is not None:
      min_pixels = d["min_pixels"]
    if d.get("max_pixels") is not None:
      max_pixels = d["max_pixels"]
    return cls(
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
        patch_size=int(d.get("patch_size", PATCH_SIZE)),
        temporal_patch_size=int(d.get("temporal_patch_size", TEMPORAL_PATCH_SIZE)),
        merge_size=int(d.get("merge_size", MERGE_SIZE)),
        image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
        image_std=tuple(d.get("image_std", CLIP_STD)),
        rescale_factor=float(d.get("rescale_factor", RESCALE_FACTOR)),
    )

  def to_preprocessor_config(self) -> dict[str, Any]:
    """A HF `preprocessor_config.json` dict that transformers 4.x and 5.x both read back as this config
    (5.x reads `size`, 4.x `min_pixels`/`max_pixels`; the two agree)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(self.image_mean),
        "image_std": list(self.image_std),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "merge_size": self.merge_size,
        "patch_size": self.patch_size,
        "temporal_patch_size": self.temporal_patch_size,
        "resample": _BICUBIC,
        "rescale_factor": self.rescale_factor,
        "min_pixels": self.min_pixels,
        "max_pixels": self.max_pixels,
        "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
    }


# --------------------------------------------------------------------------------------------------
# Resize arithmetic


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_SIZE * MERGE_SIZE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
  """Target (height, width) for an image: multiples of `factor`, area in [min_pixels, max_pixels].

  The arithmetic is transformers' `smart_resize` operation for operation (Python's round-half-even
  `round`, the same float expressions), so the sizes are identical to HF's. Like HF, it does not
  re-check the bounds: a very elongated image can end above `max_pixels` (the min branch rounds up)
  or below `min_pixels` (the max branch clamps sides to `factor`).

  Raises:
    ImageError: a side is not positive, or the aspect ratio is over 200 (HF's limit).
  """
  if height <= 0 or width <= 0:
    raise ImageError(f"image size must be positive, got {height}x{width} (HxW)")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ImageError(
        f"aspect ratio of a {height}x{width} (HxW) image is {max(height, width) / min(height, width):.1f}; "
        f"Qwen2.5-VL accepts at most {MAX_ASPECT_RATIO}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


# --------------------------------------------------------------------------------------------------
# Loading


def describe_source(src: Any) -> str:
  """A short human-readable name for an image source, for error messages."""
  if isinstance(src, (str, os.PathLike)):
    return repr(os.fspath(src))
  if isinstance(src, (bytes, bytearray, memoryview)):
    b = bytes(src)
    return f"<{len(b)} bytes starting {b[:16]!r}>"
  if isinstance(src, Mapping):
    if src.get("path"):
      return repr(os.fspath(src["path"]))
    return describe_source(src.get("bytes") or b"")
  if isinstance(src, Image.Image):
    return f"<PIL image mode={src.mode} size={src.width}x{src.height} (WxH)>"
  if isinstance(src, np.ndarray):
    return f"<array shape={src.shape} dtype={src.dtype}>"
  return f"<{type(src).__name__}>"


def _pil_to_rgb(img: Image.Image) -> Image.Image:
  # As transformers' `convert_to_rgb` (image_transforms.py): anything with an alpha band or a
  # `transparency` entry (P/L/RGB with tRNS) is composited onto opaque white; the rest is
  # `convert("RGB")` (L, 1, P, CMYK, YCbCr, I, ...).
  has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
  if has_alpha:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def _array_to_rgb(a: np.ndarray) -> Image.Image:
  if a.dtype != np.uint8:
    raise ImageError(f"{describe_source(a)}: image arrays must be uint8 HWC (or HW), got dtype {a.dtype}")
  if a.ndim == 2:
    a = a[:, :, None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ImageError(f"{describe_source(a)}: image arrays must be HW or HWC with C in (1, 3, 4)")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ImageError(f"{describe_source(a)}: empty image")
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  elif a.shape[-1] == 4:
    # transformers' numeric composite for arrays (not PIL's alpha_composite, which rounds differently).
    alpha = a[..., 3:4] / 255
    a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return Image.fromarray(np.ascontiguousarray(a))


def _open(fp: Any, name: str) -> Image.Image:
  try:
    with Image.open(fp) as img:
      img.load()  # decode now: PIL opens lazily, so a truncated file would only fail later
      return _pil_to_rgb(img)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    raise ImageError(f"cannot read image {name}: {type(e).__name__}: {e}") from e


def load_image(src: ImageSource) -> Image.Image:
  """Loads an image as an RGB PIL image, converting modes the way transformers does.

  Args:
    src: a PIL image; a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (RGBA); a file path;
      the encoded file as bytes; or a HF-datasets style dict {"bytes": ..., "path": ...} (bytes win
      when both are set, the path names the image in errors).
  Returns:
    a PIL image in mode "RGB". Transparency is composited onto white. EXIF orientation is not
    applied (HF does not either).
  Raises:
    ImageError: naming `src`, for a missing, unreadable, truncated or non-image file or bytes, a
      wrong array dtype/shape, or an unsupported type.
  """
  if isinstance(src, Image.Image):
    try:
      src.load()
      return _pil_to_rgb(src)
    except Exception as e:
      raise ImageError(f"cannot read image {describe_source(src)}: {type(e).__name__}: {e}") from e
  if isinstance(src, np.ndarray):
    return _array_to_rgb(src)
  if isinstance(src, (str, os.PathLike)):
    return _open(os.fspath(src), describe_source(src))
  if isinstance(src, (bytes, bytearray, memoryview)):
    return _open(io.BytesIO(bytes(src)), describe_source(src))
  if isinstance(src, Mapping):
    data, path = src.get("bytes"), src.get("path")
    if data:
      return _open(io.BytesIO(bytes(data)), describe_source(src))
    if path:
      return _open(os.fspath(path), describe_source(src))
    raise ImageError(f"image dict has neither 'bytes' nor 'path': keys {sorted(src)}")
  raise ImageError(f"unsupported image source type {type(src).__name__} (PIL image, uint8 array, path, bytes or dict)")


# --------------------------------------------------------------------------------------------------
# Preprocessing


def _patchify(x: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
  """[H, W, C] float32 -> [gh*gw, C*T*p*p] in HF's (h/m, w/m, mh, mw | C, T, ph, pw) order."""
  height, width, channels = x.shape
  gh, gw, p, m = height // patch_size, width // patch_size, patch_size, merge_size
  x = x.reshape(gh // m, m, p, gw // m, m, p, channels)  # [bh, mh, ph, bw, mw, pw, C]
  x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [bh, bw, mh, mw, C, ph, pw]
  # The image is its own second frame: repeat along a new T axis after C.
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
  return x.reshape(gh * gw, channels * temporal_patch_size * p * p)


def preprocess(
    image: ImageSource,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
    rescale_factor: float = RESCALE_FACTOR,
) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One image -> Qwen2.5-VL vision patches, equal to `Qwen2VLImageProcessorPil`.

  Args:
    image: anything `load_image` accepts.
    min_pixels, max_pixels: area bounds for `smart_resize` (pin them; see MIN_PIXELS/MAX_PIXELS).
    patch_size, temporal_patch_size, merge_size: vision patching (14, 2, 2 for Qwen2.5-VL).
    image_mean, image_std, rescale_factor: normalisation, (x * rescale_factor - mean) / std.
  Returns:
    pixel_values: [t*h*w, 3*temporal_patch_size*patch_size**2] float32 ([t*h*w, 1176]).
    grid_thw: (t, h, w) = (1, H/patch_size, W/patch_size) for the resized H x W image.
  Raises:
    ImageError: naming the image, if it cannot be read or its aspect ratio is over 200.
  """
  img = load_image(image)
  try:
    height, width = smart_resize(img.height, img.width, patch_size * merge_size, min_pixels, max_pixels)
  except ImageError as e:
    raise ImageError(f"image {describe_source(image)}: {e}") from e
  # HF resizes even when the size is unchanged; PIL returns a copy then, so skipping is identical.
  img = img.resize((width, height), resample=Image.Resampling.BICUBIC)
  x = np.asarray(img)  # [H, W, 3] uint8
  # Same dtype steps as HF: rescale in float64 then cast, normalise in float32.
  x = (x.astype(np.float64) * rescale_factor).astype(np.float32)
  x = (x - np.asarray(image_mean, np.float32)) / np.asarray(image_std, np.float32)
  pixel_values = _patchify(x, patch_size, temporal_patch_size, merge_size)
  return pixel_values, (1, height // patch_size, width // patch_size)


def preprocess_many(images: Sequence[ImageSource], **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Several images -> concatenated patches, as HF's processor returns them for one batch.

  Args:
    images: a sequence of anything `load_image` accepts (may be empty).
    **kwargs: as `preprocess` (e.g. `**ImageConfig(...).kwargs()`).
  Returns:
    pixel_values: [sum_i t_i*h_i*w_i, 1176] float32, image i's rows after image i-1's.
    grid_thw: [n, 3] int32, one (t, h, w) row per image.
  """
  if not images:
    patch_size = kwargs.get("patch_size", PATCH_SIZE)
    dim = 3 * kwargs.get("temporal_patch_size", TEMPORAL_PATCH_SIZE) * patch_size**2
    return np.zeros((0, dim), np.float32), np.zeros((0, 3), np.int32)
  outs = [preprocess(im, **kwargs) for im in images]
  pixel_values = np.concatenate([pv for pv, _ in outs], axis=0)
  grid_thw = np.asarray([thw for _, thw in outs], dtype=np.int32).reshape(-1, 3)
  return pixel_values, grid_thw
