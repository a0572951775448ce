"""The model forward of the train steps: row layout, micro-batches, image features, completion log-probs.

Axes: B units (pairs for DPO, examples for SFT), K copies per unit (2: chosen, rejected; 1 for SFT),
R = B·K rows, L = P + C tokens, M micro-batches, D hidden.

A batch's rows arrive in G = `row_groups` blocks of (K × b) rows (G = 1: all chosen rows, then all
rejected rows). `prepare_rows` reorders them unit-major ([c_0, r_0, c_1, r_1, ...]) and splits the
units into M strided micro-batches (micro-batch m holds units m, m+M, ...), so that rows sharded
over the batch axes feed every micro-batch from every device.

Images are stored once per unit (a pair's chosen and rejected rows share the prompt). The encoder
runs once on them; `image_sources` tells every <|image_pad|> token of every row which encoded
feature it takes, and `gather_image_embeds` lays the features out in the order the model's `embed`
consumes them for a micro-batch's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from specs_jax.models.qwen2_5_vl.model import Qwen2_5_VL, lm_head_kernel
from specs_jax.parallel import mesh as mesh_lib
from specs_jax.training.logprobs import token_logprobs_from_hidden

__all__ = ["Forward", "PAIR_KEYS", "ROW_KEYS", "VISION_META_KEYS", "constrain", "gather_image_embeds",
           "check_shared_prompts", "image_sources", "micro_split", "pack_units", "packed_predictors", "prepare_rows",
           "select_batch", "to_units"]

PyTree = Any
VISION_META_KEYS = ("pos_h", "pos_w", "window_seg", "full_seg", "token_index")
ROW_KEYS = ("input_ids", "attention_mask", "completion_mask")
PAIR_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "pair_weight")


# ---------------------------------------------------------------------------------- row layout

def to_units(x: jax.Array, copies: int, row_groups: int) -> jax.Array:
  """Rows [G·copies·b, ...] in G blocks of (copies × b) → units [G·b, copies, ...] (unit-major)."""
  n = x.shape[0]
  b = n // (row_groups * copies)
  x = x.reshape(row_groups, copies, b, *x.shape[1:])
  return jnp.swapaxes(x, 1, 2).reshape(row_groups * b, copies, *x.shape[3:])


def micro_split(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] → [M, B/M, ...], micro-batch j holding items j, j+M, j+2M, ... (strided)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1)


def image_sources(ids_units: jax.Array, image_token_id: int) -> jax.Array:
  """For each token of units [B, copies, L]: the row of the image features it takes (0 elsewhere).

  Features are stored per unit (pair / example) in unit order; every copy of a unit (chosen and
  rejected row) holds the same image tokens, so copy c's j-th image token takes feature
  offset[unit] + j, offset = exclusive cumsum of the units' image-token counts.
  """
  is_img = ids_units == image_token_id                                      # [B, K, L]
  per_unit = jnp.sum(is_img[:, 0], axis=-1)                                 # [B]
  offset = jnp.cumsum(per_unit) - per_unit
  src = offset[:, None, None] + jnp.cumsum(is_img, axis=-1) - 1
  return jnp.where(is_img, src, 0).astype(jnp.int32)


def gather_image_embeds(feats: jax.Array, ids: jax.Array, src: jax.Array, image_token_id: int,
                        max_tokens: int) -> jax.Array:
  """Image features in the order the model's `embed` consumes them: the k-th <|image_pad|> of the
  rows [R, L] (row-major) gets feats[src at that token]. Returns [K, D], K = min(R·L, max_tokens)."""
  flat = ids.reshape(-1) == image_token_id
  k = min(flat.shape[0], max_tokens)
  (positions,) = jnp.nonzero(flat, size=k, fill_value=0)
  return jnp.take(feats, src.reshape(-1)[positions], axis=0)


def prepare_rows(batch: Mapping[str, jax.Array], copies: int, row_groups: int, micro_batches: int,
                 image_token_id: int) -> dict[str, jax.Array]:
  """Row arrays → [M, R/M, ...] micro-batches in pair-major order (+ "image_src"); position_ids
  become [M, 3, R/M, L]; per-unit arrays (PAIR_KEYS) [M, B/M]."""
  out: dict[str, jax.Array] = {}
  units = {k: to_units(batch[k], copies, row_groups) for k in ROW_KEYS}
  units["position_ids"] = to_units(jnp.moveaxis(batch["position_ids"], 1, 0), copies, row_groups)
  if "pixel_values" in batch:
    units["image_src"] = image_sources(units["input_ids"], image_token_id)
  for k, x in units.items():
    x = micro_split(x, micro_batches)                                        # [M, B/M, K, ...]
    out[k] = x.reshape(micro_batches, -1, *x.shape[3:])                      # [M, R/M, ...]
  out["position_ids"] = jnp.moveaxis(out["position_ids"], 2, 1)              # [M, 3, R/M, L]
  for k in PAIR_KEYS:
    if k in batch:
      out[k] = micro_split(batch[k].reshape(-1), micro_batches)
  return out


def constrain(mbs: dict[str, jax.Array], mesh: Mesh | None) -> dict[str, jax.Array]:
  """Keeps micro-batch rows split over the batch axes after the reordering (a hint to GSPMD)."""
  if mesh is None:
    return mbs

  def one(k, x):
    dim = 2 if k == "position_ids" else 1
    spec = mesh_lib.batch_partition_spec(x.shape, mesh, dim)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return {k: one(k, x) for k, x in mbs.items()}


# ------------------------------------------------------------------------------ the forward pass

@dataclasses.dataclass(frozen=True)
class Forward:
  """Runs the text decoder on a micro-batch and returns completion token log-probs."""

  model: Qwen2_5_VL
  chunk_size: int
  share_prompt: bool = False
  """Pack a unit's copies into one row [prompt | completion_0 | completion_1 | ...] (`pack_units`)
  so the shared prompt (and its image tokens) runs once; the log-probs are those of the separate
  rows up to float rounding. Needs copies > 1 and a prompt; ignored otherwise."""

  def encode_images(self, visual_params: PyTree, batch: Mapping[str, Any]) -> jax.Array:
    vision = {k: batch["vision"][k] for k in VISION_META_KEYS}
    return self.model.apply({"params": {"visual": visual_params}}, batch["pixel_values"], vision,
                            method="encode_images")

  def token_logps(self, params: PyTree, mb: Mapping[str, jax.Array], feats: jax.Array | None,
                  prompt_len: int, copies: int) -> tuple[jax.Array, jax.Array]:
    """→ (token log-probs [R, T], completion mask [R, T]) over T = L - max(P-1, 0) - 1 columns."""
    if self.share_prompt and copies > 1 and prompt_len > 0:
      return self._packed_token_logps(params, mb, feats, prompt_len, copies)
    cfg = self.model.config
    ids = mb["input_ids"]
    embeds = None
    if feats is not None:
      embeds = gather_image_embeds(feats, ids, mb["image_src"], cfg.image_token_id, copies * feats.shape[0])
    hidden = self.model.apply({"params": params}, ids, mb["attention_mask"], position_ids=mb["position_ids"],
                              image_embeds=embeds, method="hidden_states")           # [R, L, D]
    start = max(prompt_len - 1, 0)
    targets = ids[:, start + 1:]
    logps = token_logprobs_from_hidden(hidden[:, start:-1], lm_head_kernel(params, cfg), targets,
                                       chunk_size=self.chunk_size)
    return logps, mb["completion_mask"][:, start + 1:]

  def _packed_token_logps(self, params, mb, feats, prompt_len: int, copies: int):
    """`token_logps` with the copies of a unit packed into one row (`pack_units`). The first token
    of every completion is predicted by the prompt's last position; token j > 0 of copy k by the
    position before it in copy k's block. Same [R, C] outputs, unit-major, as the unpacked path."""
    if self.model.config.attention_impl == "splash":
      raise ValueError("share_prompt needs a dense-mask attention (xla, dot_product, cudnn), not splash")
    cfg = self.model.config
    p = prompt_len
    packed = pack_units(mb, p, copies)
    embeds = None
    if feats is not None:
      embeds = gather_image_embeds(feats, packed["input_ids"], packed["image_src"], cfg.image_token_id,
                                   feats.shape[0])
    hidden = self.model.apply({"params": params}, packed["input_ids"], packed["attention_mask"],
                              position_ids=packed["position_ids"], image_embeds=embeds,
                              packing=(p, copies), method="hidden_states")          # [U, P + K·C, D]
    predictors = packed_predictors(hidden, p, copies)
    targets = mb["input_ids"][:, p:]
    logps = token_logprobs_from_hidden(predictors, lm_head_kernel(params, cfg), targets, chunk_size=self.chunk_size)
    return logps, mb["completion_mask"][:, p:]


