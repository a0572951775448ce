"""Sampling k responses per prompt: the default sampler over `sampling.generate`, and the hook type.

`build_pairs` calls a `SampleFn` `(model_name, prompts, k, rng) -> list[list[str]]` (k texts per prompt,
in prompt order; model_name is "policy", "base" or "teacher"); without one it uses `ModelSampler`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from specs_jax import sampling
from specs_jax.data.types import Example
from specs_jax.distill.config import DistillConfig
from specs_jax.processing import batching, chat
from specs_jax.processing import image as image_lib
from specs_jax.processing.tokenizer import EOS_TOKEN

__all__ = ["ModelSampler", "SampleFn", "load_teacher"]

SampleFn = Callable[[str, Sequence[Example], int, jax.Array], list[list[str]]]


@dataclasses.dataclass(frozen=True)
class _Entry:
  model: Any
  params: Any
  tokenizer: Any
  image: image_lib.ImageConfig


class ModelSampler:
  """The default `sample_fn`: `sampling.generate` over batches of prompts, k samples per prompt.

  Call as `sampler(model_name, prompts, k, rng, temperature=t)` -> k response texts per prompt. A batch
  smaller than `config.batch_size` is padded with copies of its last prompt (outputs discarded), so the
  jitted sampler sees one batch shape per bucket.
  """

  def __init__(self, models: Mapping[str, tuple], tokenizer, config: DistillConfig):
    """models: name -> (model, params) or (model, params, tokenizer[, ImageConfig])."""
    self.config = config
    self.entries: dict[str, _Entry] = {}
    for name, spec in models.items():
      model, params, *rest = spec
      tok = rest[0] if rest and rest[0] is not None else tokenizer
      img = rest[1] if len(rest) > 1 and rest[1] is not None else (config.image or image_lib.ImageConfig())
      if tok is None:
        raise ValueError(f"model {name!r} needs a tokenizer")
      self.entries[name] = _Entry(model, params, tok, img)

  def __call__(self, model_name: str, prompts: Sequence[Example], k: int, rng: jax.Array, *,
               temperature: float = 1.0) -> list[list[str]]:
    """k sampled responses for each of P prompts (P <= batch_size), decoded and cut at `<|im_end|>`.

    Args:
      model_name: a key of the `models` given at construction.
      prompts: P examples (messages with image parts, and their images).
      k: samples per prompt (the sampler copies each prompt's KV cache k times).
      rng: jax key; temperature: 0 is greedy.
    Returns:
      P lists of k strings, in prompt order.
    """
    if model_name not in self.entries:
      raise KeyError(f"no model {model_name!r} to sample; have {sorted(self.entries)}")
    e = self.entries[model_name]
    encoded = [chat.encode_prompt(e.tokenizer, ex.messages, ex.load_images(), e.image) for ex in prompts]
    n_real = len(encoded)
    encoded += [encoded[-1]] * (max(self.config.batch_size, n_real) - n_real)
    pad_id = e.tokenizer.pad_token_id if e.tokenizer.pad_token_id is not None else 0
    batch = batching.collate_prompts(encoded, pad_id, sampling.sampler.DEFAULT_PROMPT_BUCKETS,
                                     sampling.sampler.DEFAULT_PATCH_BUCKETS)
    has_images = batch["image_grid_thw"].shape[0] > 0
    # The sampler pads patches to its own buckets and wants the real rows only.
    out = sampling.generate(
        e.model, e.params, batch["input_ids"], batch["attention_mask"],
        pixel_values=batch["pixel_values"][batch["patch_valid"]] if has_images else None,
        image_grid_thw=batch["image_grid_thw"] if has_images else None,
        max_new_tokens=self.config.max_new_tokens, temperature=temperature, top_p=self.config.top_p,
        top_k=self.config.top_k, eos_token_id=e.tokenizer.convert_tokens_to_ids(EOS_TOKEN), pad_token_id=pad_id,
        rng=rng, n=k)
    texts = sampling.decode_responses(e.tokenizer, out)
    return [texts[i * k:(i + 1) * k] for i in range(n_real)]   # rows are prompt-major


def load_teacher(config: DistillConfig) -> tuple:
  """(model, params, tokenizer, ImageConfig | None) of the HF directory `config.teacher_dir`."""
  if not config.teacher_dir:
    raise ValueError("chosen_source='teacher' needs teacher=(model, params[, tokenizer]) or DistillConfig.teacher_dir")
  from transformers import AutoTokenizer

  from specs_jax.models import qwen2_5_vl
  model, params = qwen2_5_vl.from_pretrained(config.teacher_dir)
  tok = AutoTokenizer.from_pretrained(config.teacher_dir)
  pre = os.path.join(config.teacher_dir, "preprocessor_config.json")
  img = image_lib.ImageConfig.from_preprocessor_config(pre) if os.path.exists(pre) else None
  return model, params, tok, img
