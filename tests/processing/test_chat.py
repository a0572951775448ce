"""specs_jax.processing.chat against HF tokenizer + Qwen2VLImageProcessorPil (ENVIRONMENT.md §4 recipe)."""

import hf_fixtures
import numpy as np
import pytest
from PIL import Image

from specs_jax.processing import chat, image
from specs_jax.processing.tokenizer import DEFAULT_SYSTEM_PROMPT, IMAGE_PAD, special_token_ids

CFG = image.ImageConfig(min_pixels=hf_fixtures.MIN_PIXELS, max_pixels=hf_fixtures.MAX_PIXELS)


def _img(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def hf_process(tok, ip, prompt, images):
  """What Qwen2_5_VLProcessor does (ENVIRONMENT.md §4), written as there."""
  if images:
    ii = ip(images=[Image.fromarray(a) for a in images], return_tensors="np")
  else:
    ii = {"pixel_values": np.zeros((0, 1176), np.float32), "image_grid_thw": np.zeros((0, 3), np.int64)}
  parts = prompt.split("<|image_pad|>")
  text = parts[0]
  for thw, rest in zip(ii["image_grid_thw"], parts[1:]):
    text += "<|image_pad|>" * (int(thw.prod()) // ip.merge_size**2) + rest
  enc = tok([text], return_tensors="np")
  return {"input_ids": enc["input_ids"][0], **ii}


@pytest.mark.parametrize("sizes", [[], [(100, 60)], [(40, 300), (250, 250)]], ids=["0img", "1img", "2img"])
@pytest.mark.parametrize("system_prompt", [None, "Think step by step."], ids=["default_sys", "custom_sys"])
def test_encode_prompt_equals_hf(tokenizer, image_processor, sizes, system_prompt):
  images = [_img(h, w, i) for i, (h, w) in enumerate(sizes)]
  messages = chat.build_messages("how many red circles are there ?", len(images), system_prompt=system_prompt)
  prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ref = hf_process(tokenizer, image_processor, prompt, images)

  enc = chat.encode_prompt(tokenizer, messages, images, CFG)
  assert enc.input_ids.dtype == np.int32
  np.testing.assert_array_equal(enc.input_ids, ref["input_ids"])
  np.testing.assert_array_equal(enc.image_grid_thw, ref["image_grid_thw"])
  np.testing.assert_allclose(enc.pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
  assert enc.pixel_values.shape == (int(np.prod(enc.image_grid_thw, axis=1).sum()), 1176)
  assert enc.num_images == len(images)

  # one run of num_image_tokens[i] pads per image, framed by vision_start / vision_end
  ids = special_token_ids(tokenizer)
  starts = np.flatnonzero(enc.input_ids == ids["<|vision_start|>"])
  assert len(starts) == len(images)
  for s, n in zip(starts, enc.num_image_tokens):
    assert (enc.input_ids[s + 1:s + 1 + n] == ids[IMAGE_PAD]).all()
    assert enc.input_ids[s + 1 + n] == ids["<|vision_end|>"]
  np.testing.assert_array_equal(enc.num_image_tokens, np.prod(enc.image_grid_thw, axis=1) // 4)

  # the same prompt from a plain question string + system_prompt argument
  enc2 = chat.encode_prompt(tokenizer, "how many red circles are there ?", images, CFG, system_prompt=system_prompt)
  np.testing.assert_array_equal(enc2.input_ids, enc.input_ids)
  # ... and from messages without a system message + the system_prompt argument
  plain = chat.build_messages("how many red circles are there ?", len(images))
  enc3 = chat.encode_prompt(tokenizer, plain, images, CFG, system_prompt=system_prompt)
  np.testing.assert_array_equal(enc3.input_ids, enc.input_ids)


def test_rendered_prompt_format(tokenizer):
  text = chat.render_prompt(tokenizer, chat.build_messages("Q?", 2))
  assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
                  "Q?<|im_end|>\n<|im_start|>assistant\n")
  custom = chat.render_prompt(tokenizer, chat.build_messages("Q?", 0, system_prompt="Be brief."))
  assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and DEFAULT_SYSTEM_PROMPT not in custom
  no_gen = chat.render_prompt(tokenizer, chat.build_messages("Q?", 0), add_generation_prompt=False)
  assert no_gen.endswith("Q?<|im_end|>\n")


def test_build_messages_placeholder_interleaves_images():
  msgs = chat.build_messages("<image>Compare with <image>: which is larger?", 2, image_placeholder="<image>")
  assert msgs == [{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": "Compare with "}, {"type": "image"},
      {"type": "text", "text": ": which is larger?"}]}]
  assert chat.build_messages("Q", 1) == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]


def test_prompt_plus_response_equals_full_conversation(tokenizer):
  images = [_img(90, 120, 0), _img(30, 200, 1)]
  messages = chat.build_messages("how many circles ?", 2, system_prompt="Answer in tags.")
  prompt = chat.encode_prompt(tokenizer, messages, images, CFG)
  eos = special_token_ids(tokenizer)["<|im_end|>"]
  newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
  for response in ["<think> 2 + 3 = 5 </think> <answer> 5 </answer>", "The answer is $\\boxed{ 7 }$.",
                   " leading space", "x"]:
    resp_ids = chat.encode_response(tokenizer, response)
    assert resp_ids.dtype == np.int32 and resp_ids[-1] == eos
    assert (chat.encode_response(tokenizer, response, add_eos=False) == resp_ids[:-1]).all()
    full_text = chat.render_prompt(tokenizer, messages + [{"role": "assistant", "content": response}],
                                   add_generation_prompt=False)
    full = tokenizer(chat.expand_image_tokens(full_text, prompt.image_grid_thw), add_special_tokens=False)["input_ids"]
    # the template closes the turn with "<|im_end|>\n"; the "\n" is glue, not model output
    assert full == list(prompt.input_ids) + list(resp_ids) + newline


def test_expand_image_tokens_by_hand():
  text = "a<|image_pad|>b<|image_pad|>c"
  # (1, 2, 4) -> 8 patches / 4 = 2 tokens; (1, 6, 2) -> 12 / 4 = 3 tokens
  assert chat.expand_image_tokens(text, [[1, 2, 4], [1, 6, 2]]) == "a" + IMAGE_PAD * 2 + "b" + IMAGE_PAD * 3 + "c"
  assert chat.expand_image_tokens("no images", np.zeros((0, 3))) == "no images"
  with pytest.raises(ValueError, match="multiples"):
    chat.expand_image_tokens("<|image_pad|>", [[1, 3, 3]])


def test_image_count_mismatch_errors(tokenizer):
  img = _img(60, 60, 0)
  with pytest.raises(chat.ImageCountError, match="2 image parts but 1 images"):
    chat.encode_prompt(tokenizer, chat.build_messages("Q", 2), [img], CFG)
  with pytest.raises(chat.ImageCountError, match="0 image parts but 1 images"):
    chat.encode_prompt(tokenizer, [{"role": "user", "content": "Q"}], [img], CFG)
  with pytest.raises(chat.ImageCountError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
    chat.expand_image_tokens("<|image_pad|><|image_pad|>", [[1, 2, 2]])
  with pytest.raises(chat.ImageCountError, match="1 '<image>' placeholders but 2 images"):
    chat.build_messages("<image> Q", 2, image_placeholder="<image>")
  # an image token typed into the question is caught, not silently expanded
  with pytest.raises(chat.ImageCountError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
    chat.encode_prompt(tokenizer, "what is <|image_pad|> ?", [img], CFG)
  assert issubclass(chat.ImageCountError, ValueError)


def test_encode_prompt_other_errors(tokenizer, tmp_path):
  bad = tmp_path / "not_an_image.jpg"
  bad.write_bytes(b"\x00\x01garbage")
  with pytest.raises(image.ImageError, match="not_an_image.jpg"):
    chat.encode_prompt(tokenizer, "Q", [bad], CFG)
  with pytest.raises(ValueError, match="already start with a system message"):
    chat.encode_prompt(tokenizer, chat.build_messages("Q", 0, system_prompt="a"), [], CFG, system_prompt="b")
  with pytest.raises(ValueError, match="video"):
    chat.encode_prompt(tokenizer, [{"role": "user", "content": [{"type": "video"}]}], [], CFG)


def test_encode_prompt_from_path_source(tokenizer, tmp_path):
  path = tmp_path / "img.png"
  Image.fromarray(_img(70, 130, 3)).save(path)
  a = chat.encode_prompt(tokenizer, "Q", [path], CFG)
  b = chat.encode_prompt(tokenizer, "Q", [_img(70, 130, 3)], CFG)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
  assert a.text.count(IMAGE_PAD) == 1
