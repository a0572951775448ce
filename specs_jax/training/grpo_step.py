"""GRPO update machinery: old log-probs by the training forward, then `ppo_epochs` × minibatch
policy-gradient updates on one `rollout.RolloutBatch`, with metrics and per-phase times.

    cfg = grpo_step.GRPOConfig(group_size=8, prompts_per_step=128)          # RECIPE.md §1 defaults
    state, state_sharding = steps.init_train_state(params, cfg.optimizer_config(), key, mesh=mesh)
    fns = grpo_step.make_grpo_functions(model, cfg, mesh=mesh, state_sharding=state_sharding)
    for step ...:
      batch = rollout.collect_rollouts(sampler, state.params, prompts, reward_fn, rng=k1, pad_id=pad,
                                       tokenizer=tok, **cfg.rollout_kwargs())
      state, metrics = grpo_step.grpo_train_step(state, batch, cfg, k2, fns=fns, mesh=mesh)

Axes: N rows of the rollout (B prompts × G samples), R rows per minibatch (N / minibatches),
M micro-batches per minibatch, P prompt bucket, C completion bucket, L = P + C.

Per step (`grpo_train_step`):
  1. logps phase: with a frozen vision tower (the default) the B prompts' images are encoded once
     (`make_encode_images_fn`); their features are constants for every update of the step. Old
     log-probs are recomputed by the training forward (`make_old_logps_fn`, temperature-scaled
     logits as in the sampler), not taken from the sampler — but only when the step makes more than
     one update (ppo_epochs × minibatches > 1): with exactly one update, π_old = π_θ and step 2
     uses stop_gradient(log π_θ), the TRL `num_iterations=1` shortcut, which saves a whole forward
     pass. With kl_coef > 0 the frozen reference's log-probs are computed here too.
  2. update phase: for each epoch a permutation of the N rows (from `fold_in(rng, epoch)`), cut into
     minibatches; each minibatch is one optimizer update (`make_grpo_update`): `grpo.policy_loss_terms`
     summed over M micro-batches (`state.accumulate_gradients`), so the loss is the minibatch's exact
     token-mean (or other aggregation). The update that runs before any parameter has changed uses
     old = stop_gradient(log π_θ) from its own forward, so its ratio is exactly 1 (DESIGN.md): clip
     fraction 0, ppo_kl 0. A recomputed old log-prob of another XLA program can differ from the
     update's forward in the last bits; `logp_abs_diff/old` reports that gap.
  Minibatches whose loss mask is empty (all groups filtered) are skipped (`skipped_updates`).

Vision: the rows' `<|image_pad|>` tokens take their features from the unique per-prompt table by
`image_index` (`rollout.py`); a trainable tower is differentiated once per update through `jax.vjp`
of the encoder with the features' accumulated cotangent (as `steps.py` does for DPO). Frozen
parameters (`steps.effective_frozen_prefixes`) are closed over, not differentiated.

`compile_counts()` counts traces (= compilations) per jitted function: one per (rows, P, C, image
layout) bucket.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from specs_jax.models.qwen2_5_vl.model import Qwen2_5_VL, lm_head_kernel
from specs_jax.parallel import mesh as mesh_lib
from specs_jax.training import forward, grpo
from specs_jax.training.logprobs import token_logprobs_from_hidden
from specs_jax.training.rollout import RolloutBatch
from specs_jax.training.state import (OptimizerConfig, TrainState, accumulate_gradients, applied_updates,
                                      apply_gradients_checked, global_norm, known_fields, make_schedule,
                                      nonfinite_counts)
from specs_jax.training.steps import (effective_frozen_prefixes, merge_params, parse_share_prompt, partition_params,
                                      resolve_share_prompt)

__all__ = [
    "GRPOConfig",
    "GRPOFunctions",
    "compile_counts",
    "completion_logps",
    "grpo_train_step",
    "make_encode_images_fn",
    "make_grpo_functions",
    "make_grpo_update",
    "make_old_logps_fn",
]

log = logging.getLogger(__name__)

_COMPILES: collections.Counter = collections.Counter()

PyTree = Any
Flat = dict[tuple[str, ...], jax.Array]

# Per-row arrays of a minibatch (`position_ids` is [3, R, L], the others [R, ...]).
ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask", "advantages", "old_logps",
            "sampler_logps")
# Sums (over tokens, sequences or the aggregation denominator) that add up over updates.
_SUM_KEYS = ("loss", "loss/pg", "loss/kl", "clip_frac", "clip_frac/low", "clip_frac/high", "clip_frac/dual",
             "ppo_kl", "kl", "ratio/mean", "denom", "tokens", "sequences", "entropy", "logp_abs_diff/old",
             "logp_abs_diff/sampler")


def compile_counts() -> dict[str, int]:
  """How many times each jitted GRPO function was traced (= compiled) in this process."""
  return dict(_COMPILES)


# ------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO hyper-parameters; defaults follow RECIPE.md §1 (MM-EUREKA's Qwen-7B script for what SPECS
  does not state). The demo config scales the sizes down.

  Rollout:
    group_size: G = n samples per prompt (8).
    prompts_per_step: B, prompts per step (128; train batch = rollout batch, fully on-policy).
    temperature, top_p, top_k: sampling (1.0, 1.0, 0). The log-probs of the update divide the logits
      by the same temperature (PEERS.md §3.3).
    max_response_len: max new tokens (10,240 in SPECS; MM-EUREKA 4,096).
  Advantages and filter:
    scale_std: divide by the group std (GRPO); False is Dr.GRPO's r − mean_g.
    batch_std: scale by the std over the whole (kept) batch instead of the group (TRL "batch").
    adv_eps: added to the std (1e-6, verl / tunix; MM-EUREKA 1e-9).
    prompts_per_call: prompts per sampler call in the rollout (0 = all; bounds the KV cache).
    filter_lower, filter_upper: keep groups whose mean accuracy is in [lower, upper] (MM-EUREKA
      0.1 / 0.9); both None disables the filter.
    dynamic_sampling: DAPO refill of dropped groups, at most max_sampling_rounds rounds per step.
  Loss:
    eps_low, eps_high: ratio clip [1 − eps_low, 1 + eps_high] (DAPO clip-higher 0.2 / 0.28).
    dual_clip_c: dual clip constant (> 1, verl 3.0; MM-EUREKA clamps the ratio at 3.0) or None.
    agg: "token-mean" (DAPO; MM-EUREKA --use_dapo), "seq-mean-token-mean", "seq-mean-token-sum",
      "seq-mean-token-sum-norm" (Dr.GRPO, divided by norm_length, default max_response_len: a
      constant, so the scale does not change with the completion bucket).
    kl_coef, kl_estimator: KL to a frozen reference (SPECS: none, 0.0; estimator k3 by default).
  Optimisation:
    learning_rate (1e-6), lr_schedule, warmup_steps, total_steps (optimizer updates), weight_decay,
    max_grad_norm: the optimizer (`optimizer_config()`).
    freeze_vision: the vision tower (incl. merger) is not trained (MM-EUREKA --freeze_prefix visual).
    ppo_epochs, minibatches: ppo_epochs × minibatches optimizer updates per step (1 × 1: on-policy).
    micro_batches: M, gradient accumulation inside a minibatch (memory only; same gradient).
    chunk_size: LM-head positions per chunk in the log-prob computation.
    recompute_old_logps: None = only when a step makes more than one update (module docstring);
      True forces the separate pass (e.g. to log `logp_abs_diff/old`).
    shuffle: shuffle rows before cutting minibatches (deterministic from the step's rng); whole
      groups when the prompt is shared.
    share_prompt: "auto" (default), True or False: run each group's G completions after one copy of
      its prompt (`forward.pack_units`, block attention): the prompt and its image tokens are
      computed once per group instead of G times, in the old log-prob pass and in every update.
      Same log-probs and gradients. auto = on for the xla / dot_product attentions when every
      micro-batch holds whole groups (prompts_per_step divisible by minibatches × micro_batches);
      True raises where that does not hold; never with splash (`steps.resolve_share_prompt`).
  """

  group_size: int = 8
  prompts_per_step: int = 128
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_response_len: int = 10240
  scale_std: bool = True
  batch_std: bool = False
  adv_eps: float = 1e-6
  prompts_per_call: int = 0
  filter_lower: float | None = 0.1
  filter_upper: float | None = 0.9
  dynamic_sampling: bool = False
  max_sampling_rounds: int = 4
  eps_low: float = 0.2
  eps_high: float = 0.28
  dual_clip_c: float | None = None
  agg: str = "token-mean"
  norm_length: int | None = None
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  learning_rate: float = 1e-6
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int = 1000
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  freeze_vision: bool = True
  ppo_epochs: int = 1
  minibatches: int = 1
  micro_batches: int = 1
  chunk_size: int = 256
  recompute_old_logps: bool | None = None
  shuffle: bool = True
  share_prompt: bool | str | None = "auto"

  def __post_init__(self):
    object.__setattr__(self, "share_prompt", parse_share_prompt(self.share_prompt, "GRPO share_prompt"))
    if self.group_size < 2:
      raise ValueError(f"group_size must be >= 2 (a group of one has no advantage), got {self.group_size}")
    for name in ("prompts_per_step", "max_response_len", "ppo_epochs", "minibatches", "micro_batches",
                 "chunk_size", "max_sampling_rounds"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 for GRPO sampling, got {self.temperature}")
    if not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"need 0 < top_p <= 1 and top_k >= 0, got {self.top_p}, {self.top_k}")
    if self.agg not in grpo.AGG_MODES:
      raise ValueError(f"agg must be one of {grpo.AGG_MODES}, got {self.agg!r}")
    if self.kl_estimator not in grpo.KL_ESTIMATORS:
      raise ValueError(f"kl_estimator must be one of {grpo.KL_ESTIMATORS}, got {self.kl_estimator!r}")
    if self.eps_low < 0 or self.eps_high < 0 or self.kl_coef < 0:
      raise ValueError(f"eps_low, eps_high and kl_coef must be >= 0, got {self.eps_low}, {self.eps_high}, "
                       f"{self.kl_coef}")
    if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
      raise ValueError(f"dual_clip_c must be > 1 (or None), got {self.dual_clip_c}")
    if (self.filter_lower is None) != (self.filter_upper is None):
      raise ValueError("set both filter_lower and filter_upper, or neither")
    if self.filter_lower is not None and not 0.0 <= self.filter_lower <= self.filter_upper <= 1.0:
      raise ValueError(f"need 0 <= filter_lower <= filter_upper <= 1, got {self.filter_lower}, {self.filter_upper}")
    if self.dynamic_sampling and self.filter_lower is None:
      raise ValueError("dynamic_sampling refills groups dropped by the online filter: set filter_lower/upper")
    if self.recompute_old_logps is False and self.updates_per_step > 1:
      raise ValueError(f"{self.updates_per_step} updates per step need the old log-probs: recompute_old_logps "
                       "must be True or None")

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any]) -> "GRPOConfig":
    """From a dict / ml_collections.ConfigDict; unknown keys raise (they are usually typos)."""
    return cls(**known_fields(cls, cfg, "GRPO"))

  @property
  def filter_bounds(self) -> tuple[float, float] | None:
    return None if self.filter_lower is None else (float(self.filter_lower), float(self.filter_upper))

  @property
  def updates_per_step(self) -> int:
    return self.ppo_epochs * self.minibatches

  def optimizer_config(self) -> OptimizerConfig:
    """The OptimizerConfig for `steps.init_train_state` (vision frozen per `freeze_vision`)."""
    return OptimizerConfig(learning_rate=self.learning_rate, schedule=self.lr_schedule,
                           total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                           frozen_prefixes=("visual",) if self.freeze_vision else ())

  def rollout_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `rollout.collect_rollouts` that this config decides."""
    return dict(n=self.group_size, max_new_tokens=self.max_response_len, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k, filter_bounds=self.filter_bounds,
                dynamic_sampling=self.dynamic_sampling, max_sampling_rounds=self.max_sampling_rounds,
                scale_std=self.scale_std, batch_std=self.batch_std, adv_eps=self.adv_eps,
                prompts_per_call=self.prompts_per_call)


# ------------------------------------------------------------------------------- the forward

def _gather_features(feats: jax.Array, image_index: jax.Array) -> jax.Array:
  """Unique image-token features → the order the model's `embed` consumes them.

  Args:
    feats: [M, D] merged image-token features of the unique prompts, in prompt order.
    image_index: [R, P] int32, the feature row of each prompt column's `<|image_pad|>`, −1 elsewhere.
  Returns:
    [R·P, D]: row k holds the features of the k-th `<|image_pad|>` of the rows in row-major order
    (`embed` gives the k-th image token row k); rows past the last image token are never read.
  """
  flat = image_index.reshape(-1)
  is_img = flat >= 0
  dest = jnp.where(is_img, jnp.cumsum(is_img) - 1, flat.shape[0])        # out of range: dropped
  src = jnp.zeros_like(flat).at[dest].set(flat, mode="drop")
  return jnp.take(feats, src, axis=0)


def completion_logps(model: Qwen2_5_VL, params: PyTree, rows: Mapping[str, jax.Array], feats: jax.Array | None,
                     *, temperature: float, chunk_size: int, compute_entropy: bool = False, copies: int = 1
                     ) -> tuple[jax.Array, jax.Array | None]:
  """Log-probs (and entropies) of the completion tokens under softmax(logits / temperature).

  Args:
    model, params: the policy.
    rows: input_ids, attention_mask [R, L]; position_ids [3, R, L]; loss_mask [R, C] (only its width
      C is used here: P = L − C); image_index [R, P] when `feats` is given.
    feats: [M, D] unique image-token features or None (text only).
    temperature: the sampling temperature.
    chunk_size: LM-head positions per chunk.
    copies: > 1 packs each run of `copies` consecutive rows (a group: same prompt columns) into one
      row [prompt | completion 1 | ... | completion K] (`forward.pack_units`); same outputs.
  Returns:
    logps [R, C] float32 (column t: log π(input_ids[:, P+t] | prefix)), entropy [R, C] or None.
  """
  ids = rows["input_ids"]
  length, c_len = ids.shape[1], rows["loss_mask"].shape[1]
  p_len = length - c_len
  if p_len < 1:
    raise ValueError(f"rows of length {length} leave no prompt column before the {c_len} completion columns")
  if copies > 1:
    if ids.shape[0] % copies:
      raise ValueError(f"{ids.shape[0]} rows do not split into groups of {copies}")
    packed = forward.pack_units(rows, p_len, copies)                                # [U, P + K·C]
    index = rows["image_index"][::copies] if feats is not None else None             # a group's prompt: once
    embeds = _gather_features(feats, index) if feats is not None else None
    hidden = model.apply({"params": params}, packed["input_ids"], packed["attention_mask"],
                         position_ids=packed["position_ids"], image_embeds=embeds, packing=(p_len, copies),
                         method="hidden_states")                                     # [U, P + K·C, D]
    predictors = forward.packed_predictors(hidden, p_len, copies)                    # [R, C, D]
  else:
    embeds = _gather_features(feats, rows["image_index"]) if feats is not None else None
    hidden = model.apply({"params": params}, ids, rows["attention_mask"], position_ids=rows["position_ids"],
                         image_embeds=embeds, method="hidden_states")               # [R, L, D]
    predictors = hidden[:, p_len - 1:length - 1]
  out = token_logprobs_from_hidden(predictors, lm_head_kernel(params, model.config),
                                   ids[:, p_len:], chunk_size=chunk_size, temperature=temperature,
                                   compute_entropy=compute_entropy)
  return out if compute_entropy else (out, None)


def make_encode_images_fn(model: Qwen2_5_VL) -> Callable[[PyTree, jax.Array, Mapping[str, jax.Array]], jax.Array]:
  """Jitted `(params, pixel_values [S·Q, 1176], vision) -> features [S·Q/m², D]` (prompt order);
  only `params["visual"]` is read."""
  @jax.jit
  def fn(params, pixel_values, vision):
    _COMPILES["encode_images"] += 1
    log.info("compiling GRPO encode_images: pixel_values %s", pixel_values.shape)
    return model.apply({"params": {"visual": params["visual"]}}, pixel_values, vision, method="encode_images")
  return fn


def make_old_logps_fn(model: Qwen2_5_VL, temperature: float = 1.0, chunk_size: int = 256, copies: int = 1
                      ) -> Callable[[PyTree, Mapping[str, jax.Array], jax.Array | None], jax.Array]:
  """Jitted `(params, rows, feats) -> logps [R, C]` float32: completion log-probs under
  softmax(logits / temperature), no gradient — the old (or reference) policy's log-probs.

  `rows`, `feats` and `copies` (groups packed around their prompt) as in `completion_logps`.
  Compiles once per (R, L, C, feats shape).
  """
  @jax.jit
  def fn(params, rows, feats):
    _COMPILES["old_logps"] += 1
    log.info("compiling GRPO old_logps: input_ids %s, completion %s", rows["input_ids"].shape,
             rows["loss_mask"].shape)
    logps, _ = completion_logps(model, params, rows, feats, temperature=temperature, chunk_size=chunk_size,
                                copies=copies)
    return logps
  return fn


# -------------------------------------------------------------------------------- the update

def _micro_split(rows: Mapping[str, jax.Array], m: int, mesh: Mesh | None, copies: int = 1) -> dict[str, jax.Array]:
  """[R, ...] → [M, R/M, ...] (micro-batch j holds rows j, j+M, ...: a strided split, so rows sharded
  over the batch axes feed every micro-batch); position_ids [3, R, L] → [M, 3, R/M, L]. With
  `copies` > 1 the split is over groups of `copies` consecutive rows, which stay whole and in order."""
  out = {}
  for k, x in rows.items():
    if k == "position_ids":
      x = jnp.moveaxis(x, 1, 0)
    r = x.shape[0]
    x = jnp.swapaxes(x.reshape(r // (m * copies), m, copies, *x.shape[1:]), 0, 1).reshape(m, r // m, *x.shape[1:])
    if k == "position_ids":
      x = jnp.moveaxis(x, 2, 1)
    if mesh is not None:
      dim = 2 if k == "position_ids" else 1
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_lib.batch_partition_spec(x.shape, mesh, dim)))
    out[k] = x
  return out


def packing_copies(model: Qwen2_5_VL, cfg: GRPOConfig) -> int:
  """G when the update and old log-prob passes pack each group around its prompt
  (`GRPOConfig.share_prompt`), else 1. Packing needs every micro-batch to hold whole groups:
  prompts_per_step divisible by minibatches × micro_batches."""
  if not resolve_share_prompt(model, cfg.share_prompt):
    return 1
  split = cfg.minibatches * cfg.micro_batches
  if cfg.prompts_per_step % split:
    if cfg.share_prompt:
      raise ValueError(f"share_prompt=True needs whole groups per micro-batch: prompts_per_step "
                       f"{cfg.prompts_per_step} does not split into minibatches × micro_batches = {split}")
    log.info("GRPO share_prompt off: %d prompts do not split into %d micro-batches of whole groups",
             cfg.prompts_per_step, split)
    return 1
  return cfg.group_size


def make_grpo_update(model: Qwen2_5_VL, cfg: GRPOConfig, *, mesh: Mesh | None = None,
                     state_sharding: PyTree | None = None, donate: bool = True) -> Callable:
  """A jitted GRPO update: one optimizer step on one minibatch.

  `update(state, rows, vision_inputs, first) -> (state, metrics)`:
    rows: ROW_KEYS arrays of R rows (+ "image_index" [R, P] with images, + "ref_logps" [R, C] when
      kl_coef > 0): loss_mask [R, C] (completion tokens of kept groups), advantages [R],
      old_logps [R, C] (ignored when `first`), sampler_logps [R, C] (for a metric only).
    vision_inputs: {} (text only), {"image_embeds": [M, D]} (frozen tower, precomputed), or
      {"pixel_values", "vision"} (trainable tower, differentiated through `jax.vjp`).
    first: bool scalar array; True for the step's first update, which takes old = stop_gradient(log π_θ)
      (ratio exactly 1). An array, not a static value: no recompilation.
  The state is donated. Metrics are additive sums (`_SUM_KEYS`, see `grpo.policy_loss_terms`; plus
  "entropy" and the log-prob gaps to the old and sampler log-probs, token sums) and per-update values
  l2_grads (trainable, before clipping), l2_updates, l2_params, learning_rate, nonfinite_updates and
  nonfinite_in_a_row (an update with a NaN / inf loss or gradient is skipped and counted,
  `state.skip_nonfinite`).

  Args:
    model: the policy module.
    cfg: GRPOConfig (loss, temperature, micro_batches, frozen prefixes, schedule).
    mesh, state_sharding: with a mesh, the state keeps `state_sharding` (from `steps.init_train_state`)
      and micro-batch rows are constrained to the batch axes.
    donate: donate the input state's buffers.
  """
  opt_cfg = cfg.optimizer_config()
  copies = packing_copies(model, cfg)
  frozen_prefixes = effective_frozen_prefixes(opt_cfg, cfg.freeze_vision)
  schedule = make_schedule(opt_cfg)
  norm_length = cfg.norm_length if cfg.norm_length is not None else cfg.max_response_len
  loss_kw = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, agg=cfg.agg, kl_coef=cfg.kl_coef,
                 kl_estimator=cfg.kl_estimator, dual_clip_c=cfg.dual_clip_c, norm_length=norm_length)

  def encode(visual: PyTree, vision_inputs: Mapping[str, Any]) -> jax.Array:
    return model.apply({"params": {"visual": visual}}, vision_inputs["pixel_values"], vision_inputs["vision"],
                       method="encode_images")

  def impl(state: TrainState, rows: dict[str, jax.Array], vision_inputs: dict[str, Any], first: jax.Array):
    _COMPILES["grpo_update"] += 1
    log.info("compiling GRPO update: input_ids %s, completion %s, vision %s, micro_batches %d",
             rows["input_ids"].shape, rows["loss_mask"].shape, sorted(vision_inputs), cfg.micro_batches)
    micro = _micro_split(rows, cfg.micro_batches, mesh, copies)
    trainable, frozen = partition_params(state.params, frozen_prefixes)
    vis_train = {k: v for k, v in trainable.items() if k[0] == "visual"}
    text_train = {k: v for k, v in trainable.items() if k[0] != "visual"}
    feats_const = feats_arg = vjp_fn = None
    if "image_embeds" in vision_inputs:
      if vis_train:
        raise ValueError("precomputed image_embeds with a trainable vision tower: pass pixel_values instead")
      feats_const = jax.lax.stop_gradient(vision_inputs["image_embeds"])
    elif "pixel_values" in vision_inputs:
      vis_frozen = {k[1:]: v for k, v in frozen.items() if k[0] == "visual"}
      if vis_train:
        feats_arg, vjp_fn = jax.vjp(
            lambda vt: encode(merge_params({k[1:]: v for k, v in vt.items()}, vis_frozen), vision_inputs), vis_train)
      else:
        feats_const = jax.lax.stop_gradient(encode(merge_params(vis_frozen), vision_inputs))

    def loss_terms(diff, mb):
      text_params, feats = diff
      params = merge_params(text_params, vis_train, frozen)
      logps, entropy = completion_logps(model, params, mb, feats if feats is not None else feats_const,
                                        temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                                        compute_entropy=True, copies=copies)
      mask = mb["loss_mask"].astype(jnp.float32)
      # Before the first update π_old = π_θ: taking old from this very forward makes ρ exactly 1.
      old = jnp.where(first, jax.lax.stop_gradient(logps), mb["old_logps"])
      loss_sum, denom, sums = grpo.policy_loss_terms(logps, old, mb["advantages"], mask,
                                                     ref_logps=mb.get("ref_logps"), **loss_kw)
      lp = jax.lax.stop_gradient(logps)
      tok = lambda x: jnp.sum(x * mask)
      sums = sums | {"entropy": tok(entropy), "logp_abs_diff/old": tok(jnp.abs(lp - mb["old_logps"])),
                     "logp_abs_diff/sampler": tok(jnp.abs(lp - mb["sampler_logps"]))}
      return loss_sum, denom, sums

    loss, (g_text, g_feats), sums = accumulate_gradients(loss_terms, (text_train, feats_arg), micro)
    g_vis = vjp_fn(g_feats)[0] if vjp_fn is not None else {}
    g_trainable = {**g_text, **g_vis}
    grads = merge_params(g_trainable, jax.tree.map(jnp.zeros_like, frozen))
    # A NaN / inf loss or gradient skips the update (params and moments unchanged) and is counted.
    lr = jnp.asarray(schedule(applied_updates(state)), jnp.float32)
    state, updates, counts = apply_gradients_checked(state, grads, loss)
    metrics = {k: sums[k] for k in _SUM_KEYS} | counts | {
        "l2_grads": global_norm(g_trainable), "l2_updates": global_norm(updates),
        "l2_params": global_norm(state.params),
        "learning_rate": lr}
    return state, metrics

  kw: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_sharding is not None:
    if mesh is None:
      raise ValueError("state_sharding needs the mesh it was built for")
    kw["out_shardings"] = (state_sharding, mesh_lib.replicated(mesh))
  update = jax.jit(impl, **kw)
  update.copies = copies  # type: ignore[attr-defined]
  return update


@dataclasses.dataclass(frozen=True)
class GRPOFunctions:
  """The jitted functions of one (model, config); build once per stage so that they compile once
  per bucket. `copies`: G when groups are packed around their prompt (`packing_copies`), else 1."""

  encode_images: Callable
  old_logps: Callable
  update: Callable
  copies: int = 1


def make_grpo_functions(model: Qwen2_5_VL, cfg: GRPOConfig, *, mesh: Mesh | None = None,
                        state_sharding: PyTree | None = None, donate: bool = True) -> GRPOFunctions:
  """`make_encode_images_fn`, `make_old_logps_fn` (at cfg.temperature) and `make_grpo_update`."""
  update = make_grpo_update(model, cfg, mesh=mesh, state_sharding=state_sharding, donate=donate)
  return GRPOFunctions(encode_images=make_encode_images_fn(model),
                       old_logps=make_old_logps_fn(model, cfg.temperature, cfg.chunk_size, update.copies),
                       update=update, copies=update.copies)


# ------------------------------------------------------------------------------ the train step

def _take_rows(rows: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
  return {k: (v[:, idx] if k == "position_ids" else v[idx]) for k, v in rows.items()}


def _put(x: Any, mesh: Mesh | None, replicate: bool = False, global_rows: bool = False) -> Any:
  """Rows (or, with `replicate`, the vision inputs) onto the mesh: this host's rows
  (`host_local_to_global`), or, with `global_rows`, the whole batch that every host holds."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, x)
  if global_rows:
    if replicate:
      return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), mesh_lib.replicated(mesh),
                                                                 lambda idx: np.asarray(a)[idx]), x)
    return mesh_lib.global_batch_to_mesh(x, mesh)
  if replicate:
    return jax.device_put(x, mesh_lib.replicated(mesh))
  return mesh_lib.host_local_to_global(x, mesh)


