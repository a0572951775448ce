"""Stage "distill" (1b): self-distilled preference pairs (RECIPE.md §2, `specs_jax.distill`).

Chosen: k samples from π_zero (DIR/zero_rl/hf); rejected: k samples from the base model, same
prompts. Both must be correct; the judge checks the chosen reasoning; the chosen gets the format
supplement, the rejected a format pollution. Writes DIR/distill/pairs.jsonl (+ images/, LLaMA-Factory
format), the ArrayRecord set, stats.json and lengths.png.
"""

from __future__ import annotations

import ml_collections

from specs_jax import distill
from specs_jax.pipeline import PipelineError, require
from specs_jax.rewards.pool import RewardPool
from specs_jax.stages import common


def distill_config(config: ml_collections.ConfigDict, policy: common.Policy) -> distill.DistillConfig:
  c = config.distill
  return distill.DistillConfig(
      num_prompts=int(c.num_prompts), max_pairs=int(c.max_pairs), k_chosen=int(c.k_chosen),
      k_rejected=int(c.k_rejected), chosen_temperature=float(c.temperature), rejected_temperature=float(c.temperature),
      max_new_tokens=int(c.max_new_tokens), batch_size=int(c.batch_size), pair_mode=c.pair_mode, pick=c.pick,
      chosen_source=c.chosen_source, teacher_dir=c.teacher_dir or None, judge=c.judge,
      system_prompt=common.system_prompt(config), seed=int(config.seed), image=policy.image_config)


def run(config: ml_collections.ConfigDict, wd) -> dict:
  stage = wd.stage("distill")
  mesh = common.stage_mesh(config)
  base = common.load_policy(common.starting_hf_dir(config, wd, "distill"), config, mesh)
  zero = common.load_policy(require(wd.hf("zero_rl"), "the zero-RL policy pi_zero", "distill"), config, mesh)
  cfg = distill_config(config, base)
  examples = common.rl_examples(config, "train", int(config.distill.num_prompts), seed_offset=21)
  with RewardPool(num_workers=2) as pool:
    pairs, stats = distill.build_pairs(zero.model, zero.params, base.model, base.params, base.tokenizer, examples,
                                       cfg, int(config.seed) + 31, pool=pool)
  distill.write_outputs(pairs, stats, stage, config=cfg)
  if not pairs:
    raise PipelineError(f"distill built no preference pairs from {len(examples)} prompts (see {stage}/stats.json): "
                        "the cold start has no data. Use more prompts or samples (config.distill.*)")
  return {"pairs": len(pairs), "prompts": len(examples), "stats": stats.to_dict()}
