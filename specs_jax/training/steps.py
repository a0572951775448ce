"""Jitted train steps that run the model: DPO(+λ·SFT) and SFT, and the reference log-prob pass.

    state, shardings = steps.init_train_state(params, opt_cfg, jax.random.key(0), mesh=mesh)
    logps_fn = steps.make_logps_fn(model)                          # once, before training
    ref_c, ref_r = steps.reference_logps(logps_fn, ref_params, batch_without_ref)
    dpo_step = steps.make_dpo_step(model, opt_cfg, beta=0.1, sft_weight=1.0, micro_batches=2,
                                   mesh=mesh, state_sharding=shardings)
    state, metrics = dpo_step(state, batch)                        # batch from batches.collate_dpo

Batches are the dicts of `batches.py` (see its docstring for shapes). Row layout: a DPO batch has
`row_groups` = G blocks of [b chosen rows, b rejected rows] (B = G·b pairs). G = 1 is the usual
[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]; when every host collates its own pairs and
`parallel.host_local_to_global` concatenates them, G = jax.process_count(). (Vision inputs are
replicated, not split by rows, so per-host collation is only correct for text-only batches for now:
with images, every host must pass the same global patch array; see `parallel.mesh`.)

Inside the step (all in one `jax.jit`, the train state donated):
  1. Rows are reordered pair-major ([c_0, r_0, c_1, r_1, ...]) and split into M micro-batches,
     micro-batch m holding pairs m, m+M, m+2M, ... (a strided split: each device's rows feed every
     micro-batch, so a batch sharded over ("data", "fsdp") keeps all devices busy in every one).
  2. The vision tower runs ONCE on the batch's patches (each pair's images are stored once). The
     image features are gathered for both rows of a pair by index (`forward.image_sources`), so the
     rejected row never re-encodes its images. A frozen tower ("visual" in the frozen prefixes,
     the default) runs under `stop_gradient`; a trainable one is differentiated with one `jax.vjp`
     after the micro-batch loop, with the accumulated cotangent of its features.
  3. `accumulate_gradients` scans the micro-batches: the text decoder gives final hidden states,
     `token_logprobs_from_hidden` the completion log-probs in chunks of `chunk_size` positions
     (only columns P-1 .. L-2, which predict completion tokens), and the loss is returned as
     (Σ per-pair loss, Σ pair weight), so the result equals the full-batch loss exactly.
  4. Frozen parameters are not differentiated at all (closed over, not arguments of grad): no
     backward weight-gradient matmuls and no accumulators for them; the optimizer gets zeros there.

`compile_counts()` counts XLA compilations per function (as `sampling.compile_counts()`, but from
JAX's compile event, so recompilations without a retrace count too).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from specs_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from specs_jax.parallel import sharding as sharding_lib
from specs_jax.training import dpo, forward, sft
from specs_jax.training.forward import PAIR_KEYS
from specs_jax.training.logprobs import sequence_logps
from specs_jax.training.state import (OptimizerConfig, TrainState, accumulate_gradients, applied_updates,
                                      apply_gradients_checked, create_train_state, global_norm, make_optimizer,
                                      make_schedule)

__all__ = [
    "DEFAULT_FROZEN_PREFIXES",
    "compile_counts",
    "dpo_loss_and_grads",
    "effective_frozen_prefixes",
    "init_train_state",
    "make_dpo_step",
    "make_logps_fn",
    "make_sft_step",
    "reference_logps",
]

log = logging.getLogger(__name__)

DEFAULT_FROZEN_PREFIXES = ("visual",)

_COMPILES: collections.Counter = collections.Counter()
_TRACES: collections.Counter = collections.Counter()      # fallback if the compile event is unavailable

PyTree = Any
Flat = dict[tuple[str, ...], jax.Array]


def compile_counts() -> dict[str, int]:
  """How many XLA compilations each jitted function ("dpo_step", "sft_step", "logps") has caused in
  this process. Counted from JAX's backend-compile monitoring event while the function runs, so a
  recompilation without a retrace (same shapes, different input shardings or committedness) counts
  too; falls back to counting traces if the event is unavailable."""
  return dict(_COMPILES)


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_ACTIVE = threading.local()
_LISTENING: list[bool] = []


def _on_duration_event(event: str, duration: float, **kwargs: Any) -> None:
  name = getattr(_ACTIVE, "name", None)
  if event == _BACKEND_COMPILE_EVENT and name is not None:
    _COMPILES[name] += 1


def _listen() -> bool:
  if not _LISTENING:
    try:
      jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
      _LISTENING.append(True)
    except Exception:  # noqa: BLE001 - an older / newer JAX without the hook: count traces instead
      log.warning("jax.monitoring listener unavailable: compile_counts() counts traces")
      _LISTENING.append(False)
  return _LISTENING[0]


def _counted(jitted: Callable, name: str) -> Callable:
  """Calls `jitted`, attributing the XLA compilations that happen meanwhile to `name`."""
  listening = _listen()

  def call(*args):
    prev, _ACTIVE.name = getattr(_ACTIVE, "name", None), name
    try:
      return jitted(*args)
    finally:
      _ACTIVE.name = prev
      if not listening:
        _COMPILES[name] = _TRACES[name]
  return call


# ------------------------------------------------------------------------------ state and freezing

def _as_opt_config(optimizer: OptimizerConfig | Mapping[str, Any] | None) -> OptimizerConfig | None:
  if optimizer is None or isinstance(optimizer, OptimizerConfig):
    return optimizer
  return OptimizerConfig.from_mapping(optimizer)


def resolve_share_prompt(model: Qwen2_5_VL, share_prompt: bool | None) -> bool:
  """None (auto): pack chosen and rejected rows around one shared prompt with the attentions it is
  tested with ("xla", "dot_product"). Not with "cudnn" unless asked (its boolean-mask path is not
  verified on a GPU yet) and never with splash (the kernel takes segment ids, not the packed blocks'
  prefix + own-block masks)."""
  impl = model.config.attention_impl
  splash = impl == "splash"
  if share_prompt is None:
    return impl in ("xla", "dot_product")
  if share_prompt and splash:
    raise ValueError("share_prompt=True needs a dense-mask attention (xla, dot_product, cudnn), not splash")
  return bool(share_prompt)


def parse_share_prompt(value: Any, what: str = "share_prompt") -> bool | None:
  """A config's share_prompt: "auto" or None → None (`resolve_share_prompt` decides), or a boolean
  (also "true" / "false" / "on" / "off" / "1" / "0")."""
  if value is None or isinstance(value, bool):
    return value
  v = str(value).strip().lower()
  if v == "auto":
    return None
  if v in ("true", "1", "yes", "on"):
    return True
  if v in ("false", "0", "no", "off"):
    return False
  raise ValueError(f"{what} must be auto, true or false, got {value!r}")


def _step_setup(model: Qwen2_5_VL, optimizer, freeze_vision: bool, chunk_size: int, share_prompt: bool | None = False):
  """(frozen prefixes, lr schedule or None, forward helper) shared by the step factories."""
  cfg = _as_opt_config(optimizer)
  schedule = make_schedule(cfg) if cfg is not None else None
  fwd = forward.Forward(model, chunk_size, share_prompt=resolve_share_prompt(model, share_prompt))
  return effective_frozen_prefixes(cfg, freeze_vision), schedule, fwd


def effective_frozen_prefixes(optimizer: OptimizerConfig | Mapping[str, Any] | None,
                              freeze_vision: bool = True) -> tuple[str, ...]:
  """The optimizer's frozen prefixes, plus "visual" when `freeze_vision` (the recipe's default, as
  MM-EUREKA's `--freeze_prefix visual`). Steps and `init_train_state` both use this, so the step's
  `stop_gradient` and the optimizer's `set_to_zero` always agree."""
  cfg = _as_opt_config(optimizer)
  out = tuple(cfg.frozen_prefixes) if cfg is not None else ()
  if freeze_vision and "visual" not in out:
    out += ("visual",)
  return out