def _chunked_logps(fn: Callable, params: PyTree, rows: Mapping[str, np.ndarray], feats: jax.Array | None,
                   chunk_rows: int, mesh: Mesh | None, global_rows: bool = False) -> np.ndarray:
  """fn over consecutive chunks of `chunk_rows` rows (one compiled shape) → [N, C] numpy."""
  n = rows["input_ids"].shape[0]
  keys = ("input_ids", "attention_mask", "position_ids", "loss_mask") + (("image_index",) if feats is not None else ())
  outs = []
  for s in range(0, n, chunk_rows):
    chunk = _take_rows({k: rows[k] for k in keys}, np.arange(s, s + chunk_rows))
    outs.append(fn(params, _put(chunk, mesh, global_rows=global_rows), feats))
  return np.concatenate(mesh_lib.to_host(outs), axis=0)


def _finalize(sums: Mapping[str, float]) -> dict[str, float]:
  out = {k: float(v) for k, v in grpo.finalize_metrics({k: jnp.asarray(sums[k]) for k in _SUM_KEYS}).items()}
  tokens = max(float(sums["tokens"]), 1.0)
  for k in ("entropy", "logp_abs_diff/old", "logp_abs_diff/sampler"):
    out[k] = float(sums[k]) / tokens
  return out


_WARNED: set[tuple[int, int]] = set()


