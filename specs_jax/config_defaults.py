"""The full config schema with defaults (ml_collections). Config files start from `base_config()`.

Every field a stage reads is declared here, so a typo in a `--config.a.b=` override is an error
(and `check_fields` catches one in a config file). Sequence fields are tuples, which ml_collections
can override from the command line (`--config.eval.benchmarks="('mathvista:/d/mv.parquet',)"`).
(config files are locked by `main.py`). Sizes default to the paper's recipe (RECIPE.md §1);
`configs/demo.py` and `configs/test.py` scale them down.
"""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.run = ml_collections.ConfigDict(dict(
      stages=("zero_rl", "distill", "coldstart", "final_rl", "eval"),  # + base (demo), sft_* (baseline)
      progress=True,  # tqdm bars
      max_nonfinite_in_a_row=5,  # a NaN / inf update is skipped; this many in a row stop the stage
  ))

  # The policy. `hf_dir` is the starting checkpoint (Qwen2.5-VL-7B-Instruct for the paper); the
  # demo leaves it empty and its base stage trains one.
  c.model = ml_collections.ConfigDict(dict(
      hf_dir="", dtype="float32", param_dtype="float32", attention_impl="xla", remat="none", scan_layers=False,
  ))
  # Architecture of the demo's tiny base model (real Qwen2.5-VL architecture, only small).
  c.model.tiny = ml_collections.ConfigDict(dict(
      hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
      mrope_section=[4, 4, 4], vision_depth=2, vision_hidden_size=48, vision_num_heads=2,
      vision_intermediate_size=128, fullatt_block_indexes=[1],
  ))
  # Device mesh over all devices of all hosts (-1: the rest). One device: the unsharded path.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # Multi-host: `jax.distributed.initialize()` runs when this says so or the environment shows
  # several hosts (TPU pod slice, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS); unset = auto-detect
  # (placeholders: None until set, and settable from the command line, e.g. --config.distributed.enabled=True).
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=placeholder(bool), coordinator_address=placeholder(str), num_processes=placeholder(int),
      process_id=placeholder(int),
  ))

  # Prompts and evaluation sets. source: "synthetic" (embedded) or "files".
  c.data = ml_collections.ConfigDict(dict(
      source="synthetic",
      # files: ViRL39K / Orsta rows (parquet / JSONL), files or directories. A tuple, not a list: ml_collections
      # can override tuples from the command line (--config.data.rl_prompts="('/d/a.parquet', '/d/orsta')").
      rl_prompts=(), rl_image_root="",            # rl_image_root "": each data file's own directory
      num_train=100000, num_eval=256,            # synthetic sizes
      image_min=56, image_max=112,               # synthetic image sides (px)
      levels=(1, 2, 3),
      families=(),                               # synthetic task families ([] = all in-distribution ones)
      min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
      system_prompt="",                          # "" = the chat template's default
      add_format_instruction=True,               # SPECS instruction appended to ID prompts
      on_error="skip",                           # bad rows: skip (counted) or fail
  ))

  # Demo only: the tiny "instruct" model whose format following is imperfect (as Qwen2.5-VL-7B's ≈42%).
  c.base = ml_collections.ConfigDict(dict(
      vocab_size=1024, tokenizer_corpus=4000,
      num_examples=4000, tagged_families=["count", "yes_no"],  # 2 of 5 families answer in tags (≈40%)
      tagged_prob_in=0.85, tagged_prob_out=0.1,  # P(tagged) for those families / the others: greedy
                                                 # decoding follows the format on ≈40% of prompts, and
                                                 # sampling explores the other style (so RL can learn)
      ood_format_fraction=0.3,                   # share of examples asked (and answered) in other formats
      error_rate=0.1, steps=400, batch_size=16, learning_rate=3e-3, warmup_steps=20,
      prompt_buckets=[128, 192, 256], completion_buckets=[64, 128, 192, 256], checkpoint_every=200,
  ))

  grpo = dict(
      group_size=8, prompts_per_step=128, steps=100, learning_rate=1e-6, temperature=1.0, top_p=1.0,
      max_response_len=10240, eps_low=0.2, eps_high=0.28, kl_coef=0.0, agg="token-mean",
      filter_lower=0.1, filter_upper=0.9, dynamic_sampling=False, ppo_epochs=1, minibatches=1, micro_batches=1,
      freeze_vision=True, checkpoint_every=10, format_weight=0.5, accuracy_weight=1.0, reward_workers=2,
      prompts_per_call=0,  # prompts per sampler call (0 = all): bounds the rollout's KV cache
      # "auto" | "true" | "false": run a group's G completions after one copy of its prompt in the
      # update and old log-prob passes (grpo_step.GRPOConfig.share_prompt).
      share_prompt="auto",
  )
  c.zero_rl = ml_collections.ConfigDict(grpo)
  c.final_rl = ml_collections.ConfigDict(grpo)

  c.distill = ml_collections.ConfigDict(dict(
      num_prompts=20000, max_pairs=9000, k_chosen=4, k_rejected=4, temperature=1.0, max_new_tokens=2048,
      batch_size=8, pair_mode="decoupled", pick="random", chosen_source="self", teacher_dir="", judge="rule",
  ))

  # Stage 2: DPO + λ·SFT (coldstart) and the SFT baseline (sft_coldstart), same data.
  c.coldstart = ml_collections.ConfigDict(dict(
      beta=0.1, sft_weight=1.0, epochs=2, batch_size=64, micro_batches=1, learning_rate=1e-6, warmup_ratio=0.1,
      schedule="cosine", freeze_vision=True, checkpoint_every=50, gf_every=10, gf_examples=64,
      prompt_buckets=[256, 512, 1024, 2048], completion_buckets=[256, 512, 1024, 2048, 4096],
      max_length=16384,  # prompt + response tokens per sequence (LLaMA-Factory cutoff_len; RECIPE.md §1)
      # "auto" | "true" | "false": run a pair's chosen and rejected completions after one copy of the
      # prompt (same loss, prompt and image computed once; steps.make_dpo_step). auto = on for the
      # xla / dot_product attentions, off for cudnn (unverified on GPU) and splash (unsupported).
      share_prompt="auto",
  ))
  c.sft_coldstart = ml_collections.ConfigDict(dict(
      epochs=2, batch_size=64, micro_batches=1, learning_rate=1e-6, warmup_ratio=0.1, schedule="cosine",
      freeze_vision=True, checkpoint_every=50, gf_every=10, gf_examples=64, max_length=16384,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      splits=("eval_id", "eval_ood_format", "eval_ood_task"), num_examples=256, max_new_tokens=2048,
      batch_size=16, n=1, temperature=0.0, benchmarks=(),  # benchmarks: "style:path" entries (local files)
  ))
  return c


def unknown_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict | None = None,
                   prefix: str = "") -> list[str]:
  """Dotted names of the fields of `config` that `schema` (default: `base_config()`) does not declare,
  each with a "did you mean" hint when a declared sibling is close. Config files start from the
  schema, which is not locked while they edit it, so a typo there (`c.coldstart.betta = 0.5`) would
  otherwise add a field that no stage reads."""
  schema = base_config() if schema is None else schema
  out = []
  for key in config.keys():
    name = prefix + key
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      out.append(name + (f" (did you mean {prefix + close[0]}?)" if close else ""))
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict):
      out += unknown_fields(config[key], schema[key], name + ".")
  return out


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every field of `config` that the schema does not declare."""
  unknown = unknown_fields(config)
  if unknown:
    raise ValueError(f"config fields not in the schema (specs_jax/config_defaults.py): {', '.join(unknown)}")
