"""Stages "zero_rl", "final_rl" and "sft_final": GRPO with verifiable rewards (RECIPE.md §1, §5).

  zero_rl:   from the base model (config.model.hf_dir, or the demo's base stage) → π_zero
  final_rl:  from the DPO+SFT cold start (DIR/coldstart/hf) → π_final
  sft_final: from the SFT cold start (DIR/sft_coldstart/hf), the baseline branch

Per step (`training.rollout` + `training.grpo_step`): B prompts → G samples each (one prefill per
prompt) → 0.5·format + 1.0·accuracy graded in a process pool → group advantages → online filter
→ policy-gradient update(s). Batches and keys are functions of the step index, so an interrupted
stage resumes from its last checkpoint and ends where an uninterrupted one would.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from specs_jax import sampling
from specs_jax.pipeline import require
from specs_jax.processing.tokenizer import special_token_ids
from specs_jax.rewards.config import RewardConfig
from specs_jax.rewards.pool import RewardPool
from specs_jax.stages import common
from specs_jax.training import grpo_step, rollout, steps as steps_lib

SOURCES = {"zero_rl": None, "final_rl": "coldstart", "sft_final": "sft_coldstart"}
GRPO_FIELDS = ("group_size", "prompts_per_step", "learning_rate", "temperature", "top_p", "max_response_len",
               "eps_low", "eps_high", "kl_coef", "agg", "filter_lower", "filter_upper", "dynamic_sampling",
               "ppo_epochs", "minibatches", "micro_batches", "freeze_vision", "prompts_per_call", "share_prompt")


def grpo_config(c: ml_collections.ConfigDict) -> grpo_step.GRPOConfig:
  return grpo_step.GRPOConfig.from_mapping({k: c[k] for k in GRPO_FIELDS} | {"total_steps": int(c.steps)})


def run(config: ml_collections.ConfigDict, wd, name: str) -> dict:
  c = config[name if name != "sft_final" else "final_rl"]
  src = SOURCES[name]
  hf_in = common.starting_hf_dir(config, wd, name) if src is None else require(wd.hf(src), f"the {src} policy", name)
  stage = wd.stage(name)
  mesh = common.stage_mesh(config)
  policy = common.load_policy(hf_in, config, mesh)
  cfg = grpo_config(c)
  tok = policy.tokenizer
  ids = special_token_ids(tok)
  b = cfg.prompts_per_step
  # The prompt pool (deterministic from the seed); step k draws its B prompts with `common.cycle`
  # and encodes them then, so the pool's pixels are never all in memory (a 7B run's 12,800 prompts
  # of up to 1,280 image tokens would be ~300 GB of patches). One sizing pass fixes the buckets.
  pool = common.rl_examples(config, "train", min(int(config.data.num_train), int(c.steps) * b), seed_offset=7)
  lengths, grids = common.prompt_sizes(policy, pool, config)
  bk = common.fixed_buckets(lengths, [], grids, b)
  p_len, q, s = bk.prompt.sizes[0], bk.patches.sizes[0], bk.images.sizes[0]
  c_len = int(cfg.max_response_len)
  sampler = sampling.Sampler(policy.model)
  state, shardings = steps_lib.init_train_state(policy.params, cfg.optimizer_config(),
                                                jax.random.key(config.seed + 3), freeze_vision=cfg.freeze_vision,
                                                mesh=mesh)
  fns = grpo_step.make_grpo_functions(policy.model, cfg, mesh=mesh, state_sharding=shardings)
  sampler_kwargs = {"gen_buckets": (c_len,), "data_sharding": common.rows_sharding(mesh, b)}
  reward_cfg = RewardConfig(format_weight=float(c.format_weight), accuracy_weight=float(c.accuracy_weight))
  key = jax.random.key(config.seed + {"zero_rl": 11, "final_rl": 12, "sft_final": 13}[name])

  with RewardPool(num_workers=int(c.reward_workers)) as reward_pool:
    reward_fn = rollout.pool_reward_fn(reward_pool, reward_cfg)

    def one_step(state, step):
      batch_prompts = common.encode_examples(policy, common.cycle(pool, b, step, config.seed + 5), config)
      k_sample, k_update = jax.random.split(jax.random.fold_in(key, step))
      batch = rollout.collect_rollouts(
          sampler, state.params, batch_prompts, reward_fn, rng=k_sample, pad_id=ids["<|endoftext|>"],
          eos_token_id=ids["<|im_end|>"], tokenizer=tok, prompt_buckets=[p_len], completion_buckets=[c_len],
          patch_buckets=[q], image_buckets=[s], sampler_kwargs=sampler_kwargs, **cfg.rollout_kwargs())
      state, metrics = grpo_step.grpo_train_step(state, batch, cfg, k_update, fns=fns, mesh=mesh,
                                                global_rows=True)
      return state, {**{k: v for k, v in batch.metrics.items() if np.ndim(v) == 0}, **metrics}

    res = common.train_loop(stage, state, int(c.steps), one_step, checkpoint_every=int(c.checkpoint_every),
                            progress=config.run.progress,
                            max_nonfinite_in_a_row=int(config.run.max_nonfinite_in_a_row))
  common.export(res.state.params, policy, wd.hf(name))
  return {"steps": res.steps, "source": hf_in}