def _check_rollout(rollout: RolloutBatch, cfg: GRPOConfig, mesh: Mesh | None) -> int:
  """Returns R (rows per minibatch) after checking that the rows split evenly."""
  n = rollout.num_rows
  if n % cfg.minibatches:
    raise ValueError(f"{n} rollout rows do not split into minibatches={cfg.minibatches}")
  r = n // cfg.minibatches
  if r % cfg.micro_batches:
    raise ValueError(f"{r} rows per minibatch do not split into micro_batches={cfg.micro_batches}")
  if mesh is not None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if (r // cfg.micro_batches) % dp and (r, dp) not in _WARNED:
      _WARNED.add((r, dp))
      log.warning("%d rows per micro-batch do not split over %d data-parallel devices: rows are replicated "
                  "on the axes that do not divide", r // cfg.micro_batches, dp)
  sampling = rollout.sampling.get("temperature")
  if sampling is not None and abs(sampling - cfg.temperature) > 1e-6:
    raise ValueError(f"the rollout was sampled at temperature {sampling} but the step's log-probs use "
                     f"{cfg.temperature}: the ratio would compare different distributions")
  return r


def _check_packable(rows: Mapping[str, np.ndarray], rollout: RolloutBatch, copies: int, chunk_rows: int) -> None:
  """Packing groups around their prompt needs groups of `copies` consecutive rows with equal prompt
  columns, whole in every micro-batch; a rollout that breaks this is an error naming the group."""
  if rollout.group_size != copies:
    raise ValueError(f"the GRPO functions pack groups of {copies} but the rollout has group_size "
                     f"{rollout.group_size}; build them with the rollout's GRPOConfig")
  if chunk_rows % copies:
    raise ValueError(f"{chunk_rows} rows per micro-batch do not hold whole groups of {copies}: set "
                     f"share_prompt=False or make prompts_per_step divisible by minibatches × micro_batches")
  p = rollout.input_ids.shape[1] - rollout.completion_len
  for key in ("input_ids", "attention_mask", "position_ids", "image_index"):
    if key not in rows:
      continue
    x = rows[key] if key != "position_ids" else np.moveaxis(rows[key], 0, 1)     # [N, (3,) L]
    x = x[:, ..., :p] if key != "image_index" else x
    g = x.reshape(x.shape[0] // copies, copies, *x.shape[1:])
    bad = np.any(g != g[:, :1], axis=tuple(range(2, g.ndim)))
    if bad.any():
      u, k = (int(v[0]) for v in np.nonzero(bad))
      raise ValueError(f"share_prompt: row {u * copies + k} of group {u} has other prompt columns than the "
                       f"group's first row ({key}); pass share_prompt=False for such rollouts")


def grpo_train_step(state: TrainState, rollout: RolloutBatch, cfg: GRPOConfig, rng: jax.Array, *,
                    fns: GRPOFunctions, ref_params: PyTree | None = None, mesh: Mesh | None = None,
                    global_rows: bool = False) -> tuple[TrainState, dict[str, float]]:
  """`cfg.ppo_epochs` × `cfg.minibatches` GRPO updates on one rollout batch (module docstring).

  Args:
    state: the train state (donated to the update: do not reuse the argument afterwards).
    rollout: from `rollout.collect_rollouts` with this cfg's `rollout_kwargs()`.
    cfg: GRPOConfig.
    rng: PRNG key of this step; minibatch permutations use `fold_in(rng, epoch)` (deterministic).
    fns: `make_grpo_functions(model, cfg, ...)`, built once.
    ref_params: the frozen reference policy; required when cfg.kl_coef > 0.
    mesh: put the rows on this mesh (split over the batch axes, vision inputs replicated).
    global_rows: every host passes the whole rollout (the pipeline's stages: batches are functions
      of the step, and the sampler returns all rows to every host); default: each host passes its
      own rows (`parallel.host_local_to_global`).

  Returns:
    (state, metrics) with floats: loss, loss/pg, loss/kl (aggregated over all updates: Σ numerators /
    Σ denominators), clip_frac (+ /low, /high, /dual), ppo_kl, kl, ratio/mean, entropy (token means),
    logp_abs_diff/sampler (mean |log π_θ − the sampler's log-prob|), logp_abs_diff/old (vs the
    recomputed old log-probs, only when recomputed), tokens, sequences, denom (sums over updates),
    first_update/{clip_frac, ppo_kl, ratio/mean, kl, logp_abs_diff/old}, l2_grads (mean over
    updates), l2_grads_max, l2_updates, l2_params, learning_rate (last update), updates,
    skipped_updates, old_logps_recomputed, time/logps_s, time/update_s.

  Raises:
    ValueError: rows that do not split into minibatches / micro-batches, a missing ref_params, or a
      rollout sampled at another temperature.
  """
  r = _check_rollout(rollout, cfg, mesh)
  if cfg.kl_coef > 0 and ref_params is None:
    raise ValueError("kl_coef > 0 needs ref_params (the frozen reference policy)")
  n, c_len = rollout.num_rows, rollout.completion_len
  rows: dict[str, np.ndarray] = {
      "input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
      "position_ids": rollout.position_ids, "loss_mask": rollout.loss_mask.astype(np.float32),
      "advantages": rollout.advantages.astype(np.float32), "sampler_logps": rollout.sampler_logps,
  }
  if rollout.has_images:
    rows["image_index"] = rollout.image_index
  chunk_rows = r // cfg.micro_batches
  copies = fns.copies
  if copies > 1:
    _check_packable(rows, rollout, copies, chunk_rows)

  recompute = cfg.recompute_old_logps if cfg.recompute_old_logps is not None else cfg.updates_per_step > 1
  t0 = time.perf_counter()
  feats = ref_feats = None
  vision_inputs: dict[str, Any] = {}
  if rollout.has_images:
    pv = _put(rollout.pixel_values, mesh, True, global_rows)
    vision = _put(rollout.vision, mesh, True, global_rows)
    if cfg.freeze_vision or recompute:
      feats = fns.encode_images(state.params, pv, vision)
    # A frozen tower's features are constants of the step; a trainable one is re-encoded per update.
    vision_inputs = {"image_embeds": feats} if cfg.freeze_vision else {"pixel_values": pv, "vision": vision}
    if cfg.kl_coef > 0:
      ref_feats = fns.encode_images(ref_params, pv, vision)
  if recompute:
    rows["old_logps"] = _chunked_logps(fns.old_logps, state.params, rows, feats, chunk_rows, mesh, global_rows)
  else:
    rows["old_logps"] = np.zeros((n, c_len), np.float32)     # unused: the only update takes old = π_θ
  if cfg.kl_coef > 0:
    rows["ref_logps"] = _chunked_logps(fns.old_logps, ref_params, rows, ref_feats, chunk_rows, mesh, global_rows)
  logps_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  history, skipped, first = [], 0, True
  for epoch in range(cfg.ppo_epochs):
    if not cfg.shuffle:
      perm = np.arange(n)
    elif copies > 1:       # whole groups, each in its row order
      groups = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), n // copies))
      perm = (groups[:, None] * copies + np.arange(copies)).reshape(-1)
    else:
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), n))
    for k in range(cfg.minibatches):
      mb = _take_rows(rows, perm[k * r:(k + 1) * r])
      if not mb["loss_mask"].any():
        skipped += 1
        continue
      state, m = fns.update(state, _put(mb, mesh, global_rows=global_rows), vision_inputs, jnp.asarray(first))
      history.append(m)
      first = False
  history = mesh_lib.to_host(history)
  update_s = time.perf_counter() - t0

  metrics: dict[str, float] = {"updates": float(len(history)), "skipped_updates": float(skipped),
                               "old_logps_recomputed": float(recompute), "time/logps_s": logps_s,
                               "time/update_s": update_s}
  if history:
    sums = {k: sum(float(h[k]) for h in history) for k in _SUM_KEYS}
    metrics |= _finalize(sums) | {k: float(sums[k]) for k in ("tokens", "sequences", "denom")}
    first_m = _finalize({k: float(history[0][k]) for k in _SUM_KEYS})
    metrics |= {f"first_update/{k}": first_m[k] for k in ("clip_frac", "ppo_kl", "ratio/mean", "kl")}
    # |recomputed old − the first update's own forward|: same params, two XLA programs.
    old_gap = metrics.pop("logp_abs_diff/old")
    if recompute:
      metrics["first_update/logp_abs_diff/old"] = first_m["logp_abs_diff/old"]
      metrics["logp_abs_diff/old"] = old_gap
    grad_norms = [float(h["l2_grads"]) for h in history]
    metrics |= {"l2_grads": float(np.mean(grad_norms)), "l2_grads_max": float(np.max(grad_norms)),
                "l2_updates": float(history[-1]["l2_updates"]), "l2_params": float(history[-1]["l2_params"]),
                "learning_rate": float(history[-1]["learning_rate"])}
  # From the state, so a step whose minibatches were all empty still reports them.
  metrics |= {k: float(v) for k, v in mesh_lib.to_host(nonfinite_counts(state)).items()}
  return state, metrics
