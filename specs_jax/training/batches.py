"""Host-side collation of preference pairs (DPO) and SFT examples into static-shape batches.

Numpy only (no jax): this runs in the input pipeline. The jitted steps in `steps.py` consume the
dicts built here.

DPO batch for B pairs (padded to `num_pairs` with weight-0 pairs), L = P + C:

  input_ids        [2B, L] int32   rows [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}];
                                   prompt left-padded to P, completion right-padded to C
  attention_mask   [2B, L] int32   1 on prompt and completion tokens
  completion_mask  [2B, L] int32   1 on completion tokens (incl. <|im_end|>), columns P..
  position_ids     [3, 2B, L] int32  M-RoPE positions (chosen and rejected rows share the prompt's)
  pixel_values     [S·Q, 1176] float32  each pair's images ONCE, in pair order, in the model's slot
                                   layout: S image slots (bucketed image count) of Q patches
                                   (bucketed size of the largest image); absent for text-only batches
  vision           `qwen2_5_vl.vision_metadata(..., slot_size=Q, num_slots=S)` of the pairs' images:
                                   pos_h / pos_w / window_seg / full_seg / valid [S, Q],
                                   token_index [S·Q/m²]
  ref_chosen_logps, ref_rejected_logps  [B] float32  summed reference log-probs (0 if not given)
  pair_weight      [B] float32     1 for real pairs, 0 for padding
  prompt_len       int             P, a Python int: the step only runs the LM head on columns
                                   P-1 .. L-2 (the positions that predict completion tokens)

The images are not duplicated for the rejected rows: the step encodes each image once and gives
the features to both rows of its pair (see `steps.py`), so the vision tower runs on B prompts, not 2B.

SFT batch for B examples: the same keys without the pair entries, rows [example_0 .. example_{B-1}].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from specs_jax.models.qwen2_5_vl.rope import (get_rope_index, pack_pixel_values, slot_size_for, text_positions,
                                             vision_metadata)
from specs_jax.processing import chat
from specs_jax.processing import image as image_lib
from specs_jax.processing.batching import Buckets, pack_prompt_completion

__all__ = [
    "BatchBuckets",
    "EncodedExample",
    "EncodedPair",
    "build_dpo_batch",
    "build_sft_batch",
    "collate_dpo",
    "collate_sft",
    "encode_pair",
    "encode_sft_example",
]


DEFAULT_PATCH_BUCKETS = tuple(2**i for i in range(4, 17))      # patches per image slot (as the sampler)
DEFAULT_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)   # image slots per batch


@dataclasses.dataclass(frozen=True)
class BatchBuckets:
  """Static sizes: prompt length P, completion length C, patches per image slot Q (the largest
  image of the batch must fit; a multiple of merge_size²) and image slots per batch S."""

  prompt: Buckets
  completion: Buckets
  patches: Buckets = Buckets(DEFAULT_PATCH_BUCKETS)
  images: Buckets = Buckets(DEFAULT_IMAGE_BUCKETS)

  @classmethod
  def make(cls, prompt: Sequence[int] | int, completion: Sequence[int] | int,
           patches: Sequence[int] | int = DEFAULT_PATCH_BUCKETS,
           images: Sequence[int] | int = DEFAULT_IMAGE_BUCKETS) -> "BatchBuckets":
    as_b = lambda v: Buckets((v,)) if isinstance(v, int) else Buckets(tuple(v))
    return cls(as_b(prompt), as_b(completion), as_b(patches), as_b(images))


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPair:
  """One tokenized preference pair. Reference log-probs are None until the reference pass ran."""

  prompt: chat.EncodedPrompt
  chosen_ids: np.ndarray          # [c_w] int32, ends with <|im_end|>
  rejected_ids: np.ndarray        # [c_l] int32
  ref_chosen_logps: float | None = None
  ref_rejected_logps: float | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedExample:
  """One tokenized SFT example (prompt + target response)."""

  prompt: chat.EncodedPrompt
  response_ids: np.ndarray        # [c] int32, ends with <|im_end|>


# ------------------------------------------------------------------------------------ encoding

def _field(item: Any, name: str, default: Any = None) -> Any:
  if isinstance(item, Mapping):
    return item.get(name, default)
  if hasattr(item, name):
    return getattr(item, name)
  meta = getattr(item, "meta", None)
  return meta.get(name, default) if isinstance(meta, Mapping) else default


def _images(item: Any) -> list[Any]:
  out = []
  for im in _field(item, "images", None) or []:
    if not isinstance(im, (Image.Image, np.ndarray)) and callable(getattr(im, "load", None)):
      im = im.load()             # a lazy reference (data.types.ImageRef)
    out.append(im)
  return out


def _encode_prompt(tokenizer, item: Any, image_config: image_lib.ImageConfig | None,
                   system_prompt: str | None) -> chat.EncodedPrompt:
  messages = _field(item, "messages", None)
  if messages is None:
    messages = _field(item, "prompt", None)
  if messages is None:
    raise ValueError("an example needs 'messages' (chat messages) or 'prompt' (a question string)")
  return chat.encode_prompt(tokenizer, messages, _images(item), image_config, system_prompt=system_prompt)


def encode_pair(tokenizer, pair: Any, image_config: image_lib.ImageConfig | None = None,
                system_prompt: str | None = None) -> EncodedPair:
  """Tokenizes a pair: a mapping (or object, e.g. `data.types.PreferencePair`) with "messages" or
  "prompt", "images" (PIL images or lazy references), "chosen", "rejected", and optionally
  "ref_chosen_logps" / "ref_rejected_logps" (directly or in `.meta`)."""
  prompt = _encode_prompt(tokenizer, pair, image_config, system_prompt)
  rc, rr = _field(pair, "ref_chosen_logps"), _field(pair, "ref_rejected_logps")
  return EncodedPair(prompt=prompt,
                     chosen_ids=chat.encode_response(tokenizer, _field(pair, "chosen")),
                     rejected_ids=chat.encode_response(tokenizer, _field(pair, "rejected")),
                     ref_chosen_logps=None if rc is None else float(rc),
                     ref_rejected_logps=None if rr is None else float(rr))


def encode_sft_example(tokenizer, example: Any, image_config: image_lib.ImageConfig | None = None,
                       system_prompt: str | None = None, response_key: str = "chosen") -> EncodedExample:
  """Tokenizes an SFT example; the target is `example[response_key]` (a pair's "chosen" response by
  default, which makes the SFT cold-start baseline train on exactly the DPO data's chosen side)."""
  response = _field(example, response_key)
  if response is None:
    raise ValueError(f"SFT example has no {response_key!r} response")
  return EncodedExample(prompt=_encode_prompt(tokenizer, example, image_config, system_prompt),
                        response_ids=chat.encode_response(tokenizer, response))


# ----------------------------------------------------------------------------------- collation

def _check_completions(completions: Sequence[np.ndarray], config: Qwen2_5_VLConfig) -> None:
  for i, c in enumerate(completions):
    if np.any(np.asarray(c) == config.image_token_id):
      raise ValueError(f"completion {i} contains the <|image_pad|> token id {config.image_token_id}; "
                       "image tokens may only appear in prompts")


def _vision_inputs(prompts: Sequence[chat.EncodedPrompt], row_prompts: Sequence[chat.EncodedPrompt],
                   packed: dict[str, np.ndarray], config: Qwen2_5_VLConfig, buckets: BatchBuckets) -> dict[str, Any]:
  """position_ids for the rows; pixel_values + vision metadata (slot layout) for the unique `prompts`' images."""
  grids = [np.asarray(p.image_grid_thw, np.int32).reshape(-1, 3) for p in prompts]
  grid = np.concatenate(grids) if grids else np.zeros((0, 3), np.int32)
  out: dict[str, Any] = {}
  if len(grid) == 0:
    out["position_ids"] = text_positions(packed["attention_mask"])
    return out
  row_grid = np.concatenate([np.asarray(p.image_grid_thw, np.int32).reshape(-1, 3) for p in row_prompts])
  out["position_ids"], _ = get_rope_index(config, packed["input_ids"], packed["attention_mask"], row_grid)
  pv = np.concatenate([np.asarray(p.pixel_values, np.float32).reshape(-1, config.vision.patch_dim)
                       for p in prompts])
  slot = buckets.patches(slot_size_for(grid), what="patches of the largest image")
  n_slots = buckets.images(len(grid), what="images in the batch")
  out["pixel_values"] = pack_pixel_values(pv, grid, slot, n_slots)
  out["vision"] = vision_metadata(config.vision, grid, slot_size=slot, num_slots=n_slots).as_dict()
  return out


def _empty_prompt() -> chat.EncodedPrompt:
  return chat.EncodedPrompt(input_ids=np.zeros((0,), np.int32), pixel_values=np.zeros((0, 1176), np.float32),
                            image_grid_thw=np.zeros((0, 3), np.int32), num_image_tokens=np.zeros((0,), np.int32),
                            text="")


def collate_dpo(pairs: Sequence[EncodedPair], config: Qwen2_5_VLConfig, buckets: BatchBuckets, pad_id: int, *,
                num_pairs: int | None = None, require_ref: bool = True) -> dict[str, Any]:
  """Encoded pairs → the DPO batch described in the module docstring.

  Args:
    pairs: B encoded pairs.
    config: the model config (image token id, vision geometry for M-RoPE and window segments).
    buckets: prompt / completion / slot-size / slot-count buckets (the smallest that fit).
    pad_id: the padding token id.
    num_pairs: pad the batch to this many pairs with weight-0 pairs (empty rows), so the row count
      is static too; None means B.
    require_ref: raise if a pair has no reference log-probs (False for the reference pass itself,
      which fills them in).
  Raises:
    OverlongError (from the buckets) for a prompt, completion, image or image count over the largest bucket;
    ValueError for missing reference log-probs or image tokens inside a completion.
  """
  n = len(pairs)
  total = n if num_pairs is None else int(num_pairs)
  if n == 0 or total < n:
    raise ValueError(f"need 1 <= len(pairs) <= num_pairs, got {n} pairs for num_pairs={num_pairs}")
  if require_ref and any(p.ref_chosen_logps is None or p.ref_rejected_logps is None for p in pairs):
    missing = [i for i, p in enumerate(pairs) if p.ref_chosen_logps is None or p.ref_rejected_logps is None]
    raise ValueError(f"pairs {missing[:10]} have no reference log-probs (run the reference pass first)")
  pad = total - n
  prompts = [p.prompt for p in pairs] + [_empty_prompt()] * pad
  chosen = [p.chosen_ids for p in pairs] + [np.zeros((0,), np.int32)] * pad
  rejected = [p.rejected_ids for p in pairs] + [np.zeros((0,), np.int32)] * pad
  _check_completions(chosen + rejected, config)
  p_len = buckets.prompt(max(len(p.input_ids) for p in prompts), what="longest prompt")
  c_len = buckets.completion(max(len(c) for c in chosen + rejected), what="longest completion")
  packed = pack_prompt_completion([p.input_ids for p in prompts] * 2, chosen + rejected, pad_id, p_len, c_len)
  batch: dict[str, Any] = {k: packed[k] for k in ("input_ids", "attention_mask", "completion_mask")}
  batch.update(_vision_inputs(prompts, prompts * 2, packed, config, buckets))
  ref = lambda v: 0.0 if v is None else v
  batch["ref_chosen_logps"] = np.asarray([ref(p.ref_chosen_logps) for p in pairs] + [0.0] * pad, np.float32)
  batch["ref_rejected_logps"] = np.asarray([ref(p.ref_rejected_logps) for p in pairs] + [0.0] * pad, np.float32)
  batch["pair_weight"] = np.asarray([1.0] * n + [0.0] * pad, np.float32)
  batch["prompt_len"] = int(p_len)
  return batch


def collate_sft(examples: Sequence[EncodedExample], config: Qwen2_5_VLConfig, buckets: BatchBuckets, pad_id: int,
                *, num_rows: int | None = None) -> dict[str, Any]:
  """Encoded SFT examples → input_ids / attention_mask / completion_mask [B, L], position_ids,
  pixel_values + vision (if any image), prompt_len; padded to `num_rows` with empty rows (their
  completion mask is 0, so they do not count in either NLL normalisation)."""
  n = len(examples)
  total = n if num_rows is None else int(num_rows)
  if n == 0 or total < n:
    raise ValueError(f"need 1 <= len(examples) <= num_rows, got {n} examples for num_rows={num_rows}")
  pad = total - n
  prompts = [e.prompt for e in examples] + [_empty_prompt()] * pad
  responses = [e.response_ids for e in examples] + [np.zeros((0,), np.int32)] * pad
  _check_completions(responses, config)
  p_len = buckets.prompt(max(len(p.input_ids) for p in prompts), what="longest prompt")
  c_len = buckets.completion(max(len(c) for c in responses), what="longest completion")
  packed = pack_prompt_completion([p.input_ids for p in prompts], responses, pad_id, p_len, c_len)
  batch: dict[str, Any] = {k: packed[k] for k in ("input_ids", "attention_mask", "completion_mask")}
  batch.update(_vision_inputs(prompts, prompts, packed, config, buckets))
  batch["prompt_len"] = int(p_len)
  return batch


def build_dpo_batch(tokenizer, pairs: Sequence[Any], image_config: image_lib.ImageConfig | None,
                    buckets: BatchBuckets, model_config: Qwen2_5_VLConfig, *, num_pairs: int | None = None,
                    require_ref: bool = True, system_prompt: str | None = None) -> dict[str, Any]:
  """`encode_pair` on each pair dict, then `collate_dpo` (pad id: the tokenizer's, else the config's)."""
  encoded = [encode_pair(tokenizer, p, image_config, system_prompt) for p in pairs]
  return collate_dpo(encoded, model_config, buckets, _pad_id(tokenizer, model_config), num_pairs=num_pairs,
                     require_ref=require_ref)


def build_sft_batch(tokenizer, examples: Sequence[Any], image_config: image_lib.ImageConfig | None,
                    buckets: BatchBuckets, model_config: Qwen2_5_VLConfig, *, num_rows: int | None = None,
                    response_key: str = "chosen", system_prompt: str | None = None) -> dict[str, Any]:
  """`encode_sft_example` on each example, then `collate_sft`."""
  encoded = [encode_sft_example(tokenizer, e, image_config, system_prompt, response_key) for e in examples]
  return collate_sft(encoded, model_config, buckets, _pad_id(tokenizer, model_config), num_rows=num_rows)


def _pad_id(tokenizer, config: Qwen2_5_VLConfig) -> int:
  pad = getattr(tokenizer, "pad_token_id", None)
  if pad is None:
    pad = config.pad_token_id
  if pad is None:
    raise ValueError("neither the tokenizer nor the model config defines a pad token id")
  return int(pad)