def init_train_state(params: PyTree, optimizer: OptimizerConfig | Mapping[str, Any], rng: jax.Array, *,
                     freeze_vision: bool = True, mesh: Mesh | None = None
                     ) -> tuple[TrainState, PyTree | None]:
  """A step-0 TrainState whose optimizer freezes `effective_frozen_prefixes(optimizer, freeze_vision)`.

  Args:
    params: the params pytree (may already be sharded, e.g. loaded with `sharding.sharding_fn`).
    optimizer: OptimizerConfig (or mapping).
    rng: PRNG key stored in the state.
    freeze_vision: add "visual" to the frozen prefixes.
    mesh: if given, the state is created directly with `parallel.state_shardings` (params and Adam
      moments sharded alike) inside a jit.
  The state holds `params` themselves (no copy), and the steps donate the state: after the first
  step the caller's `params` arrays are deleted. Copy them first if they are still needed (e.g. as
  the frozen reference; better, run the reference pass before training).
  Returns:
    (state, state_sharding); state_sharding is None without a mesh. Pass it to the step factories.
  """
  cfg = _as_opt_config(optimizer)
  cfg = dataclasses.replace(cfg, frozen_prefixes=effective_frozen_prefixes(cfg, freeze_vision))
  tx = _optimizer_for(cfg, jax.tree.structure(params))
  create = lambda p, r: create_train_state(p, tx, r)
  if mesh is None:
    # Committed to one device, as a restored checkpoint is: jit keys its executables on
    # committedness, so an uncommitted fresh state and a restored one would compile twice.
    return jax.device_put(create(params, rng), jax.local_devices()[0]), None
  shardings = sharding_lib.state_shardings(jax.eval_shape(create, params, rng), mesh)
  state = jax.jit(create, out_shardings=shardings)(params, rng)
  return state, shardings


