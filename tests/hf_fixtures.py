"""Builders for offline HF fixtures: tokenizer, image processor, tiny random Qwen2.5-VL models.

Used by conftest.py; tests never download anything. The tiny models are the real architecture
(window attention with full-attention blocks, M-RoPE, merger, GQA), only small.
"""

from __future__ import annotations

import os

import numpy as np

from specs_jax.processing.tokenizer import build_tokenizer

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 64
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

_WORDS = (
    "how many red blue green circles squares triangles are there in the image count objects answer "
    "think reasoning the is a of and to what which larger smaller left right above below sum digits "
    "area length width height yes no option choose A B C D number total first then so therefore "
    "<think> </think> <answer> </answer> boxed The answer is $\\boxed{ } 0 1 2 3 4 5 6 7 8 9 + - = . , ?"
).split()


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=int(rng.integers(5, 25)))) for _ in range(n)]


def build_image_processor():
  from transformers import Qwen2VLImageProcessorPil

  return Qwen2VLImageProcessorPil(
      do_resize=True, patch_size=14, temporal_patch_size=2, merge_size=2,
      size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
      image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
  )


def tiny_config_dict(vocab_size: int, *, depth: int = 2, fullatt=(1,), tie: bool = False,
                     text_layers: int = 2, special_ids: dict | None = None) -> dict:
  """A tiny Qwen2.5-VL config in transformers-5 layout."""
  s = special_ids or {}
  return dict(
      text_config=dict(
          hidden_size=64, num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=128, vocab_size=vocab_size, rms_norm_eps=1e-6, max_position_embeddings=4096,
          rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
          bos_token_id=None, eos_token_id=s.get("<|im_end|>", 2), pad_token_id=s.get("<|endoftext|>", 0),
          tie_word_embeddings=tie,
      ),
      vision_config=dict(
          depth=depth, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
          fullatt_block_indexes=list(fullatt), window_size=112, patch_size=14, spatial_merge_size=2,
          temporal_patch_size=2, tokens_per_second=2, in_channels=3,
      ),
      image_token_id=s.get("<|image_pad|>", 5), video_token_id=s.get("<|video_pad|>", 6),
      vision_start_token_id=s.get("<|vision_start|>", 3), vision_end_token_id=s.get("<|vision_end|>", 4),
      tie_word_embeddings=tie,
  )


def build_hf_model(config_dict: dict, seed: int = 0, std: float = 0.2):
  """A random `Qwen2_5_VLForConditionalGeneration` in float32, weights with a larger std than HF's
  default so that logits are not near-uniform (parity tests then mean something)."""
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(seed)
  cfg = Qwen2_5_VLConfig(**config_dict)
  model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm" in name or name.endswith(
          "norm.weight") or name.endswith("ln_q.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(std * torch.randn(p.shape, generator=g))
  return model


def build_hf_dir(out_dir: str | os.PathLike, *, seed: int = 0, **config_kwargs) -> str:
  """Writes a complete offline HF directory: tokenizer, preprocessor config, tiny model."""
  out_dir = os.fspath(out_dir)
  tok = build_tokenizer(tokenizer_corpus(), vocab_size=1024, out_dir=out_dir)
  build_image_processor().save_pretrained(out_dir)
  from specs_jax.processing.tokenizer import special_token_ids

  cfg = tiny_config_dict(len(tok), special_ids=special_token_ids(tok), **config_kwargs)
  model = build_hf_model(cfg, seed=seed)
  model.save_pretrained(out_dir)
  return out_dir
