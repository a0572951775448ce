"""Chat messages -> Qwen2.5-VL prompt token ids, with one `<|image_pad|>` per merged vision token.

What `Qwen2_5_VLProcessor` does (it cannot be built without torchvision, ENVIRONMENT.md §4), by hand:

  1. render the messages with the tokenizer's chat template; each image part becomes
     `<|vision_start|><|image_pad|><|vision_end|>`, and the generation prompt `<|im_start|>assistant\n`
     is appended;
  2. preprocess the images (`image.preprocess_many`);
  3. replace the i-th `<|image_pad|>` by t_i*h_i*w_i / merge_size**2 copies of itself;
  4. tokenize the expanded text (special tokens are atomic, so each copy is one id).

An assistant turn renders as `<|im_start|>assistant\n{text}<|im_end|>\n`, so the ids of a full
conversation are prompt ids + `encode_response(text)` (text ids + `<|im_end|>`) + the id(s) of the
trailing "\n". That newline is template glue, not model output: generation stops at `<|im_end|>`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from specs_jax.processing import image as image_lib
from specs_jax.processing.tokenizer import EOS_TOKEN, IMAGE_PAD

Message = dict[str, Any]


class ImageCountError(ValueError):
  """The number of image places in a prompt differs from the number of images given."""


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPrompt:
  """One tokenized prompt and its images.

  Attributes:
    input_ids: [L] int32, the prompt ending with the generation prompt `<|im_start|>assistant\\n`;
      image i occupies num_image_tokens[i] consecutive `<|image_pad|>` ids.
    pixel_values: [Np, 1176] float32, all images' patches concatenated (Np = sum of t*h*w; 0 rows
      for a text-only prompt).
    image_grid_thw: [n, 3] int32, (t, h, w) patch grid per image.
    num_image_tokens: [n] int32, t*h*w / merge_size**2 per image.
    text: the rendered prompt before image-token expansion (one `<|image_pad|>` per image).
  """

  input_ids: np.ndarray
  pixel_values: np.ndarray
  image_grid_thw: np.ndarray
  num_image_tokens: np.ndarray
  text: str

  @property
  def num_images(self) -> int:
    return int(self.image_grid_thw.shape[0])


def _is_image_part(part: Any) -> bool:
  # The same test as Qwen2.5-VL's chat template (and tokenizer.CHAT_TEMPLATE).
  return isinstance(part, Mapping) and (part.get("type") == "image" or "image" in part or "image_url" in part)


def _is_video_part(part: Any) -> bool:
  return isinstance(part, Mapping) and (part.get("type") == "video" or "video" in part)


def count_image_parts(messages: Sequence[Message]) -> int:
  """Number of image parts in `messages` (parts the chat template renders as an image place).

  Raises:
    ValueError: for video parts, which this package does not support.
  """
  n = 0
  for message in messages:
    content = message.get("content")
    if isinstance(content, str) or content is None:
      continue
    for part in content:
      if _is_image_part(part):
        n += 1
      elif _is_video_part(part):
        raise ValueError("video parts are not supported; pass video frames as images")
  return n


def build_messages(
    question: str,
    num_images: int,
    system_prompt: str | None = None,
    image_placeholder: str | None = None,
) -> list[Message]:
  """A single-turn conversation: optional system message, then one user message.

  Args:
    question: the user's text.
    num_images: images in the user turn.
    system_prompt: None keeps the chat template's default system prompt ("You are a helpful
      assistant." for Qwen2.5-VL); a string (even "") replaces it.
    image_placeholder: if given (e.g. "<image>", the LLaMA-Factory / ViRL39K convention), the
      question is split at each occurrence and image i goes where placeholder i was; the count must
      equal `num_images`. Otherwise all images come first, then the text (Qwen's convention).
  Returns:
    messages in HF chat format: [{"role": "user", "content": [{"type": "image"}, ...,
    {"type": "text", "text": question}]}], with a system message first if `system_prompt` is set.
  Raises:
    ImageCountError: `image_placeholder` occurs a different number of times than `num_images`.
  """
  if num_images < 0:
    raise ValueError(f"num_images must be >= 0, got {num_images}")
  if image_placeholder:
    pieces = question.split(image_placeholder)
    if len(pieces) - 1 != num_images:
      raise ImageCountError(
          f"question has {len(pieces) - 1} {image_placeholder!r} placeholders but {num_images} images were given")
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
      if i > 0:
        content.append({"type": "image"})
      if piece:
        content.append({"type": "text", "text": piece})
  else:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
  messages: list[Message] = []
  if system_prompt is not None:
    messages.append({"role": "system", "content": system_prompt})
  messages.append({"role": "user", "content": content})
  return messages


def render_prompt(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
  """The chat template applied to `messages`, as text (one `<|image_pad|>` per image part)."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("tokenizer has no chat_template (load the model directory's tokenizer)")
  text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
  if not isinstance(text, str):
    raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
  return text


def num_image_tokens(grid_thws: np.ndarray | Sequence[Sequence[int]], merge_size: int = 2) -> np.ndarray:
  """[n, 3] (t, h, w) grids -> [n] int32 merged-token counts t*h*w / merge_size**2."""
  grid = np.asarray(grid_thws, dtype=np.int64).reshape(-1, 3)
  counts = grid.prod(axis=1)
  if np.any(counts % merge_size**2):
    raise ValueError(f"patch counts {counts.tolist()} are not all multiples of merge_size**2={merge_size**2}")
  return (counts // merge_size**2).astype(np.int32)


def expand_image_tokens(
    text: str,
    grid_thws: np.ndarray | Sequence[Sequence[int]],
    merge_size: int = 2,
    image_pad: str = IMAGE_PAD,
) -> str:
  """Replaces the i-th `image_pad` in `text` by t_i*h_i*w_i / merge_size**2 copies of it.

  As `Qwen2_5_VLProcessor.__call__` (its `replace_image_token`).

  Raises:
    ImageCountError: `text` has a different number of `image_pad` than there are grids.
  """
  counts = num_image_tokens(grid_thws, merge_size)
  pieces = text.split(image_pad)
  if len(pieces) - 1 != len(counts):
    raise ImageCountError(f"prompt text has {len(pieces) - 1} {image_pad} placeholders but {len(counts)} images")
  out = [pieces[0]]
  for count, rest in zip(counts, pieces[1:]):
    out.append(image_pad * int(count))
    out.append(rest)
  return "".join(out)


def _token_id(tokenizer, token: str) -> int:
  i = tokenizer.convert_tokens_to_ids(token)
  if i is None or i == tokenizer.unk_token_id:
    raise ValueError(f"tokenizer has no token {token!r}")
  return int(i)


def encode_prompt(
    tokenizer,
    messages: Sequence[Message] | str,
    images: Sequence[image_lib.ImageSource] = (),
    image_config: image_lib.ImageConfig | None = None,
    system_prompt: str | None = None,
) -> EncodedPrompt:
  """Messages and images -> prompt ids + vision inputs, equal to HF tokenizer + image processor.

  Args:
    tokenizer: a HF tokenizer with the Qwen special tokens and chat template.
    messages: HF chat messages whose image parts are placeholders ({"type": "image"}), images given
      separately in order; or a plain question string (then `build_messages(question, len(images))`).
    images: anything `image.load_image` accepts, in the order of the image parts.
    image_config: pixel limits etc.; default `ImageConfig()` (the Qwen2.5-VL hub values).
    system_prompt: if set, a system message with this text is put first (an error if `messages`
      already has one); None keeps the template's default system prompt.
  Returns:
    an `EncodedPrompt` ending with the generation prompt.
  Raises:
    ImageCountError: the messages have a different number of image parts than `images`.
    image.ImageError: an image cannot be read or preprocessed (names the image).
  """
  config = image_config or image_lib.ImageConfig()
  images = list(images)
  if isinstance(messages, str):
    messages = build_messages(messages, len(images), system_prompt=system_prompt)
  else:
    messages = list(messages)
    if system_prompt is not None:
      if messages and messages[0].get("role") == "system":
        raise ValueError("system_prompt given but the messages already start with a system message")
      messages = [{"role": "system", "content": system_prompt}] + messages
  n_parts = count_image_parts(messages)
  if n_parts != len(images):
    raise ImageCountError(f"messages have {n_parts} image parts but {len(images)} images were given")
  text = render_prompt(tokenizer, messages, add_generation_prompt=True)
  pixel_values, grid_thw = image_lib.preprocess_many(images, **config.kwargs())
  counts = num_image_tokens(grid_thw, config.merge_size)
  expanded = expand_image_tokens(text, grid_thw, config.merge_size)
  # No extra special tokens: the template already wrote every one (Qwen has no BOS). HF's
  # processor calls the tokenizer with add_special_tokens=True, which is the same for Qwen.
  ids = np.asarray(tokenizer(expanded, add_special_tokens=False)["input_ids"], dtype=np.int32)
  n_pad = int(np.sum(ids == _token_id(tokenizer, IMAGE_PAD)))
  if n_pad != int(counts.sum()):
    raise ValueError(f"tokenized prompt has {n_pad} {IMAGE_PAD} ids, expected {int(counts.sum())}: "
                     f"is {IMAGE_PAD} a special token of this tokenizer, and absent from the text?")
  return EncodedPrompt(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw,
                       num_image_tokens=counts, text=text)


def encode_response(tokenizer, text: str, add_eos: bool = True) -> np.ndarray:
  """Assistant response text -> [C] int32 ids (+ `<|im_end|>`, the end of an assistant turn).

  `<|im_end|>` is used rather than `tokenizer.eos_token`, which is `<|endoftext|>` for base (not
  instruct) Qwen tokenizers. `encode_prompt(...).input_ids + encode_response(text)` equals the ids
  of the conversation rendered with the assistant message, minus the template's trailing "\\n"
  (tested). Exception: a `text` starting with a newline, which Qwen's pre-tokenizer would merge
  with the "\\n" that ends the generation prompt in the joint rendering.
  """
  ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
  if add_eos:
    ids.append(_token_id(tokenizer, EOS_TOKEN))
  return np.asarray(ids, dtype=np.int32)
