"""Two tiny Qwen2.5-VL models on the synthetic tasks: the real sampler path, and a dataset on disk that the
DPO side reads back and scores (must-show 4)."""

import json

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distill_helpers import check_pair, same_images, scripted_sampler

from specs_jax import sampling
from specs_jax.data import read_preference_pairs, records
from specs_jax.distill import DistillConfig, ModelSampler, build_pairs, write_outputs
from specs_jax.models import qwen2_5_vl
from specs_jax.processing import batching, chat
from specs_jax.training import dpo, logprobs


@pytest.fixture(scope="module")
def base(hf_dir):
  return qwen2_5_vl.from_pretrained(hf_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
  """A second tiny model (other weights, same tokenizer): plays π_zero."""
  return qwen2_5_vl.from_pretrained(hf_fixtures.build_hf_dir(tmp_path_factory.mktemp("hf_zero"), seed=1),
                                    dtype=jnp.float32)


def test_real_sampler_path(base, zero, tokenizer, train_examples, tmp_path):
  """The default sampler end to end on random tiny models: they answer nothing correctly, so pairs may be
  zero, but every sampled candidate is accounted for and the outputs are written."""
  config = DistillConfig(batch_size=4, k_chosen=2, k_rejected=2, max_new_tokens=4, max_pairs=None)
  examples = train_examples[:2]                     # one batch, padded from 2 to 4 prompts
  pairs, stats = build_pairs(zero[0], zero[1], base[0], base[1], tokenizer, examples, config, jax.random.key(0))
  d = stats.to_dict()
  assert d["models"]["policy"]["samples"] == d["models"]["base"]["samples"] == 4
  for side in ("chosen", "rejected"):
    assert d[side]["candidates"] == 4 == d[side]["kept"] + sum(d[side]["dropped"].values())
  assert len(pairs) == d["pairs"]
  assert d["lengths"]["policy_samples_chars"]["n"] == 4

  out = write_outputs(pairs, stats, tmp_path, config=config)
  report = json.loads(out.stats.read_text())
  assert report["chosen"] == d["chosen"] and report["config"]["k_chosen"] == 2
  assert len(read_preference_pairs(out.jsonl)) == len(pairs)


def test_model_sampler_groups_samples_by_prompt(base, tokenizer, train_examples):
  # Same shapes and settings as the build_pairs call above, so the compiled sampler is reused.
  config = DistillConfig(batch_size=4, max_new_tokens=4)
  sampler = ModelSampler({"base": base}, tokenizer, config)
  key = jax.random.key(5)
  texts = sampler("base", train_examples[:2], 2, key, temperature=1.0)
  assert len(texts) == 2 and all(len(t) == 2 for t in texts)
  assert sampler("base", train_examples[:2], 2, key, temperature=1.0) == texts      # seeded
  # The same batch by hand (2 prompts padded to 4 with copies of the last): rows are prompt-major.
  enc = [chat.encode_prompt(tokenizer, ex.messages, ex.load_images()) for ex in train_examples[:2]]
  enc += [enc[-1]] * 2
  ids, mask = batching.pad_prompts_left([e.input_ids for e in enc], tokenizer.pad_token_id)
  ref = sampling.generate(base[0], base[1], ids, mask, pixel_values=np.concatenate([e.pixel_values for e in enc]),
                          image_grid_thw=np.concatenate([e.image_grid_thw for e in enc]), max_new_tokens=4,
                          temperature=1.0, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                          pad_token_id=tokenizer.pad_token_id, rng=key, n=2,
                          prompt_buckets=sampling.sampler.DEFAULT_PROMPT_BUCKETS)
  decoded = sampling.decode_responses(tokenizer, ref)
  assert list(ref.group_index[:4]) == [0, 0, 1, 1] and texts == [decoded[0:2], decoded[2:4]]
  with pytest.raises(KeyError, match="no model 'policy'"):
    sampler("policy", train_examples[:1], 1, key)


def _summed_logps(model, params, tokenizer, pairs):
  """Summed completion log-probs of the pairs' chosen and rejected responses ([B] each, and the chosen
  lengths): what the DPO step computes, from the public pieces (chat encoding, static-shape packing, the
  model's forward, token log-probs). Rows: chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}."""
  prompts = [chat.encode_prompt(tokenizer, p.messages, p.load_images()) for p in pairs] * 2
  completions = [chat.encode_response(tokenizer, p.chosen) for p in pairs] + \
      [chat.encode_response(tokenizer, p.rejected) for p in pairs]
  b = batching.pack_prompt_completion([e.input_ids for e in prompts], completions, tokenizer.pad_token_id,
                                      max(len(e.input_ids) for e in prompts), max(len(c) for c in completions))
  pv = np.concatenate([e.pixel_values for e in prompts])
  thw = np.concatenate([e.image_grid_thw for e in prompts])
  logits = model.apply({"params": params}, b["input_ids"], b["attention_mask"], pixel_values=pv, image_grid_thw=thw)
  lp = logprobs.token_logprobs_from_logits(logits[:, :-1], b["input_ids"][:, 1:])
  summed = jnp.sum(lp * b["completion_mask"][:, 1:], axis=-1)
  n = len(pairs)
  return summed[:n], summed[n:], b["completion_lengths"][:n]


def test_dataset_on_disk_is_read_by_the_dpo_side(base, zero, tokenizer, train_examples, tmp_path):
  config = DistillConfig(batch_size=8, max_pairs=12)
  pairs, stats = build_pairs(None, None, None, None, tokenizer, train_examples, config, jax.random.key(3),
                             sample_fn=scripted_sampler())
  assert len(pairs) == 12
  assert stats.to_dict()["lengths"]["chosen_tokens"]["n"] == 12
  out = write_outputs(pairs, stats, tmp_path, config=config)
  assert out.plot is not None and out.plot.stat().st_size > 0
  assert (tmp_path / "dataset_info.json").exists() and any(out.image_dir.iterdir())

  by_id = {ex.id: ex for ex in train_examples}
  from_jsonl = read_preference_pairs(out.jsonl)                   # LLaMA-Factory format, images from disk
  assert from_jsonl.num_skipped == 0 and [p.id for p in from_jsonl] == [p.id for p in pairs]
  from_records = records.open_pairs(tmp_path, "pairs")             # ArrayRecord
  assert len(from_records) == len(pairs)
  for i, (p, q, r) in enumerate(zip(pairs, from_jsonl, from_records)):
    for got in (q, r):
      check_pair(got, by_id[p.id])                                 # every invariant survives the round trip
      assert (got.chosen, got.rejected) == (p.chosen, p.rejected)
      assert same_images(got.images, p.images)
      assert got.meta["corruption"] == p.meta["corruption"] and got.meta["gold"] == p.meta["gold"]

  # The DPO side: policy = π_zero, reference = the base model, on 3 pairs read back from disk.
  batch = list(from_jsonl)[:3]
  pc, pr, len_c = _summed_logps(zero[0], zero[1], tokenizer, batch)
  rc, rr, _ = _summed_logps(base[0], base[1], tokenizer, batch)
  loss, metrics = dpo.dpo_sft_loss(pc, pr, rc, rr, len_c, beta=0.1, sft_weight=1.0)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert bool(jnp.all(pc < 0)) and bool(jnp.all(pr < 0))
