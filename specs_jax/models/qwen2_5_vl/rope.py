"""Positions for Qwen2.5-VL: M-RoPE indices for the decoder, 2-D RoPE and windows for the vision tower.

Host-side index computation (`get_rope_index`, `vision_metadata`) is numpy: it depends only on
token ids, the attention mask and image grids, and runs once per batch outside `jit`, so the
jitted steps see plain int arrays of static shape. The cos/sin tables are computed inside `jit`
in float32.

Conventions (transformers `modeling_qwen2_5_vl.py`, `vision_utils.py`):
  * patches of one image arrive in merge-unit order (t, h/m, w/m, mh, mw), as the image processor
    emits them; a merge unit is m*m = 4 consecutive patches;
  * window attention groups merge units into windows of `window_size // m // patch` merge units per
    side, per temporal slice; full-attention blocks attend within one temporal slice of one image;
  * HF permutes patches so that windows are contiguous and un-permutes after the merger. Attention
    restricted by segment ids is permutation-equivariant and the merger reads whole merge units, so
    we keep the processor's order and express windows as segment ids (identical maths, no gathers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig

PAD_SEGMENT = -1


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
  if grid_thw is None:
    return []
  g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return [tuple(int(x) for x in row) for row in g]


def get_rope_index(
    config: Qwen2_5_VLConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
) -> tuple[np.ndarray, np.ndarray]:
  """3-D (t, h, w) position ids for the decoder and the per-sequence rope delta.

  Args:
    input_ids: [B, L] int.
    attention_mask: [B, L], 1 for real tokens; padding (left or right) is skipped and gets position 0.
    image_grid_thw: [n_images, 3] in (t, h, w) patches, images in order of appearance (row-major
      over the batch); likewise `video_grid_thw` and `second_per_grid_ts` [n_videos] (default 1).
  Returns:
    position_ids [3, B, L] int32 and rope_deltas [B] int32, with rope_deltas = max position + 1 -
    number of real tokens, so that a token appended after n real tokens sits at n + delta.
  Raises:
    ValueError when the number of image/video tokens of a sample disagrees with the grids.
  """
  ids = np.asarray(input_ids)
  b, length = ids.shape
  mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  m = config.vision.spatial_merge_size
  images, videos = _grid_list(image_grid_thw), _grid_list(video_grid_thw)
  secs = [1.0] * len(videos) if second_per_grid_ts is None else [float(s) for s in np.asarray(second_per_grid_ts)]
  img_i = vid_i = 0
  pos = np.zeros((3, b, length), np.int64)
  deltas = np.zeros((b,), np.int64)
  for bi in range(b):
    row = ids[bi][mask[bi]]
    n = len(row)
    out = np.zeros((3, n), np.int64)
    cur = 0  # next free position
    k = 0
    while k < n:
      tok = row[k]
      if tok == config.image_token_id or tok == config.video_token_id:
        is_video = tok == config.video_token_id
        pool = videos if is_video else images
        idx = vid_i if is_video else img_i
        kind = "video" if is_video else "image"
        if idx >= len(pool):
          raise ValueError(f"sample {bi}: more <|{kind}_pad|> blocks than {kind} grids ({len(pool)} given)")
        t, h, w = pool[idx]
        lt, lh, lw = t, h // m, w // m
        count = lt * lh * lw
        run = 0
        while k + run < n and row[k + run] == tok:
          run += 1
        if run < count:
          raise ValueError(f"sample {bi}: {kind} {idx} with grid (t,h,w)={pool[idx]} needs {count} "
                           f"<|{kind}_pad|> tokens but the prompt has a run of {run}")
        interval = config.vision.tokens_per_second * secs[idx] if is_video else 1.0
        tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
        out[0, k:k + count] = (tt.reshape(-1) * interval).astype(np.int64) + cur
        out[1, k:k + count] = hh.reshape(-1) + cur
        out[2, k:k + count] = ww.reshape(-1) + cur
        cur += max(h, w) // m
        k += count
        if is_video:
          vid_i += 1
        else:
          img_i += 1
      else:
        out[:, k] = cur
        cur += 1
        k += 1
    pos[:, bi, mask[bi]] = out
    deltas[bi] = (out.max() + 1 - n) if n else 0
  if img_i != len(images) or vid_i != len(videos):
    raise ValueError(f"image/video token blocks found ({img_i} images, {vid_i} videos) do not match the grids "
                     f"given ({len(images)} images, {len(videos)} videos)")
  return pos.astype(np.int32), deltas.astype(np.int32)


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
  """Positions for text-only inputs: cumsum of the mask - 1 (0 on padding), on all 3 axes [3, B, L]."""
  mask = np.asarray(attention_mask).astype(np.int64)
  p = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
  return np.broadcast_to(p[None], (3,) + p.shape).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class VisionMeta:
  """Per-patch metadata for the vision tower in the slot layout.

  Patches are laid out in S slots of Q patches (one image per slot, padded), so the vision
  tower attends within [Q, Q] blocks instead of across every patch of the batch ([P, P] with
  P = all patches would cost O(P²): 8k patches for 32 images of 224 px). The legacy flat layout
  is one slot holding everything.

  pos_h, pos_w: [S, Q] 2-D rope positions; window_seg / full_seg: [S, Q] attention segment ids
  (PAD_SEGMENT on padding); valid: [S, Q] real patch; token_index: [S*Q/m²] for each image token
  in prompt order, its index in the merged [S*Q/m², D] output (0 on padding).
  """

  pos_h: np.ndarray
  pos_w: np.ndarray
  window_seg: np.ndarray
  full_seg: np.ndarray
  valid: np.ndarray
  token_index: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.valid.sum())

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


def _image_patch_meta(vcfg: VisionConfig, t: int, h: int, w: int):
  m = vcfg.spatial_merge_size
  ws = vcfg.window_size // m // vcfg.patch_size  # window side in merge units
  if h % m or w % m:
    raise ValueError(f"grid (t,h,w)=({t},{h},{w}) not divisible by spatial_merge_size {m}")
  lh, lw = h // m, w // m
  # merge-unit order: (t, hb, wb, mh, mw)
  tt, hb, wb, mh, mw = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), np.arange(m), np.arange(m),
                                   indexing="ij")
  nwh, nww = -(-lh // ws), -(-lw // ws)
  win = (tt * nwh + hb // ws) * nww + wb // ws
  return ((hb * m + mh).reshape(-1), (wb * m + mw).reshape(-1), win.reshape(-1), tt.reshape(-1),
          t * nwh * nww, t)


def slot_size_for(grid_thw) -> int:
  """Patches of the largest image: the smallest slot size that fits every image."""
  grids = _grid_list(grid_thw)
  return max((t * h * w for t, h, w in grids), default=0)


def vision_metadata(vcfg: VisionConfig, grid_thw, num_patches: int | None = None, *,
                    slot_size: int | None = None, num_slots: int | None = None) -> VisionMeta:
  """Builds `VisionMeta` for images/videos with the given grids.

  With `slot_size` (patches per slot, a multiple of m²) and `num_slots`, each image gets its own
  slot (pad with `pack_pixel_values`). Otherwise all patches share one slot of `num_patches`
  (default: exactly the patch count).
  """
  unit = vcfg.spatial_merge_size**2
  grids = _grid_list(grid_thw)
  sizes = [t * h * w for t, h, w in grids]
  if slot_size is None:
    n = sum(sizes)
    q = n if num_patches is None else num_patches
    if q < n:
      raise ValueError(f"{n} patches do not fit the patch bucket of {q}")
    slots = [list(range(len(grids)))]
  else:
    q = slot_size
    if q % unit:
      raise ValueError(f"slot_size {q} must be a multiple of {unit}")
    too_big = [i for i, n in enumerate(sizes) if n > q]
    if too_big:
      raise ValueError(f"images {too_big} have {[sizes[i] for i in too_big]} patches, more than the slot size {q}")
    slots = [[i] for i in range(len(grids))]
  s_total = len(slots) if num_slots is None else num_slots
  if s_total < len(slots):
    raise ValueError(f"{len(slots)} images do not fit {s_total} image slots")
  shape = (max(s_total, 1), q)
  pos_h = np.zeros(shape, np.int32)
  pos_w = np.zeros(shape, np.int32)
  wseg = np.full(shape, PAD_SEGMENT, np.int32)
  fseg = np.full(shape, PAD_SEGMENT, np.int32)
  valid = np.zeros(shape, bool)
  token_index = np.zeros((shape[0] * q // unit,), np.int32)
  next_w = next_f = tok = 0
  for si, members in enumerate(slots):
    off = 0
    for gi in members:
      t, h, w = grids[gi]
      ph, pw, win, tt, n_win, n_t = _image_patch_meta(vcfg, t, h, w)
      n = len(ph)
      pos_h[si, off:off + n], pos_w[si, off:off + n] = ph, pw
      wseg[si, off:off + n] = win + next_w
      fseg[si, off:off + n] = tt + next_f
      valid[si, off:off + n] = True
      n_tok = n // unit
      token_index[tok:tok + n_tok] = (si * q + off) // unit + np.arange(n_tok)
      tok += n_tok
      next_w += n_win
      next_f += n_t
      off += n
  return VisionMeta(pos_h=pos_h, pos_w=pos_w, window_seg=wseg, full_seg=fseg, valid=valid, token_index=token_index)


def pack_pixel_values(pixel_values: np.ndarray, grid_thw, slot_size: int | None = None,
                      num_slots: int | None = None, num_patches: int | None = None) -> np.ndarray:
  """Concatenated patches [Σ t·h·w, C] → the slot layout [S*Q, C] of `vision_metadata` (zero padding)."""
  pv = np.asarray(pixel_values, np.float32)
  sizes = [t * h * w for t, h, w in _grid_list(grid_thw)]
  if sum(sizes) != pv.shape[0]:
    raise ValueError(f"pixel_values has {pv.shape[0]} patches but image_grid_thw gives {sum(sizes)}")
  if slot_size is None:
    q = pv.shape[0] if num_patches is None else num_patches
    out = np.zeros((q, pv.shape[1]), np.float32)
    out[:pv.shape[0]] = pv
    return out
  s_total = len(sizes) if num_slots is None else num_slots
  out = np.zeros((max(s_total, 1) * slot_size, pv.shape[1]), np.float32)
  start = 0
  for i, n in enumerate(sizes):
    out[i * slot_size:i * slot_size + n] = pv[start:start + n]
    start += n
  return out


# ------------------------------------------------------------------------------ cos / sin (in jit)


def rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section, dtype):
  """M-RoPE tables. position_ids [3, B, L] → cos, sin [B, L, head_dim] in `dtype`.

  Frequencies in float32; chunk k of the (head_dim/2) frequencies takes axis k % 3 (t, h, w), then
  the half is duplicated (rotate-half layout). Not the interleaved layout of Qwen3-VL.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, Dh/2]
  bounds = np.cumsum([0] + list(mrope_section))
  parts = [freqs[k % 3, ..., bounds[k]:bounds[k + 1]] for k in range(len(mrope_section))]
  f = jnp.concatenate(parts, axis=-1)  # [B, L, Dh/2]
  emb = jnp.concatenate([f, f], axis=-1)
  return _computed_once(jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype))


