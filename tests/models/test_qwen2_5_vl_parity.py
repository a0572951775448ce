"""Qwen2.5-VL in Flax vs transformers (PyTorch, float32) on tiny random models: logits within 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures
from mm_inputs import hf_batch, hf_logits, random_image
from specs_jax.models import qwen2_5_vl

ATOL = 1e-4


def _jax_logits(model, params, batch):
  return np.asarray(model.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                                jnp.asarray(batch["attention_mask"]),
                                pixel_values=None if "pixel_values" not in batch else jnp.asarray(batch["pixel_values"]),
                                image_grid_thw=batch.get("image_grid_thw")))


def _compare(model, params, hf_model, batch):
  ours = _jax_logits(model, params, batch)
  ref = hf_logits(hf_model, batch)
  valid = batch["attention_mask"].astype(bool)
  diff = np.abs(ours - ref)[valid].max()
  assert ref[valid].std() > 0.1, "reference logits are near-constant; the test would not discriminate"
  assert diff < ATOL, f"max abs diff {diff:.3g}"
  return diff


def test_text_only(jax_model, hf_model, tokenizer, image_processor):
  model, params = jax_model
  batch = hf_batch(tokenizer, image_processor, [("how many red circles are there? think then answer", [])])
  _compare(model, params, hf_model, batch)


def test_one_image(jax_model, hf_model, tokenizer, image_processor):
  model, params = jax_model
  rng = np.random.default_rng(0)
  batch = hf_batch(tokenizer, image_processor, [("<image>how many red circles?", [random_image(rng, 112, 140)])])
  assert batch["image_grid_thw"].tolist() == [[1, 8, 10]]
  _compare(model, params, hf_model, batch)


def test_two_images_one_sample(jax_model, hf_model, tokenizer, image_processor):
  model, params = jax_model
  rng = np.random.default_rng(1)
  imgs = [random_image(rng, 120, 250), random_image(rng, 60, 60)]
  batch = hf_batch(tokenizer, image_processor, [("<image> left and right <image> which is larger?", imgs)])
  assert len(batch["image_grid_thw"]) == 2
  _compare(model, params, hf_model, batch)


def test_left_padded_batch_different_image_sizes(jax_model, hf_model, tokenizer, image_processor):
  model, params = jax_model
  rng = np.random.default_rng(2)
  samples = [
      ("<image>count the squares", [random_image(rng, 224, 224)]),
      ("<image>what is the sum of the digits? answer with a number", [random_image(rng, 56, 112)]),
      ("<image><image>compare", [random_image(rng, 84, 168), random_image(rng, 140, 56)]),
  ]
  batch = hf_batch(tokenizer, image_processor, samples)
  assert (batch["attention_mask"] == 0).any(), "the batch should be left-padded"
  _compare(model, params, hf_model, batch)


@pytest.mark.parametrize("variant", ["tied", "multi_fullatt"])
def test_config_variants(variant, tmp_path, tokenizer, image_processor):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  kw = dict(tie=True) if variant == "tied" else dict(depth=4, fullatt=(0, 2))
  d = hf_fixtures.build_hf_dir(tmp_path / variant, seed=3, **kw)
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
  model, params = qwen2_5_vl.from_pretrained(d)
  assert model.config.tie_word_embeddings == (variant == "tied")
  assert ("lm_head" in params) == (variant != "tied")
  rng = np.random.default_rng(3)
  samples = [("<image>how many?", [random_image(rng, 168, 224)]), ("<image>sum", [random_image(rng, 56, 56)])]
  _compare(model, params, hf, hf_batch(tokenizer, image_processor, samples))


@pytest.mark.parametrize("layout", ["flat", "slots"])
def test_jit_with_prepared_inputs_and_patch_bucket(layout, jax_model, hf_model, tokenizer, image_processor):
  """Inside jit: positions and vision metadata precomputed, patches padded to a bucket: one block
  for all patches ("flat") or one padded slot per image ("slots")."""
  model, params = jax_model
  rng = np.random.default_rng(4)
  batch = hf_batch(tokenizer, image_processor, [("<image>count", [random_image(rng, 112, 112)]),
                                                ("<image>sum", [random_image(rng, 56, 84)])])
  kw = dict(num_patches=256) if layout == "flat" else dict(slot_size=128, num_slots=4)
  prep = qwen2_5_vl.prepare_inputs(model.config, batch["input_ids"], batch["attention_mask"],
                                   batch["image_grid_thw"], pixel_values=batch["pixel_values"], **kw)
  pv = prep.pixel_values
  assert pv.shape == (256 if layout == "flat" else 512, 1176)
  fwd = jax.jit(lambda p, ids, m, pv, pos, vis: model.apply({"params": p}, ids, m, pixel_values=pv, position_ids=pos,
                                                            vision=vis))
  ours = np.asarray(fwd(params, batch["input_ids"], batch["attention_mask"], pv, prep.position_ids, prep.vision))
  ref = hf_logits(hf_model, batch)
  valid = batch["attention_mask"].astype(bool)
  assert np.abs(ours - ref)[valid].max() < ATOL


def test_rope_index_matches_hf(hf_model, tokenizer, image_processor, jax_model):
  import torch

  model, _ = jax_model
  rng = np.random.default_rng(5)
  batch = hf_batch(tokenizer, image_processor, [("<image>a <image> b", [random_image(rng, 56, 168),
                                                                        random_image(rng, 112, 56)]),
                                                ("text only here", [])][::-1])
  # sample 0 is text-only, sample 1 has two images; left padding on sample 0
  pos, deltas = qwen2_5_vl.get_rope_index(model.config, batch["input_ids"], batch["attention_mask"],
                                          batch["image_grid_thw"])
  ref_pos, ref_deltas = hf_model.model.get_rope_index(
      torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["mm_token_type_ids"]),
      image_grid_thw=torch.from_numpy(batch["image_grid_thw"]), attention_mask=torch.from_numpy(batch["attention_mask"]))
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(pos[:, valid], ref_pos.numpy()[:, valid])
  np.testing.assert_array_equal(deltas, ref_deltas.numpy().reshape(-1))


def test_video_grid_rope_index_matches_hf(hf_model, jax_model):
  """A video grid (t > 1) gets temporal positions spaced by tokens_per_second * second_per_grid_t."""
  import torch

  model, _ = jax_model
  cfg = model.config
  thw = np.array([[3, 4, 6]])
  n_tok = 3 * 2 * 3
  ids = np.array([[1, 10, cfg.vision_start_token_id] + [cfg.video_token_id] * n_tok + [cfg.vision_end_token_id, 11, 12]])
  mask = np.ones_like(ids)
  pos, deltas = qwen2_5_vl.get_rope_index(cfg, ids, mask, video_grid_thw=thw, second_per_grid_ts=[0.5])
  ref_pos, ref_deltas = hf_model.model.get_rope_index(
      torch.from_numpy(ids), torch.from_numpy((ids == cfg.video_token_id).astype(np.int64) * 2),
      video_grid_thw=torch.from_numpy(thw), second_per_grid_ts=torch.tensor([0.5]),
      attention_mask=torch.from_numpy(mask))
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(deltas, ref_deltas.numpy().reshape(-1))
