"""Demo stage "base": a tiny Qwen2.5-VL "instruct" model trained from scratch on the synthetic tasks.

It plays the role of Qwen2.5-VL-7B-Instruct, whose format following the paper measures at ≈42%:
  * a byte-level BPE tokenizer with the Qwen special tokens is trained on synthetic text;
  * a randomly initialised tiny model (real architecture) is trained by SFT on templated reasoning
    texts: prompts with the SPECS instruction are answered in the tagged format mostly for the
    families in `base.tagged_families` (2 of 5 → ≈40% format following under greedy decoding) and
    mostly in plain prose otherwise (`tagged_prob_in` / `tagged_prob_out`); a share of prompts asks for other output formats (other tags, "Answer:" line, JSON,
    boxed) and is answered in them, so the base model can follow some format instructions (the
    ability the generalisation factor measures);
  * exported to DIR/base/hf (safetensors, config, tokenizer, preprocessor config).
"""

from __future__ import annotations

import os
import random

import jax
import ml_collections

from specs_jax import data as data_lib
from specs_jax.models import qwen2_5_vl
from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from specs_jax.processing.tokenizer import build_tokenizer, special_token_ids
from specs_jax.stages import common
from specs_jax.training import batches as batches_lib
from specs_jax.training import steps as steps_lib
from specs_jax.training.state import OptimizerConfig


def tiny_model_config(config: ml_collections.ConfigDict, vocab_size: int, ids: dict[str, int]) -> Qwen2_5_VLConfig:
  t = config.model.tiny
  return Qwen2_5_VLConfig(
      text=TextConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                      num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                      intermediate_size=t.intermediate_size, mrope_section=tuple(t.mrope_section),
                      max_position_embeddings=4096),
      vision=VisionConfig(depth=t.vision_depth, hidden_size=t.vision_hidden_size, num_heads=t.vision_num_heads,
                          intermediate_size=t.vision_intermediate_size, out_hidden_size=t.hidden_size,
                          fullatt_block_indexes=tuple(t.fullatt_block_indexes)),
      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
      bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


def sft_records(config: ml_collections.ConfigDict) -> list[dict]:
  """Prompt + target response for every base-training example (deterministic from the seed)."""
  c, d = config.base, config.data
  n_ood = int(round(c.num_examples * c.ood_format_fraction))
  kw = dict(levels=tuple(d.levels), image_size=(int(d.image_min), int(d.image_max)),
            families=tuple(d.families) or None)
  id_part = data_lib.make_split("train", c.num_examples - n_ood, seed=config.seed + 101, **kw)
  ood_part = data_lib.make_split("train", n_ood, seed=config.seed + 102, formats=data_lib.OOD_FORMATS, **kw)
  tagged = set(c.tagged_families)
  out = []
  for ex in id_part + ood_part:
    rng = random.Random(f"{config.seed}:{ex.id}")
    fmt = ex.meta.get("format")
    if data_lib.formats.is_default_format(fmt):
      p = c.tagged_prob_in if ex.meta.get("family") in tagged else c.tagged_prob_out
      style = "tagged" if rng.random() < p else "plain"
    else:
      style = fmt
    r = data_lib.reasoning_sample(ex, style=style, error_rate=float(c.error_rate), rng=rng)
    out.append({"messages": ex.messages, "images": ex.images, "chosen": r.text, "id": ex.id})
  return out


def run(config: ml_collections.ConfigDict, wd) -> dict:
  c = config.base
  stage = wd.stage("base")
  init_dir = os.path.join(stage, "init")
  os.makedirs(init_dir, exist_ok=True)
  tok = build_tokenizer(data_lib.corpus(int(c.tokenizer_corpus), seed=config.seed), vocab_size=int(c.vocab_size),
                        out_dir=init_dir)
  icfg = common.image_config(config)
  with open(os.path.join(init_dir, "preprocessor_config.json"), "w") as f:
    import json

    json.dump(icfg.to_preprocessor_config(), f, indent=2)
  mcfg = tiny_model_config(config, len(tok), special_token_ids(tok))
  model = qwen2_5_vl.Qwen2_5_VL(mcfg)
  params = qwen2_5_vl.weights.init_params(model, jax.random.key(config.seed))
  policy = common.Policy(model, params, tok, icfg, init_dir)

  records = sft_records(config)
  encoded = [batches_lib.encode_sft_example(tok, r, icfg) for r in records]
  buckets = common.fixed_buckets(
      [len(e.prompt.input_ids) for e in encoded], [len(e.response_ids) for e in encoded],
      [e.prompt.image_grid_thw for e in encoded], int(c.batch_size))
  opt = OptimizerConfig(learning_rate=float(c.learning_rate), schedule="cosine", total_steps=int(c.steps),
                        warmup_steps=int(c.warmup_steps), weight_decay=0.0, max_grad_norm=1.0)
  mesh = common.stage_mesh(config)
  state, shardings = steps_lib.init_train_state(params, opt, jax.random.key(config.seed + 1), freeze_vision=False,
                                                mesh=mesh)
  step_fn = steps_lib.make_sft_step(model, opt, freeze_vision=False, mesh=mesh, state_sharding=shardings)
  bs = int(c.batch_size)
  pad = special_token_ids(tok)["<|endoftext|>"]

  def one_step(state, step):
    batch = batches_lib.collate_sft(common.cycle(encoded, bs, step, config.seed), mcfg, buckets, pad, num_rows=bs)
    return step_fn(state, common.to_mesh(batch, mesh))

  res = common.train_loop(stage, state, int(c.steps), one_step, checkpoint_every=int(c.checkpoint_every),
                          progress=config.run.progress,
                          max_nonfinite_in_a_row=int(config.run.max_nonfinite_in_a_row))
  common.export(res.state.params, policy, wd.hf("base"))
  return {"steps": res.steps, "examples": len(records), "vocab_size": len(tok)}