def vision_cos_sin(pos_h, pos_w, head_dim: int, theta: float):
  """2-D rope for patches: [...] positions → cos, sin [..., head_dim] float32 (h freqs then w freqs, twice)."""
  dim = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [head_dim/4]
  fh = pos_h.astype(jnp.float32)[..., None] * inv_freq
  fw = pos_w.astype(jnp.float32)[..., None] * inv_freq
  f = jnp.concatenate([fh, fw], axis=-1)
  emb = jnp.concatenate([f, f], axis=-1)
  return _computed_once(jnp.cos(emb), jnp.sin(emb))


def materialize_tables(cos, sin):
  """The tables, computed once into buffers instead of inside every layer's rope.

  XLA:CPU fuses the cos/sin that produce the tables into each consumer: every layer's q and k
  rope, forward and backward, re-evaluates the transcendentals once per head. In the DPO step at
  the benchmark's S config that is 56 copies of each, ~3% of the step. A dot is never fused into
  its consumers, so the tables pass through an identity product, exact at HIGHEST precision
  (x·1 plus zeros; the tables hold no infinities). `jax.lax.optimization_barrier` does not do
  this: XLA:CPU removes barriers before fusion. The table functions apply it only on CPU
  (`worth_materializing`): XLA:GPU's fusion already refuses to duplicate work through an expanding
  broadcast, TPU was not measured, and a one-position table (decoding) costs more to multiply than
  to recompute.
  """
  eye = jnp.eye(cos.shape[-1], dtype=cos.dtype)
  product = lambda t: jnp.einsum("...d,de->...e", t, eye, precision=jax.lax.Precision.HIGHEST)
  return product(cos), product(sin)


def worth_materializing(num_positions: int) -> bool:
  """Whether `materialize_tables` pays for tables of `num_positions` positions per row."""
  return num_positions > 1 and jax.default_backend() == "cpu"


def _computed_once(cos, sin):
  """Tables [..., positions, head_dim], materialized when `worth_materializing`."""
  return materialize_tables(cos, sin) if worth_materializing(cos.shape[-2]) else (cos, sin)


def apply_rope(x, cos, sin):
  """x [..., S, H, D]; cos/sin broadcastable as [..., S, 1, D]."""
  return x * cos + rotate_half(x) * sin
