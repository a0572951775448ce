"""Qwen2_5_VL: vision tower + text decoder + LM head, as one flax.linen Module.

    model, params = qwen2_5_vl.from_pretrained(hf_dir)
    logits = model.apply({"params": params}, input_ids, attention_mask,
                         pixel_values=pv, image_grid_thw=thw)             # [B, L, V]

Eager calls (concrete numpy/jax arrays) compute the M-RoPE positions and the vision metadata on
the host from `image_grid_thw`. Inside `jit` pass them precomputed (`prepare_inputs`):

    inputs = qwen2_5_vl.prepare_inputs(model.config, ids, mask, thw, num_patches=bucket)
    logits = jax.jit(model.apply)({"params": params}, ids, mask, pixel_values=pv_padded,
                                  position_ids=inputs.position_ids, vision=inputs.vision)

Other entry points (`method=`): `hidden_states` (final-norm hidden states, for chunked log-probs),
`logits_from_hidden`, `encode_images`, and `extend` (KV-cache prefill / decode for the sampler).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from specs_jax.models.qwen2_5_vl.rope import (get_rope_index, pack_pixel_values, slot_size_for, text_positions,
                                              vision_metadata)
from specs_jax.models.qwen2_5_vl.text import TextModel
from specs_jax.models.qwen2_5_vl.vision import VisionTransformer


@dataclasses.dataclass(frozen=True)
class PreparedInputs:
  """Host-computed, static-shape inputs for a jitted forward."""

  position_ids: np.ndarray  # [3, B, L] int32
  rope_deltas: np.ndarray  # [B] int32
  vision: dict[str, np.ndarray] | None  # VisionMeta fields; None without images
  pixel_values: np.ndarray | None = None  # packed into the slot layout when pixel_values were given


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def check_image_tokens(config: Qwen2_5_VLConfig, input_ids, attention_mask, image_grid_thw) -> None:
  """Raises ValueError when the number of <|image_pad|> tokens differs from what the grids need."""
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  have = int(((ids == config.image_token_id) & mask).sum())
  grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
  need = int(np.prod(grids, axis=-1).sum()) // config.vision.spatial_merge_size**2
  if have != need:
    per_sample = ((ids == config.image_token_id) & mask).sum(-1).tolist()
    raise ValueError(f"image token count mismatch: the prompts hold {have} <|image_pad|> tokens "
                     f"(per sample {per_sample}) but image_grid_thw {grids.tolist()} gives {need} image features")


def prepare_inputs(config: Qwen2_5_VLConfig, input_ids, attention_mask, image_grid_thw=None,
                   num_patches: int | None = None, *, slot_size: int | None = None, num_slots: int | None = None,
                   pixel_values=None) -> PreparedInputs:
  """Positions, rope deltas and vision metadata for a batch (numpy, host side).

  Vision layout: with `slot_size` (patches per image slot; "auto" = the largest image) each image
  gets its own attention block; `num_slots` pads the image count to a bucket. Without it, all
  patches form one block of `num_patches` (exact but O(P²) across the batch). When `pixel_values`
  (concatenated, as HF's processor gives) are passed, they are returned packed in that layout.
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  check_image_tokens(config, ids, mask, image_grid_thw)
  has_images = image_grid_thw is not None and np.asarray(image_grid_thw).size > 0
  packed = None
  if has_images:
    pos, deltas = get_rope_index(config, ids, mask, image_grid_thw)
    if slot_size == "auto":
      slot_size = slot_size_for(image_grid_thw)
    meta = vision_metadata(config.vision, image_grid_thw, num_patches, slot_size=slot_size,
                           num_slots=num_slots).as_dict()
    if pixel_values is not None:
      packed = pack_pixel_values(pixel_values, image_grid_thw, slot_size, num_slots, num_patches)
  else:
    pos, deltas = text_positions(mask), np.zeros((ids.shape[0],), np.int32)
    meta = None
  return PreparedInputs(position_ids=pos, rope_deltas=deltas, vision=meta, pixel_values=packed)


class Qwen2_5_VL(nn.Module):
  config: Qwen2_5_VLConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual = VisionTransformer(self.config, name="visual", **kw)
    self.model = TextModel(self.config, name="model", **kw)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(self.config.text.vocab_size, use_bias=False, name="lm_head",
                              kernel_init=nn.initializers.normal(0.02), **kw)

  # ------------------------------------------------------------------ pieces

  def encode_images(self, pixel_values, vision):
    """pixel_values [S*Q, 1176] in the slot layout + vision metadata → image token embeddings
    [S*Q/m², D], in prompt order (padding rows at the end)."""
    merged = self.visual(pixel_values, vision["pos_h"], vision["pos_w"], vision["window_seg"], vision["full_seg"])
    return jnp.take(merged, vision["token_index"], axis=0)

  def logits_from_hidden(self, hidden):
    if self.config.tie_word_embeddings:
      return self.model.attend(hidden)
    return self.lm_head(hidden)

  def embed(self, input_ids, pixel_values=None, vision=None, image_embeds=None):
    """Token embeddings with image features scattered into the <|image_pad|> positions (in order,
    row-major over the batch). `image_embeds` [M, D] may be given instead of pixel_values."""
    x = self.model.embed(input_ids)
    if image_embeds is None and pixel_values is not None:
      image_embeds = self.encode_images(pixel_values, vision)
    if image_embeds is None:
      return x
    is_img = input_ids == self.config.image_token_id
    idx = jnp.cumsum(is_img.reshape(-1)) - 1
    idx = jnp.clip(idx, 0, image_embeds.shape[0] - 1).reshape(input_ids.shape)
    feats = jnp.take(image_embeds.astype(x.dtype), idx, axis=0)
    return jnp.where(is_img[..., None], feats, x)

  def _prepare(self, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision):
    """Host-side preparation for eager calls; returns (position_ids, pixel_values, vision)."""
    if position_ids is None or (pixel_values is not None and vision is None):
      if not _is_concrete(input_ids, attention_mask, image_grid_thw, pixel_values):
        raise ValueError("inside jit, pass position_ids (and vision= for images) from qwen2_5_vl.prepare_inputs")
      if pixel_values is not None and image_grid_thw is None:
        raise ValueError("pixel_values given without image_grid_thw")
      if pixel_values is not None and vision is None:
        # Eager: concatenated patches (as HF's processor gives) → one slot per image.
        prep = prepare_inputs(self.config, input_ids, attention_mask, image_grid_thw, slot_size="auto",
                              pixel_values=np.asarray(pixel_values))
        pixel_values, vision = jnp.asarray(prep.pixel_values), prep.vision
      else:
        prep = prepare_inputs(self.config, input_ids, attention_mask, None)
      position_ids = prep.position_ids if position_ids is None else position_ids
    return jnp.asarray(position_ids), pixel_values, vision

  # ------------------------------------------------------------------ forwards

  def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                    position_ids=None, vision=None, image_embeds=None, packing=None):
    """Final-norm hidden states [B, L, D] (no LM head). `packing` = (prompt_len, copies): rows are
    [prompt | copy 1 | ... | copy K] with each copy seeing the prompt and itself only
    (`text.PackedMask`); the caller gives every copy its positions in `position_ids`."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    position_ids, pixel_values, vision = self._prepare(
        input_ids, attention_mask, pixel_values if image_embeds is None else None, image_grid_thw, position_ids, vision)
    x = self.embed(input_ids, pixel_values, vision, image_embeds)
    hidden, _ = self.model(x, position_ids, attention_mask, packing=packing)
    return hidden

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
               position_ids=None, vision=None, image_embeds=None):
    """Logits [B, L, V] in the compute dtype."""
    hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                position_ids=position_ids, vision=vision, image_embeds=image_embeds)
    return self.logits_from_hidden(hidden)

  def extend(self, input_ids, position_ids, kv_mask, cache, cache_index, *, image_embeds=None,
             pixel_values=None, vision=None, last_only: bool = True):
    """Runs S new tokens against a KV cache (prefill when cache_index = 0, decode when S = 1).

    Args:
      input_ids [B, S]; position_ids [3, B, S]; kv_mask [B, T] over cache slots (1 = real token,
      must already include the S new slots); cache from `text.init_cache`; cache_index: int scalar,
      slot of the first new token.
    Returns:
      (logits [B, V] at the last new position if last_only else [B, S, V], updated cache).
    """
    x = self.embed(input_ids, pixel_values, vision, image_embeds)
    hidden, cache = self.model(x, position_ids, kv_mask, cache, cache_index)
    if last_only:
      hidden = hidden[:, -1]
    return self.logits_from_hidden(hidden), cache


def lm_head_kernel(params, config: Qwen2_5_VLConfig):
  """The [D, V] output projection (the embedding transposed when tied)."""
  if config.tie_word_embeddings:
    return params["model"]["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]