def pack_units(mb: Mapping[str, jax.Array], prompt_len: int, copies: int) -> dict[str, jax.Array]:
  """Unit-major rows [U·K, P + C] whose K copies share the prompt (columns < P) → one row per unit,
  [U, P + K·C]: the prompt once, then each copy's completion. Every completion keeps its own
  position ids (each continues from the prompt), and no copy attends to another: the model
  runs the rows with `packing=(P, K)` (`text.PackedMask`); `branch_ids` (0 prompt, k + 1 copy k)
  describe the same mask densely (`text.causal_mask(..., branch_ids)`). Each copy sees exactly the
  tokens its own row had. "image_src" (if present) is the prompt's: completions hold no image tokens."""
  p = prompt_len
  unit = lambda x: x.reshape(x.shape[0] // copies, copies, *x.shape[1:])  # noqa: E731

  def pack(x):  # [R, L] → [U, P + K·C]
    u = unit(x)
    return jnp.concatenate([u[:, 0, :p], u[:, :, p:].reshape(u.shape[0], -1)], axis=1)

  out = {k: pack(mb[k]) for k in ("input_ids", "attention_mask")}
  pos = mb["position_ids"]                                                      # [3, R, L]
  pos_u = pos.reshape(3, pos.shape[1] // copies, copies, pos.shape[2])
  out["position_ids"] = jnp.concatenate([pos_u[:, :, 0, :p], pos_u[:, :, :, p:].reshape(3, pos_u.shape[1], -1)],
                                        axis=2)
  if "image_src" in mb:
    src = unit(mb["image_src"])[:, 0, :p]
    out["image_src"] = jnp.pad(src, ((0, 0), (0, out["input_ids"].shape[1] - p)))
  c = mb["input_ids"].shape[1] - p
  branch = jnp.concatenate([jnp.zeros((p,), jnp.int32), jnp.repeat(jnp.arange(1, copies + 1, dtype=jnp.int32), c)])
  out["branch_ids"] = jnp.broadcast_to(branch, out["input_ids"].shape)
  return out


def packed_predictors(hidden: jax.Array, prompt_len: int, copies: int) -> jax.Array:
  """Hidden states of `pack_units` rows [U, P + K·C, D] → the states that predict each copy's
  completion tokens, [U·K, C, D] unit-major: token 0 of every copy is predicted by the prompt's
  last position, token j > 0 of copy k by the position before it in copy k's block."""
  u, d = hidden.shape[0], hidden.shape[-1]
  p = prompt_len
  c = (hidden.shape[1] - p) // copies
  last_prompt = hidden[:, p - 1:p]                                                 # [U, 1, D]
  blocks = hidden[:, p:].reshape(u, copies, c, d)
  return jnp.concatenate([jnp.broadcast_to(last_prompt[:, None], (u, copies, 1, d)), blocks[:, :, :-1]],
                         axis=2).reshape(u * copies, c, d)


def check_shared_prompts(batch: Mapping[str, Any], prompt_len: int, copies: int, row_groups: int) -> None:
  """Host-side check for `pack_units`: every copy of a unit has the same prompt columns (ids, mask,
  positions), as `batches.collate_dpo` builds them. Raises ValueError naming the first unit that
  differs (packing would silently give it the first copy's prompt). Skipped for arrays this process
  cannot read whole (a multi-host global batch: each host checked its own rows when collating)."""
  import numpy as np

  arrays = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in arrays.values()):
    return
  for key, x in arrays.items():
    x = np.asarray(x)
    if key == "position_ids":
      x = np.moveaxis(x, 0, 1)                                          # [R, 3, L]
    b = x.shape[0] // (row_groups * copies)
    units = x.reshape(row_groups, copies, b, *x.shape[1:])[..., :prompt_len]
    diff = np.any(units != units[:, :1], axis=tuple(range(3, units.ndim)))   # [G, copies, b]
    if diff.any():
      g, c, i = (int(v[0]) for v in np.nonzero(diff))
      raise ValueError(f"share_prompt: unit {g * b + i} (group {g}, pair {i}) has a different prompt in copy {c} "
                       f"({key} differs in the first {prompt_len} columns); build DPO batches with "
                       f"batches.collate_dpo or pass share_prompt=False")


def select_batch(batch: Mapping[str, Any], keys: Sequence[str]) -> tuple[dict[str, Any], int]:
  """The arrays a step uses (a fixed key set, so extra keys never cause recompiles) + prompt_len."""
  missing = [k for k in (*ROW_KEYS, "position_ids") if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing} (build it with training.batches)")
  out = {k: batch[k] for k in (*ROW_KEYS, "position_ids", *keys) if k in batch}
  if "pixel_values" in batch:
    if "vision" not in batch:
      raise ValueError("batch has pixel_values but no vision metadata")
    out["pixel_values"] = batch["pixel_values"]
    out["vision"] = {k: batch["vision"][k] for k in VISION_META_KEYS}
  return out, int(batch.get("prompt_len", 0))