@functools.lru_cache(maxsize=32)
def _optimizer_for(cfg: OptimizerConfig, treedef: Any) -> optax.GradientTransformation:
  """`make_optimizer`, memoised on (config, param tree structure). The tx is static metadata of the
  TrainState pytree and jit compares it by identity, so every state built for the same config (a
  fresh start, a restore, a test's second run) must share one tx object, or the step recompiles."""
  return make_optimizer(cfg, jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves))


def _is_under(path: str, prefix: str) -> bool:
  prefix = prefix.strip("/")
  return path == prefix or path.startswith(prefix + "/")


def partition_params(params: PyTree, frozen_prefixes: Sequence[str]) -> tuple[Flat, Flat]:
  """(trainable, frozen) flat dicts {path tuple: leaf}."""
  flat = traverse_util.flatten_dict(params)
  frozen = {k: v for k, v in flat.items() if any(_is_under("/".join(k), p) for p in frozen_prefixes)}
  return {k: v for k, v in flat.items() if k not in frozen}, frozen


def merge_params(*flats: Flat) -> PyTree:
  """Inverse of `partition_params`: flat dicts back into one params tree."""
  out: Flat = {}
  for f in flats:
    out.update(f)
  return traverse_util.unflatten_dict(out)


def _row_counts(mb: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Real tokens (prompt + completion), completion tokens, and padded positions (rows × L)."""
  return {"tokens": jnp.sum(mb["attention_mask"]).astype(jnp.float32),
          "completion_tokens": jnp.sum(mb["completion_mask"]).astype(jnp.float32),
          "padded_tokens": jnp.float32(mb["attention_mask"].size)}


COUNT_METRICS = ("tokens", "completion_tokens", "padded_tokens", "denom")


def _loss_and_grads(fwd: forward.Forward, params: PyTree, batch: Mapping[str, Any], terms_fn: Callable, *,
                    frozen_prefixes: Sequence[str], copies: int, row_groups: int, micro_batches: int,
                    prompt_len: int, mesh: Mesh | None) -> tuple[jax.Array, PyTree, dict[str, jax.Array]]:
  """Loss, full-tree grads (zeros on frozen params) and summed metrics; see the module docstring."""
  rows = forward.prepare_rows(batch, copies, row_groups, micro_batches, fwd.model.config.image_token_id)
  mbs = forward.constrain(rows, mesh)
  trainable, frozen = partition_params(params, frozen_prefixes)
  vis_train = {k: v for k, v in trainable.items() if k[0] == "visual"}
  text_train = {k: v for k, v in trainable.items() if k[0] != "visual"}
  vis_all = {k[1:]: v for k, v in {**trainable, **frozen}.items() if k[0] == "visual"}

  feats_const, vjp_fn, feats_arg = None, None, None
  if "pixel_values" in batch:
    if vis_train:
      vis_frozen = {k[1:]: v for k, v in frozen.items() if k[0] == "visual"}
      encode = lambda vt: fwd.encode_images(merge_params({k[1:]: v for k, v in vt.items()}, vis_frozen), batch)
      feats_arg, vjp_fn = jax.vjp(encode, vis_train)
    else:
      feats_const = jax.lax.stop_gradient(fwd.encode_images(traverse_util.unflatten_dict(vis_all), batch))

  def loss_terms(diff, mb):
    text_params, feats = diff
    params_mb = merge_params(text_params, vis_train, frozen)
    logps, mask = fwd.token_logps(params_mb, mb, feats if feats is not None else feats_const, prompt_len, copies)
    loss_sum, denom, metrics = terms_fn(logps, mask, mb)
    return loss_sum, denom, metrics | _row_counts(mb)

  loss, (g_text, g_feats), metrics = accumulate_gradients(loss_terms, (text_train, feats_arg), mbs)
  g_vis = vjp_fn(g_feats)[0] if vjp_fn is not None else jax.tree.map(jnp.zeros_like, vis_train)
  grads_trainable = {**g_text, **g_vis}
  grads = merge_params(grads_trainable, jax.tree.map(jnp.zeros_like, frozen))
  metrics = metrics | {"l2_grads": global_norm(grads_trainable)}
  return loss, grads, metrics


def _finish_metrics(loss: jax.Array, metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Additive sums → weighted means (÷ denom), except counts and norms."""
  den = jnp.where(metrics["denom"] > 0, metrics["denom"], 1.0)
  out = {k: (v if k in COUNT_METRICS or k.startswith("l2_") else v / den) for k, v in metrics.items()}
  return out | {"loss": loss}


def _apply(state: TrainState, grads: PyTree, metrics: dict[str, jax.Array],
           schedule: optax.Schedule | None) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer update; one with a NaN / inf loss or gradient is skipped (params unchanged) and
  counted (`state.apply_gradients_checked`). The lr is the schedule at the applied-update count."""
  lr_step = applied_updates(state)
  new, updates, counts = apply_gradients_checked(state, grads, metrics["loss"])
  metrics = metrics | counts | {"l2_updates": global_norm(updates), "l2_params": global_norm(new.params)}
  if schedule is not None:
    metrics["learning_rate"] = jnp.asarray(schedule(lr_step), jnp.float32)
  return new, metrics


def _check_divisible(units: int, row_groups: int, micro_batches: int, what: str) -> None:
  if units % row_groups:
    raise ValueError(f"{units} {what} do not split into row_groups={row_groups}")
  if units % micro_batches:
    raise ValueError(f"{units} {what} do not split into micro_batches={micro_batches}")


def _jit_step(impl: Callable, state_sharding: PyTree | None, donate: bool) -> Callable:
  # prompt_len is static and positional (jit rejects keyword arguments once in_shardings is given).
  kw: dict[str, Any] = {"static_argnums": (2,), "donate_argnums": (0,) if donate else ()}
  if state_sharding is not None:
    kw |= {"in_shardings": (state_sharding, None), "out_shardings": (state_sharding, None)}
  return jax.jit(impl, **kw)


# ------------------------------------------------------------------------------------ DPO step

def _dpo_terms(**loss_kw) -> Callable:
  """(token logps [R, T], mask [R, T], micro-batch) -> (Σ weighted per-pair loss, Σ weight, metric sums).
  Rows are pair-major: row 2i is pair i's chosen response, row 2i+1 its rejected one."""
  def terms(logps, mask, mb):
    seq, lengths = sequence_logps(logps, mask)
    seq, lengths = seq.reshape(-1, 2), lengths.reshape(-1, 2)                 # [b, (chosen, rejected)]
    per_pair, m = dpo.dpo_sft_loss_terms(seq[:, 0], seq[:, 1], mb["ref_chosen_logps"], mb["ref_rejected_logps"],
                                         lengths[:, 0], rejected_lengths=lengths[:, 1], weights=mb["pair_weight"],
                                         **loss_kw)
    weight = m.pop("weight")
    return jnp.sum(per_pair), jnp.sum(weight), {k: jnp.sum(v) for k, v in m.items()}
  return terms


def make_dpo_step(
    model: Qwen2_5_VL,
    optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
    *,
    beta: float = 0.1,
    sft_weight: float = 1.0,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    micro_batches: int = 1,
    chunk_size: int = 256,
    freeze_vision: bool = True,
    row_groups: int = 1,
    mesh: Mesh | None = None,
    state_sharding: PyTree | None = None,
    donate: bool = True,
    share_prompt: bool | None = None,
) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted DPO + λ·SFT train step `(state, batch) -> (state, metrics)`.

  Args:
    model: the policy module (its params are `state.params`).
    optimizer: the OptimizerConfig the state's tx was built from (via `init_train_state`): its
      frozen prefixes (plus "visual" if `freeze_vision`) are not differentiated, and its schedule
      gives the logged learning rate. None: only `freeze_vision` decides, no lr metric.
    beta, sft_weight, label_smoothing, loss_type: as `dpo.dpo_sft_loss` (λ = sft_weight, LLaMA-Factory
      `pref_ftx` semantics: per-sequence length-normalised chosen NLL).
    micro_batches: M; the B pairs are processed M at a time (B % M == 0); the gradient equals the
      full-batch gradient up to float rounding.
    chunk_size: positions per LM-head chunk in `token_logprobs_from_hidden`.
    freeze_vision: stop gradients at the vision tower (default True, as the recipe).
    row_groups: G, the number of [chosen block, rejected block] groups in the rows (module docstring).
    mesh, state_sharding: jit with in/out shardings = state_sharding for the state (from
      `init_train_state(mesh=...)`) and micro-batch rows constrained to the batch axes. Put the batch
      on the mesh with `parallel.host_local_to_global` first.
    donate: donate the input state's buffers (the caller must not use the old state afterwards).
    share_prompt: run a pair's chosen and rejected completions in one row after a single copy of
      their prompt (`forward.pack_units`): the same loss and gradient up to float rounding, with the
      prompt and its image tokens computed once (DPO step at benchmark config S: 25% fewer decoder
      tokens). None = on for the "xla" and "dot_product" attentions (`resolve_share_prompt`).

  Returns:
    step(state, batch) -> (new_state, metrics). Metrics (scalars, float32): loss, loss/dpo, loss/sft,
    rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected} (weighted means over real
    pairs), denom (number of real pairs), tokens (real prompt+completion tokens), completion_tokens,
    padded_tokens (rows × L, the positions computed), l2_grads (trainable, before clipping),
    l2_updates, l2_params, learning_rate (if optimizer given), nonfinite_updates and
    nonfinite_in_a_row (int32: updates skipped for a NaN / inf loss or gradient, in all and in a
    row; a skipped step leaves params and moments unchanged, `state.skip_nonfinite`).
  """
  if loss_type not in dpo.LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {dpo.LOSS_TYPES}, got {loss_type!r}")
  frozen, schedule, fwd = _step_setup(model, optimizer, freeze_vision, chunk_size, share_prompt)
  terms = _dpo_terms(beta=beta, sft_weight=sft_weight, label_smoothing=label_smoothing, loss_type=loss_type)

  def impl(state: TrainState, batch: dict[str, Any], prompt_len: int):
    _TRACES["dpo_step"] += 1
    log.info("compiling dpo step: input_ids %s, patches %s, prompt_len %d, micro_batches %d",
             batch["input_ids"].shape, getattr(batch.get("pixel_values"), "shape", None), prompt_len, micro_batches)
    loss, grads, metrics = _loss_and_grads(fwd, state.params, batch, terms, frozen_prefixes=frozen, copies=2,
                                           row_groups=row_groups, micro_batches=micro_batches,
                                           prompt_len=prompt_len, mesh=mesh)
    return _apply(state, grads, _finish_metrics(loss, metrics), schedule)

  jitted = _jit_step(impl, state_sharding, donate)
  run = _counted(jitted, "dpo_step")

  def step(state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    arrays, prompt_len = forward.select_batch(batch, PAIR_KEYS)
    missing = [k for k in PAIR_KEYS if k not in arrays]
    if missing:
      raise ValueError(f"DPO batch lacks {missing}")
    pairs = arrays["pair_weight"].shape[0]
    if arrays["input_ids"].shape[0] != 2 * pairs:
      raise ValueError(f"DPO batch has {arrays['input_ids'].shape[0]} rows for {pairs} pairs (need 2 per pair)")
    _check_divisible(pairs, row_groups, micro_batches, "pairs")
    if fwd.share_prompt:
      forward.check_shared_prompts(arrays, prompt_len, 2, row_groups)
    return run(state, arrays, prompt_len)

  step.jitted = jitted  # type: ignore[attr-defined]
  return step


def dpo_loss_and_grads(model: Qwen2_5_VL, params: PyTree, batch: Mapping[str, Any], *, beta: float = 0.1,
                       sft_weight: float = 1.0, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                       micro_batches: int = 1, chunk_size: int = 256,
                       frozen_prefixes: Sequence[str] = DEFAULT_FROZEN_PREFIXES, row_groups: int = 1,
                       share_prompt: bool | None = None) -> tuple[jax.Array, PyTree, dict[str, jax.Array]]:
  """The DPO step's loss, gradients (full tree, zeros on frozen params) and metrics, without the
  optimizer update; jit it yourself (prompt_len is read from the batch as a static int)."""
  arrays, prompt_len = forward.select_batch(batch, PAIR_KEYS)
  terms = _dpo_terms(beta=beta, sft_weight=sft_weight, label_smoothing=label_smoothing, loss_type=loss_type)

  fwd = forward.Forward(model, chunk_size, share_prompt=resolve_share_prompt(model, share_prompt))
  loss, grads, metrics = _loss_and_grads(fwd, params, arrays, terms,
                                         frozen_prefixes=tuple(frozen_prefixes), copies=2, row_groups=row_groups,
                                         micro_batches=micro_batches, prompt_len=prompt_len, mesh=None)
  return loss, grads, _finish_metrics(loss, metrics)


# ------------------------------------------------------------------------------------ SFT step

def make_sft_step(
    model: Qwen2_5_VL,
    optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
    *,
    mode: str = "token-mean",
    micro_batches: int = 1,
    chunk_size: int = 256,
    freeze_vision: bool = True,
    mesh: Mesh | None = None,
    state_sharding: PyTree | None = None,
    donate: bool = True,
) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted SFT (NLL of the completion tokens) train step, the cold-start baseline.

  Args:
    mode: "token-mean" (every target token weighs the same across the whole batch: the HF Trainer /
      LLaMA-Factory SFT default) or "seq-mean" (mean over sequences of per-sequence means); exact
      under micro-batching either way (`sft.nll_terms` returns (sum, denominator)).
    Others as `make_dpo_step`. Batch: `batches.collate_sft` (rows [B, L], B % micro_batches == 0).

  Returns:
    step(state, batch) -> (state, metrics) with loss, denom (target tokens or sequences), tokens,
    completion_tokens, padded_tokens, l2_grads, l2_updates, l2_params, learning_rate (if optimizer given),
    nonfinite_updates, nonfinite_in_a_row (as `make_dpo_step`).
  """
  if mode not in sft.MODES:
    raise ValueError(f"mode must be one of {sft.MODES}, got {mode!r}")
  frozen, schedule, fwd = _step_setup(model, optimizer, freeze_vision, chunk_size)

  def terms(logps, mask, mb):
    total, denom = sft.nll_terms(logps, mask, mode)
    return total, denom, {}

  def impl(state: TrainState, batch: dict[str, Any], prompt_len: int):
    _TRACES["sft_step"] += 1
    log.info("compiling sft step: input_ids %s, patches %s, prompt_len %d, micro_batches %d",
             batch["input_ids"].shape, getattr(batch.get("pixel_values"), "shape", None), prompt_len, micro_batches)
    loss, grads, metrics = _loss_and_grads(fwd, state.params, batch, terms, frozen_prefixes=frozen, copies=1,
                                           row_groups=1, micro_batches=micro_batches, prompt_len=prompt_len,
                                           mesh=mesh)
    return _apply(state, grads, _finish_metrics(loss, metrics), schedule)

  jitted = _jit_step(impl, state_sharding, donate)
  run = _counted(jitted, "sft_step")

  def step(state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    arrays, prompt_len = forward.select_batch(batch, ())
    _check_divisible(arrays["input_ids"].shape[0], 1, micro_batches, "rows")
    return run(state, arrays, prompt_len)

  step.jitted = jitted  # type: ignore[attr-defined]
  return step


# ----------------------------------------------------------------------------- reference pass

def make_logps_fn(model: Qwen2_5_VL, *, copies: int = 2, row_groups: int = 1, chunk_size: int = 256,
                  share_prompt: bool | None = None) -> Callable[[PyTree, Mapping[str, Any]], dict[str, jax.Array]]:
  """A jitted `(params, batch) -> {"logps": [B, copies], "lengths": [B, copies]}`: summed completion
  log-probs per row (no gradient), for the one-off reference pass before DPO training.

  Args:
    copies: rows per prompt: 2 for a DPO batch (column 0 chosen, 1 rejected), 1 for an SFT batch.
    row_groups, share_prompt: as in `make_dpo_step` (packing applies when copies > 1).
  Returns:
    fn(params, batch); outputs are in unit (pair / example) order, i.e. batch order for G = 1.
  """
  fwd = forward.Forward(model, chunk_size, share_prompt=resolve_share_prompt(model, share_prompt))

  @functools.partial(jax.jit, static_argnums=(2,))
  def impl(params, batch, prompt_len: int):
    _TRACES["logps"] += 1
    log.info("compiling logps: input_ids %s, patches %s", batch["input_ids"].shape,
             getattr(batch.get("pixel_values"), "shape", None))
    rows = forward.prepare_rows(batch, copies, row_groups, 1, model.config.image_token_id)
    mb = jax.tree.map(lambda x: x[0], rows)
    feats = fwd.encode_images(params["visual"], batch) if "pixel_values" in batch else None
    logps, mask = fwd.token_logps(params, mb, feats, prompt_len, copies)
    seq, lengths = sequence_logps(logps, mask)
    return {"logps": seq.reshape(-1, copies), "lengths": lengths.reshape(-1, copies)}

  def fn(params: PyTree, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    arrays, prompt_len = forward.select_batch(batch, ())
    _check_divisible(arrays["input_ids"].shape[0] // copies, row_groups, 1, "units")
    if fwd.share_prompt and copies > 1:
      forward.check_shared_prompts(arrays, prompt_len, copies, row_groups)
    return run(params, arrays, prompt_len)

  run = _counted(impl, "logps")

  fn.jitted = impl  # type: ignore[attr-defined]
  return fn


def reference_logps(logps_fn: Callable, params: PyTree, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(ref_chosen_logps [B], ref_rejected_logps [B]) as numpy, from a DPO batch and `make_logps_fn(copies=2)`.
  Store them with the pairs (`batches.EncodedPair.ref_*` / the pair dicts); padding pairs give 0."""
  out = jax.device_get(logps_fn(params, batch)["logps"])
  return np.asarray(out[:, 0]), np.asarray(out[:, 1])
