"""Qwen-style tokenizers: the special tokens, the chat template, and a small BPE trainer.

Real runs load the released Qwen2.5-VL tokenizer from a local HF directory
(`transformers.AutoTokenizer.from_pretrained(dir)`). The demo and the tests need a tokenizer
without any download, so `build_tokenizer` trains a byte-level BPE on a text corpus and gives it
the Qwen special tokens and a chat template that renders exactly as Qwen2.5-VL's does for
text + image messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# Order matters: BpeTrainer puts special tokens first, so these get ids 0..len-1 in a built tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL's template, restricted to what we use (system/user/assistant turns, text, image and
# video parts). A first non-system message gets the default system prompt, as in Qwen's template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    + DEFAULT_SYSTEM_PROMPT
    + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, out_dir: str | os.PathLike | None = None):
  """Trains a byte-level BPE with the Qwen special tokens and chat template.

  Args:
    corpus: training text lines.
    vocab_size: total vocabulary size including the special tokens (ids 0..6).
    out_dir: if given, the tokenizer is saved there (tokenizer.json, tokenizer_config.json,
      chat_template.jinja) and loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
  Returns:
    a `transformers` fast tokenizer; `eos_token` is `<|im_end|>`, `pad_token` `<|endoftext|>`.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  if vocab_size < len(SPECIAL_TOKENS) + 256:
    raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + byte alphabet), got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(corpus, trainer)
  hf = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token=None,
      eos_token=EOS_TOKEN,
      pad_token=PAD_TOKEN,
      additional_special_tokens=list(SPECIAL_TOKENS[1:]),
      chat_template=CHAT_TEMPLATE,
  )
  if out_dir is not None:
    hf.save_pretrained(os.fspath(out_dir))
  return hf


def special_token_ids(tokenizer) -> dict[str, int]:
  """Ids of the Qwen special tokens in `tokenizer` (works for the real and the built tokenizers)."""
  ids = {}
  for name in SPECIAL_TOKENS:
    i = tokenizer.convert_tokens_to_ids(name)
    if i is None or i == tokenizer.unk_token_id:
      raise ValueError(f"tokenizer has no special token {name!r}")
    ids[name] = int(i)
  return ids
