"""Padding to static shapes: token batches and vision patches padded to a few bucket sizes.

XLA compiles one program per input shape, so every array a jitted function sees is padded to a
bucket (STYLE.md §5). Conventions:

  prompts       left-padded: the last prompt token of every row is in column P-1, so generation
                appends at the same column for the whole batch.
  completions   right-padded, starting at column P.
  masks         int32 1 = real token, 0 = padding (pad tokens are `pad_id`, `<|endoftext|>` for Qwen).
  patches       image patches concatenated as HF does ([Np, 1176]), then zero rows up to a bucket
                with `patch_valid` False; `image_grid_thw` keeps the real images' grids.

Numpy only; nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


class OverlongError(ValueError):
  """A sample (or a batch's patches) does not fit the length budget; the message names it."""

  def __init__(self, what: str, length: int, budget: int, index: int | None = None, hint: str = ""):
    self.what, self.length, self.budget, self.index = what, length, budget, index
    name = what if index is None else f"{what} {index}"
    super().__init__(f"{name} has length {length}, over the budget of {budget}" + (f" ({hint})" if hint else ""))


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Allowed padded lengths, ascending. Frozen and hashable, so it can be a static jit argument.

  `Buckets((256, 512, 1024))(300) == 512`; `Buckets.powers_of_two(64, 1024)` is (64, 128, ..., 1024).
  """

  sizes: tuple[int, ...]

  def __post_init__(self):
    sizes = tuple(int(s) for s in self.sizes)
    if not sizes:
      raise ValueError("Buckets needs at least one size")
    if any(s <= 0 for s in sizes) or any(a >= b for a, b in zip(sizes, sizes[1:])):
      raise ValueError(f"bucket sizes must be positive and strictly increasing, got {sizes}")
    object.__setattr__(self, "sizes", sizes)

  @classmethod
  def powers_of_two(cls, min_size: int, max_size: int) -> Buckets:
    """min_size, 2*min_size, 4*min_size, ... up to max_size (max_size is always the last bucket)."""
    if min_size <= 0 or max_size < min_size:
      raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    sizes, s = [], min_size
    while s < max_size:
      sizes.append(s)
      s *= 2
    return cls(tuple(sizes) + (max_size,))

  @property
  def max(self) -> int:
    return self.sizes[-1]

  def __call__(self, n: int, what: str = "length") -> int:
    return bucket_length(n, self.sizes, what=what)


def bucket_length(n: int, buckets: Buckets | Sequence[int], what: str = "length") -> int:
  """Smallest bucket >= n.

  Raises:
    OverlongError: n is larger than every bucket (the message has n and the largest bucket).
  """
  sizes = buckets.sizes if isinstance(buckets, Buckets) else tuple(sorted(buckets))
  for b in sizes:
    if n <= b:
      return int(b)
  raise OverlongError(what, n, sizes[-1], hint="raise the largest bucket in the config")


def _check_lengths(seqs: Sequence[Sequence[int]], length: int, what: str) -> None:
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise OverlongError(what, len(s), length, index=i)


def pad_prompts_left(
    list_of_ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None, what: str = "prompt"
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token sequences to a common length.

  Args:
    list_of_ids: B sequences of token ids.
    pad_id: the id written in padded positions.
    length: L; None means the longest sequence.
  Returns:
    ids: [B, L] int32, row i = [pad_id] * (L - len_i) + ids_i.
    mask: [B, L] int32, 1 on the real tokens.
  Raises:
    OverlongError: a sequence is longer than L (names its index).
  """
  length = max((len(s) for s in list_of_ids), default=0) if length is None else length
  _check_lengths(list_of_ids, length, what)
  ids = np.full((len(list_of_ids), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(list_of_ids), length), dtype=np.int32)
  for i, s in enumerate(list_of_ids):
    if len(s):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
  return ids, mask


def pad_right(
    list_of_ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None, what: str = "sequence"
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token sequences: ids [B, L] int32 (row i = ids_i + [pad_id] * (L - len_i)) and mask
  [B, L] int32 (1 on real tokens). `length` None means the longest; longer sequences raise
  OverlongError naming their index."""
  length = max((len(s) for s in list_of_ids), default=0) if length is None else length
  _check_lengths(list_of_ids, length, what)
  ids = np.full((len(list_of_ids), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(list_of_ids), length), dtype=np.int32)
  for i, s in enumerate(list_of_ids):
    ids[i, :len(s)] = s
    mask[i, :len(s)] = 1
  return ids, mask


def pack_prompt_completion(
    prompt_ids_list: Sequence[Sequence[int]],
    completion_ids_list: Sequence[Sequence[int]],
    pad_id: int,
    prompt_len: int,
    completion_len: int,
) -> dict[str, np.ndarray]:
  """Prompt + completion rows with the boundary at column P = prompt_len.

  Row i: [pad]*(P - p_i) + prompt_i + completion_i + [pad]*(C - c_i), length P + C.

  Args:
    prompt_ids_list: B prompts (token ids).
    completion_ids_list: B completions (token ids, including the EOS if the sample has one).
    pad_id: padding id.
    prompt_len: P; completion_len: C (bucketed lengths).
  Returns:
    input_ids:          [B, P+C] int32.
    attention_mask:     [B, P+C] int32, 1 on prompt and completion tokens.
    completion_mask:    [B, P+C] int32, 1 on completion tokens (incl. EOS), at columns P..P+c_i-1.
                        Token-level: the logit predicting column j sits at column j-1.
    prompt_lengths:     [B] int32 (p_i); completion_lengths: [B] int32 (c_i).
  Raises:
    OverlongError: a prompt is longer than P or a completion longer than C (names the index);
      ValueError if the two lists differ in length.
  """
  if len(prompt_ids_list) != len(completion_ids_list):
    raise ValueError(f"{len(prompt_ids_list)} prompts but {len(completion_ids_list)} completions")
  p_ids, p_mask = pad_prompts_left(prompt_ids_list, pad_id, prompt_len, what="prompt")
  c_ids, c_mask = pad_right(completion_ids_list, pad_id, completion_len, what="completion")
  zeros = np.zeros_like(p_mask)
  return {
      "input_ids": np.concatenate([p_ids, c_ids], axis=1),
      "attention_mask": np.concatenate([p_mask, c_mask], axis=1),
      "completion_mask": np.concatenate([zeros, c_mask], axis=1),
      "prompt_lengths": p_mask.sum(axis=1, dtype=np.int32),
      "completion_lengths": c_mask.sum(axis=1, dtype=np.int32),
  }


def pad_patches(
    pixel_values: np.ndarray | Sequence[np.ndarray],
    grid_thw: np.ndarray | Sequence[Sequence[int]],
    num_patches_bucket: int,
    max_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads a batch's vision patches to a fixed number of rows.

  Args:
    pixel_values: [Np, D] float32 (HF's concatenation over images) or a list of per-image [n_i, D].
    grid_thw: [n, 3] (t, h, w) per image; sum of t*h*w must equal Np.
    num_patches_bucket: Nb >= Np rows in the output.
    max_images: if set, `grid_thw` is padded with (0, 0, 0) rows to [max_images, 3] (a zero grid has
      zero patches), so its shape is static too.
  Returns:
    pixel_values: [Nb, D] float32, real patches first, zero rows after.
    patch_valid:  [Nb] bool, True on the Np real rows.
    grid_thw:     [n, 3] int32 ([max_images, 3] if given).
  Raises:
    OverlongError: Np > Nb, or n > max_images. ValueError: patch counts do not match the grids.
  """
  grid = np.asarray(grid_thw, dtype=np.int32).reshape(-1, 3)
  counts = grid.prod(axis=1)
  if not isinstance(pixel_values, np.ndarray):
    parts = list(pixel_values)
    if len(parts) != len(grid):
      raise ValueError(f"{len(parts)} pixel_values arrays but {len(grid)} grids")
    for i, (pv, c) in enumerate(zip(parts, counts)):
      if pv.shape[0] != c:
        raise ValueError(f"image {i}: {pv.shape[0]} patches but grid {grid[i].tolist()} needs {c}")
    pixel_values = np.concatenate(parts, axis=0) if parts else np.zeros((0, 1176), np.float32)
  num = pixel_values.shape[0]
  if num != counts.sum():
    raise ValueError(f"{num} patches but the grids {grid.tolist()} need {int(counts.sum())}")
  if num > num_patches_bucket:
    raise OverlongError("vision patches", num, num_patches_bucket, hint="raise the largest patch bucket")
  out = np.zeros((num_patches_bucket, pixel_values.shape[1]), np.float32)
  out[:num] = pixel_values
  valid = np.zeros((num_patches_bucket,), bool)
  valid[:num] = True
  if max_images is not None:
    if len(grid) > max_images:
      raise OverlongError("images", len(grid), max_images, hint="raise max_images")
    grid = np.concatenate([grid, np.zeros((max_images - len(grid), 3), np.int32)], axis=0)
  return out, valid, grid


def patch_segment_ids(grid_thw: np.ndarray | Sequence[Sequence[int]], num_patches_bucket: int) -> np.ndarray:
  """[Nb] int32: for each (padded) patch row, the index of its image in `grid_thw`; -1 on padding.
  Zero grids (padding rows from `pad_patches(max_images=...)`) own no patches."""
  counts = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).prod(axis=1)
  seg = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
  if len(seg) > num_patches_bucket:
    raise OverlongError("vision patches", len(seg), num_patches_bucket)
  return np.concatenate([seg, np.full(num_patches_bucket - len(seg), -1, np.int32)])


def _as_buckets(b: Buckets | Sequence[int] | int) -> Buckets:
  if isinstance(b, Buckets):
    return b
  return Buckets((b,)) if isinstance(b, int) else Buckets(tuple(b))


def collate_prompts(
    prompts: Sequence[Any],
    pad_id: int,
    prompt_buckets: Buckets | Sequence[int] | int,
    patch_buckets: Buckets | Sequence[int] | int,
    max_images: int | None = None,
) -> dict[str, np.ndarray]:
  """A batch of `chat.EncodedPrompt`s (anything with input_ids, pixel_values, image_grid_thw) ->
  static-shape arrays for prefill / generation.

  Returns:
    input_ids [B, L] int32 and attention_mask [B, L] int32, left-padded, L = prompt bucket of the
      longest prompt; prompt_lengths [B] int32;
    pixel_values [Nb, 1176] float32, patch_valid [Nb] bool, image_grid_thw [n, 3] int32 (all
      images of the batch in row order; [max_images, 3] if given), Nb = patch bucket of the total.
  Raises:
    OverlongError: the longest prompt or the batch's patches exceed the largest bucket.
  """
  ids_list = [np.asarray(p.input_ids) for p in prompts]
  longest = max((len(s) for s in ids_list), default=0)
  length = _as_buckets(prompt_buckets)(longest, what="longest prompt")
  ids, mask = pad_prompts_left(ids_list, pad_id, length)
  pvs = [np.asarray(p.pixel_values, np.float32) for p in prompts]
  grids = [np.asarray(p.image_grid_thw, np.int32).reshape(-1, 3) for p in prompts]
  pixel_values = np.concatenate(pvs, axis=0) if pvs else np.zeros((0, 1176), np.float32)
  grid = np.concatenate(grids, axis=0) if grids else np.zeros((0, 3), np.int32)
  n_bucket = _as_buckets(patch_buckets)(pixel_values.shape[0], what="batch vision patches")
  pv, valid, grid = pad_patches(pixel_values, grid, n_bucket, max_images=max_images)
  return {
      "input_ids": ids,
      "attention_mask": mask,
      "prompt_lengths": mask.sum(axis=1, dtype=np.int32),
      "pixel_values": pv,
      "patch_valid": valid,
      "image_grid_thw": grid,
  }

