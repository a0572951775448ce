"""Builds multimodal model inputs the way HF's processor would (reference side of the parity tests)."""

from __future__ import annotations

import numpy as np


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def hf_batch(tokenizer, image_processor, samples, pad_left: bool = True):
  """samples: list of (text with '<image>' markers, [images]). Returns numpy dict like HF's processor:
  input_ids [B, L], attention_mask, mm_token_type_ids, pixel_values [P, 1176], image_grid_thw [n, 3]."""
  texts, all_images = [], []
  for text, images in samples:
    msg_content = []
    parts = text.split("<image>")
    for i, part in enumerate(parts):
      if part:
        msg_content.append({"type": "text", "text": part})
      if i < len(parts) - 1:
        msg_content.append({"type": "image"})
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": msg_content}], tokenize=False,
                                           add_generation_prompt=True)
    if images:
      out = image_processor(images=images, return_tensors="np")
      thw = out["image_grid_thw"]
      pieces = prompt.split("<|image_pad|>")
      assert len(pieces) == len(images) + 1
      prompt = pieces[0]
      for g, rest in zip(thw, pieces[1:]):
        prompt += "<|image_pad|>" * (int(np.prod(g)) // 4) + rest
      all_images.extend(images)
    texts.append(prompt)
  encs = [tokenizer(t)["input_ids"] for t in texts]
  length = max(len(e) for e in encs)
  pad = tokenizer.pad_token_id
  ids = np.full((len(encs), length), pad, np.int64)
  mask = np.zeros((len(encs), length), np.int64)
  for i, e in enumerate(encs):
    if pad_left:
      ids[i, length - len(e):] = e
      mask[i, length - len(e):] = 1
    else:
      ids[i, :len(e)] = e
      mask[i, :len(e)] = 1
  image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_id).astype(np.int64)}
  if all_images:
    ii = image_processor(images=all_images, return_tensors="np")
    out["pixel_values"] = ii["pixel_values"].astype(np.float32)
    out["image_grid_thw"] = ii["image_grid_thw"].astype(np.int64)
  return out


def hf_logits(hf_model, batch) -> np.ndarray:
  import torch

  kw = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  with torch.no_grad():
    return hf_model(**kw).logits.float().numpy()
