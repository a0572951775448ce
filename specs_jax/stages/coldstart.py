"""Stages "coldstart" (DPO + λ·SFT, SPECS stage 2) and "sft_coldstart" (the SFT baseline).

Both start from the base model and train on DIR/distill/pairs.jsonl:
  coldstart:     sigmoid DPO (β) on summed completion log-probs + λ × the chosen response's
                 length-normalised NLL (LLaMA-Factory `pref_ftx`); the reference is the frozen base,
                 whose log-probs are computed once before training;
  sft_coldstart: NLL on the chosen responses only (the "SFT-based GRPO" baseline's first stage).
The generalisation factor (ID and OOD format-following, RECIPE.md §4) is tracked every `gf_every`
steps into DIR/<stage>/gf.jsonl and summary["gf"].
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from specs_jax import data as data_lib
from specs_jax.eval import hooks
from specs_jax.pipeline import PipelineError, require
from specs_jax.processing.tokenizer import special_token_ids
from specs_jax.stages import common
from specs_jax.training import batches as batches_lib
from specs_jax.training import steps as steps_lib
from specs_jax.training.state import OptimizerConfig

log = logging.getLogger(__name__)

METHOD = {"coldstart": "dpo_sft", "sft_coldstart": "sft"}


def load_pairs(wd, stage: str, on_error: str) -> list:
  path = require(os.path.join(wd.root, "distill", "pairs.jsonl"), "the preference pairs", stage)
  res = data_lib.read_preference_pairs(path, on_error=on_error)
  if not res.examples:
    raise PipelineError(f"{path} holds no readable preference pairs ({res.summary()})")
  return list(res.examples)


def drop_too_long(encoded: list, comp: list[int], max_length: int, stage: str) -> tuple[list, list[int], int]:
  """Drops (and counts) the pairs whose prompt + longer response exceeds `max_length` tokens: the
  recipe's cutoff (RECIPE.md §1, 16,384). Dropping rather than truncating keeps every DPO log-prob a
  whole response's. Raises PipelineError when nothing is left."""
  keep = [i for i, e in enumerate(encoded) if len(e.prompt.input_ids) + comp[i] <= max_length]
  dropped = len(encoded) - len(keep)
  if dropped:
    log.warning("%s: %d of %d pairs are longer than max_length=%d tokens and are skipped", stage, dropped,
                len(encoded), max_length)
  if not keep:
    raise PipelineError(f"{stage}: all {len(encoded)} pairs are longer than max_length={max_length} tokens "
                        f"(config.{stage}.max_length)")
  return [encoded[i] for i in keep], [comp[i] for i in keep], dropped


def run(config: ml_collections.ConfigDict, wd, name: str) -> dict:
  c = config[name]
  stage = wd.stage(name)
  mesh = common.stage_mesh(config)
  policy = common.load_policy(common.starting_hf_dir(config, wd, name), config, mesh)
  tok, icfg, mcfg = policy.tokenizer, policy.image_config, policy.model.config
  pad = special_token_ids(tok)["<|endoftext|>"]
  pairs = load_pairs(wd, name, config.data.on_error)
  is_dpo = name == "coldstart"

  if is_dpo:
    encoded = [batches_lib.encode_pair(tok, p, icfg, common.system_prompt(config)) for p in pairs]
    comp = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded]
  else:
    encoded = [batches_lib.encode_sft_example(tok, p, icfg, common.system_prompt(config)) for p in pairs]
    comp = [len(e.response_ids) for e in encoded]
  encoded, comp, too_long = drop_too_long(encoded, comp, int(c.max_length), name)
  bs = min(int(c.batch_size), len(encoded))
  steps_per_epoch = max(1, len(encoded) // bs)
  total = int(c.epochs) * steps_per_epoch
  buckets = common.fixed_buckets([len(e.prompt.input_ids) for e in encoded], comp,
                                 [e.prompt.image_grid_thw for e in encoded], bs)

  share_prompt = None
  if is_dpo:  # reference log-probs of the frozen base, once, stored with the pairs
    share_prompt = steps_lib.parse_share_prompt(c.get("share_prompt", "auto"), "coldstart.share_prompt")
    logps_fn = steps_lib.make_logps_fn(policy.model, copies=2, share_prompt=share_prompt)
    ref = []
    for i in range(0, len(encoded), bs):
      chunk = encoded[i:i + bs]
      batch = batches_lib.collate_dpo(chunk, mcfg, buckets, pad, num_pairs=bs, require_ref=False)
      rc, rr = steps_lib.reference_logps(logps_fn, policy.params, common.to_mesh(batch, mesh))
      ref += list(zip(rc[:len(chunk)], rr[:len(chunk)]))
    encoded = [batches_lib.EncodedPair(e.prompt, e.chosen_ids, e.rejected_ids, float(a), float(b))
               for e, (a, b) in zip(encoded, ref)]

  opt = OptimizerConfig(learning_rate=float(c.learning_rate), schedule=c.schedule, total_steps=total,
                        warmup_ratio=float(c.warmup_ratio), weight_decay=0.0, max_grad_norm=1.0)
  # The GF hook evaluates the starting point (step 0) with the policy params before the state owns
  # (and the steps donate) them.
  d = config.data
  tracker = hooks.GFTracker.synthetic(METHOD[name], n_id=int(c.gf_examples), n_ood=int(c.gf_examples),
                                      seed=config.seed + 1000, levels=tuple(d.levels),
                                      image_size=(int(d.image_min), int(d.image_max)),
                                      path=os.path.join(stage, "gf.jsonl"))
  gen = hooks.greedy_generate_fn(policy.model, tok, image_config=icfg, max_new_tokens=int(config.eval.max_new_tokens),
                                 batch_size=int(config.eval.batch_size), system_prompt=common.system_prompt(config))
  hook = hooks.make_gf_hook(int(c.gf_every), tracker, gen, last_step=total)
  if not tracker.history or tracker.history[0][0] != 0:
    hook(0, policy.params)  # the base model's point (step 0)

  state, shardings = steps_lib.init_train_state(policy.params, opt, jax.random.key(config.seed + 41),
                                                freeze_vision=bool(c.freeze_vision), mesh=mesh)
  common_kw = dict(micro_batches=int(c.micro_batches), freeze_vision=bool(c.freeze_vision), mesh=mesh,
                   state_sharding=shardings)
  if is_dpo:
    step_fn = steps_lib.make_dpo_step(policy.model, opt, beta=float(c.beta), sft_weight=float(c.sft_weight),
                                      share_prompt=share_prompt, **common_kw)
    collate = lambda items: batches_lib.collate_dpo(items, mcfg, buckets, pad, num_pairs=bs)  # noqa: E731
  else:
    step_fn = steps_lib.make_sft_step(policy.model, opt, **common_kw)
    collate = lambda items: batches_lib.collate_sft(items, mcfg, buckets, pad, num_rows=bs)  # noqa: E731


  def one_step(state, step):
    return step_fn(state, common.to_mesh(collate(common.cycle(encoded, bs, step, config.seed + 43)), mesh))

  res = common.train_loop(stage, state, total, one_step, checkpoint_every=int(c.checkpoint_every),
                          progress=config.run.progress, on_step=lambda s, st, m: hook(s, st.params),
                          max_nonfinite_in_a_row=int(config.run.max_nonfinite_in_a_row))
  common.export(res.state.params, policy, wd.hf(name))
  return {"steps": res.steps, "pairs": len(encoded), "pairs_over_max_length": too_long, "gf": {METHOD[name]: tracker.history}}

