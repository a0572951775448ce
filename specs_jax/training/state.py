"""Train state, optimizer (AdamW + schedule + clipping + decay mask + freezing), gradient accumulation.

Params are a nested dict pytree such as {"visual": {...}, "model": {...}, "lm_head": {...}} with
leaves named "kernel", "bias", "scale" or "embedding"; a parameter's *path* is its keys joined by
"/" (e.g. "model/layers_3/self_attn/q_proj/kernel").

The optimizer follows what the HF Trainer behind LLaMA-Factory and MM-EUREKA's DeepSpeed do:
- global-norm clipping over the *trainable* gradients only (frozen parameters have no gradient in
  PyTorch, so they must not count towards the norm);
- AdamW with decoupled weight decay, not applied to biases, norm scales or any 1-D parameter
  (HF `get_decay_parameter_names` excludes biases and LayerNorm weights; embeddings are decayed);
- a linear warmup from 0 then cosine decay to `min_lr_ratio·lr` (HF `cosine`) or a constant
  (`constant_with_warmup`); warmup_ratio rounds up as HF does (ceil(ratio·total_steps)).
Frozen parameters (path prefixes, e.g. "visual" as MM-EUREKA's `--freeze_prefix visual`) get
`optax.set_to_zero()` via `optax.multi_transform`, which stores `optax.MaskedNode()` placeholders for
them in the Adam moments: no optimizer memory beyond the trainable parameters.

Non-finite updates (docs/reliability.md): the whole optimizer is wrapped in `skip_nonfinite`. An
update whose loss, gradients or resulting updates hold a NaN or inf is skipped: the params and the
inner optimizer state (Adam moments, Adam's bias-correction count, the schedule's count) stay as
they were, bit for bit, and the skip is counted in the optimizer state (`NonFiniteGuardState`,
checkpointed with it). `TrainState.step` still advances: it counts optimizer *calls*, so the data
and RNG of a train-loop step stay functions of the step index, while the learning-rate schedule
is indexed by the updates actually applied, `applied_updates(state)` = step − skipped updates
(a run with skips reaches the end of its schedule that many updates late). The train loop
(`stages.common.train_loop`) stops the run after `config.run.max_nonfinite_in_a_row` in a row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from specs_jax.parallel.sharding import path_str as sharding_path_str

__all__ = [
    "NonFiniteGuardState",
    "OptimizerConfig",
    "TrainState",
    "accumulate_gradients",
    "applied_updates",
    "apply_gradients_checked",
    "create_train_state",
    "decay_mask",
    "freeze_labels",
    "make_optimizer",
    "make_schedule",
    "nonfinite_counts",
    "param_path",
    "skip_nonfinite",
    "warmup_steps",
]

PyTree = Any
NO_DECAY_NAMES = ("bias", "scale")


def known_fields(cls, cfg: Mapping[str, Any], what: str) -> dict[str, Any]:
  """`cfg` as a dict, or a ValueError naming the keys that are not fields of dataclass `cls`."""
  d = dict(cfg.items())
  unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
  return d


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer hyper-parameters (the `optimizer` block of a config).

  Attributes:
    learning_rate: peak learning rate.
    schedule: "cosine" (warmup, then cosine to min_lr_ratio·lr at total_steps), "constant"
      (warmup, then constant) or "linear" (warmup, then linear to min_lr_ratio·lr).
    total_steps: number of optimizer updates (the schedule's length).
    warmup_steps: explicit warmup length; if None, ceil(warmup_ratio·total_steps).
    warmup_ratio: used when warmup_steps is None.
    min_lr_ratio: final learning rate of cosine/linear decay, as a fraction of the peak.
    b1, b2, eps: Adam moments (torch / HF defaults).
    weight_decay: decoupled AdamW decay, applied to params for which `decay_mask` is True.
    max_grad_norm: global-norm clipping threshold over trainable grads; None or 0 disables it.
    frozen_prefixes: parameter path prefixes that are not trained ("visual", "model/embed_tokens").
  """
  learning_rate: float = 1e-6
  schedule: str = "cosine"
  total_steps: int = 1000
  warmup_steps: int | None = None
  warmup_ratio: float = 0.0
  min_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  frozen_prefixes: tuple[str, ...] = ()

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any]) -> "OptimizerConfig":
    """From a dict / ml_collections.ConfigDict; unknown keys raise (they are usually typos)."""
    d = known_fields(cls, cfg, "optimizer")
    if "frozen_prefixes" in d:
      d["frozen_prefixes"] = tuple(d["frozen_prefixes"])
    return cls(**d)


# ---------------------------------------------------------------------------------- schedules

def warmup_steps(cfg: OptimizerConfig) -> int:
  """The warmup length: cfg.warmup_steps, else ceil(warmup_ratio·total_steps) (HF convention)."""
  if cfg.warmup_steps is not None:
    return int(cfg.warmup_steps)
  return int(math.ceil(cfg.warmup_ratio * cfg.total_steps))


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0-based count of updates already applied).

  lr(s) = lr·s/W for s < W (so the first update uses lr 0 when W > 0, as HF's LambdaLR), then
    cosine:   min + (lr − min)·½(1 + cos(π·(s − W)/(T − W)))  reaching min at s = T
    linear:   lr + (min − lr)·(s − W)/(T − W)
    constant: lr
  with W the warmup steps, T = total_steps, min = min_lr_ratio·lr; constant at min after T.
  """
  lr, w, t = cfg.learning_rate, warmup_steps(cfg), int(cfg.total_steps)
  end = cfg.min_lr_ratio * lr
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, w, max(t, w + 1), end_value=end)
  if cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, max(t - w, 1))
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"schedule must be cosine, linear or constant, got {cfg.schedule!r}")
  if w == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, w), decay], [w])


# ------------------------------------------------------------------------------ masks, labels

def param_path(path: Sequence[Any]) -> str:
  """A tree_util key path as "a/b/c"."""
  return sharding_path_str(path)


def decay_mask(params: PyTree) -> PyTree:
  """True where weight decay applies: not on leaves named bias/scale, not on 1-D (or 0-D) params.

  Args:
    params: the params pytree (or any pytree with the same structure and shapes, e.g. updates).
  Returns:
    pytree of Python bools with the structure of `params`.
  """
  def rule(path, x):
    name = param_path(path).rsplit("/", 1)[-1]
    return name not in NO_DECAY_NAMES and jnp.ndim(x) >= 2
  return jax.tree_util.tree_map_with_path(rule, params)


def _is_under(path: str, prefix: str) -> bool:
  prefix = prefix.strip("/")
  return path == prefix or path.startswith(prefix + "/")


def freeze_labels(params: PyTree, frozen_prefixes: Sequence[str]) -> PyTree:
  """"frozen" for params whose path starts with one of `frozen_prefixes` (whole path components:
  "visual" freezes "visual/blocks_0/..." but not "visual_proj/..."), "trainable" otherwise."""
  def rule(path, _):
    p = param_path(path)
    return "frozen" if any(_is_under(p, f) for f in frozen_prefixes) else "trainable"
  return jax.tree_util.tree_map_with_path(rule, params)


# ---------------------------------------------------------------------------------- optimizer

def make_optimizer(
    cfg: OptimizerConfig | Mapping[str, Any], params: PyTree | None = None
) -> optax.GradientTransformation:
  """clip_by_global_norm → AdamW(schedule, decay_mask) on trainable params; zero for frozen ones;
  the whole wrapped in `skip_nonfinite` (a NaN / inf update is skipped and counted).

  Args:
    cfg: an OptimizerConfig or a mapping with its fields.
    params: needed only when cfg.frozen_prefixes is non-empty (the labels depend on the tree).
      A tree of `jax.ShapeDtypeStruct`s (from `jax.eval_shape`) is enough.

  Returns:
    An optax GradientTransformation(ExtraArgs) whose state is a `NonFiniteGuardState`. Its learning
    rate at the u-th applied update (0-based) is `make_schedule(cfg)(u)`; skipped updates do not count.
  """
  if not isinstance(cfg, OptimizerConfig):
    cfg = OptimizerConfig.from_mapping(cfg)
  parts = []
  if cfg.max_grad_norm:
    parts.append(clip_by_global_norm(cfg.max_grad_norm))
  # The mask is a callable, evaluated on the (masked) update tree: inside multi_transform the
  # frozen leaves are MaskedNode placeholders, which tree_map skips.
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if not cfg.frozen_prefixes:
    return skip_nonfinite(tx)
  if params is None:
    raise ValueError("make_optimizer needs params (or their shapes) when frozen_prefixes is set")
  labels = freeze_labels(params, cfg.frozen_prefixes)
  if "trainable" not in jax.tree.leaves(labels):
    raise ValueError(f"frozen_prefixes {cfg.frozen_prefixes} freeze every parameter")
  if "frozen" not in jax.tree.leaves(labels):
    raise ValueError(f"frozen_prefixes {cfg.frozen_prefixes} match no parameter path")
  return skip_nonfinite(optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels),
                        norm_mask=jax.tree.map(lambda label: label == "trainable", labels))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm`, except that it takes the norm from the extra argument
  `global_norm=` when given (`skip_nonfinite` computes it anyway, so clipping costs one pass over
  the gradients instead of two). u → u if ‖g‖ < max_norm else u · (max_norm / ‖g‖): optax's rule,
  with the factor formed first (within an ulp of optax's u / ‖g‖ · max_norm)."""
  def init(params: PyTree) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.tree.norm(updates) if global_norm is None else global_norm
    # One scalar factor, as torch.nn.utils.clip_grad_norm_: a product per element fuses into each
    # consumer (Adam's two moments), where optax's `t / norm * max_norm` is a division, which
    # XLA:CPU computes once into a gradient-sized buffer that both moments then read.
    factor = jnp.where(jnp.squeeze(g_norm < max_norm), 1.0, max_norm / g_norm).astype(jnp.float32)
    updates = jax.tree.map(lambda t: t * factor.astype(t.dtype), updates)
    return updates, state

  return optax.GradientTransformationExtraArgs(init, update)


# -------------------------------------------------------------------------- non-finite updates

class NonFiniteGuardState(NamedTuple):
  """State of `skip_nonfinite` (the field names of `optax.apply_if_finite`'s state).

  Attributes:
    notfinite_count: int32 scalar, non-finite updates in a row (0 after a finite one).
    last_finite: bool scalar, whether the latest update was applied.
    total_notfinite: int32 scalar, non-finite updates skipped since the state was initialised.
    inner_state: the wrapped transformation's state (unchanged by a skipped update).
  """
  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array
  inner_state: optax.OptState


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def sum_of_squares(tree: PyTree) -> jax.Array:
  """Σ x² over the leaves of a tree, in float32 (0 for an empty tree).

  The one expression for it in the train step: the non-finite guard, the clipping norm and the
  `l2_grads` metric all go through here, so XLA's common-subexpression pass computes each leaf's
  reduction once."""
  leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  return sum(leaves) if leaves else jnp.zeros((), jnp.float32)


def global_norm(tree: PyTree) -> jax.Array:
  """√`sum_of_squares`: the l2 norm of a whole tree (the `l2_*` step metrics)."""
  return jnp.sqrt(sum_of_squares(tree))


def skip_nonfinite(inner: optax.GradientTransformation, norm_mask: PyTree | None = None
                   ) -> optax.GradientTransformationExtraArgs:
  """`inner`, except that an update from a NaN or inf gradient or loss is skipped and counted.

  As `optax.apply_if_finite`, with two differences: it never gives up and applies a non-finite
  update (the train loop stops the run instead, after `run.max_nonfinite_in_a_row`), and it also
  checks the loss (extra argument `loss=`: a NaN loss can come with finite gradients, e.g. from a
  term that does not depend on the params). The gradient test is that Σ g² is finite, which also
  rejects gradients whose squares overflow; from such gradients AdamW (with or without clipping)
  can only produce finite updates and moments, so the updates need no second check.

  The inner update runs under `lax.cond`: a skipped step does not compute it, and an applied one
  pays no per-leaf select between new and old state (three passes over params-sized arrays, ~5% of
  the DPO step at benchmark config S). The inner transformation gets the gradients' global norm
  as the extra argument `global_norm=` (this module's `clip_by_global_norm` uses it instead of a
  second pass over the gradients): over the leaves where `norm_mask` (a tree of bools like the
  gradients, default all) is true; the others count only towards the finiteness test.

  update(grads, state, params, loss=None) -> (updates, state): on a skip the updates are zeros and
  `inner_state` is returned unchanged; `notfinite_count` / `total_notfinite` go up by one.
  """
  def init(params: PyTree) -> NonFiniteGuardState:
    return NonFiniteGuardState(notfinite_count=jnp.zeros((), jnp.int32), last_finite=jnp.asarray(True),
                               total_notfinite=jnp.zeros((), jnp.int32), inner_state=inner.init(params))

  def update(grads, state: NonFiniteGuardState, params=None, *, loss=None, **extra_args):
    del extra_args
    if norm_mask is None:
      sq, rest = sum_of_squares(grads), jnp.zeros((), jnp.float32)
    else:
      mask = jax.tree.leaves(norm_mask)
      leaves = jax.tree.leaves(grads)
      if len(mask) != len(leaves):
        raise ValueError(f"norm_mask has {len(mask)} leaves, the gradients {len(leaves)}")
      sq = sum_of_squares([x for x, m in zip(leaves, mask) if m])
      rest = sum_of_squares([x for x, m in zip(leaves, mask) if not m])
    # Finite iff no NaN / inf and no square overflowing float32 (|g| > 1.8e19, which would turn
    # an Adam second moment into inf).
    ok = jnp.isfinite(sq + rest)
    if loss is not None:
      ok = ok & _all_finite(loss)
    extra = {"global_norm": jnp.sqrt(sq)} if isinstance(inner, optax.GradientTransformationExtraArgs) else {}

    def apply():
      return inner.update(grads, state.inner_state, params, **extra)

    def skip():
      updates = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(apply)[0])
      return updates, state.inner_state

    updates, inner_state = jax.lax.cond(ok, apply, skip)
    in_a_row = jnp.where(ok, 0, state.notfinite_count + 1).astype(jnp.int32)
    total = jnp.where(ok, state.total_notfinite, state.total_notfinite + 1).astype(jnp.int32)
    return updates, NonFiniteGuardState(notfinite_count=in_a_row, last_finite=ok, total_notfinite=total,
                                        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------------------------- the state

@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `tx` is static (not a pytree leaf, not checkpointed).

  Attributes:
    step: int32 scalar, number of optimizer updates made, skipped non-finite ones included
      (`applied_updates` excludes them).
    params: the params pytree.
    opt_state: the optax state of `tx`.
    rng: a PRNG key; steps that sample fold in `step` rather than splitting it.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

  def apply_gradients(self, grads: PyTree, loss: jax.Array | None = None) -> "TrainState":
    """One optimizer update (skipped if non-finite, see `apply_gradients_checked`); step + 1."""
    return apply_gradients_checked(self, grads, loss)[0]


def nonfinite_counts(state: TrainState) -> dict[str, jax.Array]:
  """{"nonfinite_updates": skipped updates in all, "nonfinite_in_a_row": skipped since the last
  applied one} (int32 scalars) from the state's `NonFiniteGuardState`; {} for an optimizer built
  without `skip_nonfinite`."""
  g = state.opt_state
  if not isinstance(g, NonFiniteGuardState):
    return {}
  return {"nonfinite_updates": g.total_notfinite, "nonfinite_in_a_row": g.notfinite_count}


def applied_updates(state: TrainState) -> jax.Array:
  """Updates actually applied (int32): step − skipped non-finite ones. The schedule's position."""
  return state.step - nonfinite_counts(state).get("nonfinite_updates", 0)


def apply_gradients_checked(state: TrainState, grads: PyTree, loss: jax.Array | None = None
                            ) -> tuple[TrainState, PyTree, dict[str, jax.Array]]:
  """One optimizer update; a non-finite one (NaN / inf loss, gradient or update) is skipped.

  Args:
    state: the train state.
    grads: gradients, a pytree like state.params.
    loss: the scalar loss of those gradients, checked too (optional).
  Returns:
    (new_state, updates, metrics). new_state.step is state.step + 1 either way. On a skip the
    params and the inner optimizer state are the input's, bit for bit (kept by a `lax.cond`, not
    `p + 0`, which would turn −0.0 into +0.0), and updates are zeros. metrics: `nonfinite_counts` of the
    new state ({} without `skip_nonfinite`, whose optimizer applies whatever it gets).
  """
  kw = {"loss": loss} if loss is not None and isinstance(state.opt_state, NonFiniteGuardState) else {}
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **kw)
  if isinstance(opt_state, NonFiniteGuardState):
    # A cond, not a per-leaf select: an applied update pays one pass (p + u), not two.
    params = jax.lax.cond(opt_state.last_finite, lambda: optax.apply_updates(state.params, updates),
                          lambda: state.params)
  else:
    params = optax.apply_updates(state.params, updates)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new, updates, nonfinite_counts(new)


def create_train_state(
    params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """A TrainState at step 0 with the optimizer state initialised for `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=rng, tx=optimizer)


# ------------------------------------------------------------------------ gradient accumulation

LossTermsFn = Callable[[PyTree, PyTree], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def accumulate_gradients(
    loss_terms_fn: LossTermsFn, params: PyTree, micro_batches: PyTree
) -> tuple[jax.Array, PyTree, dict[str, jax.Array]]:
  """Exact gradient of Σ_k loss_sum_k / Σ_k denom_k over M micro-batches, with `jax.lax.scan`.

  The gradient of each micro-batch's *sum* is accumulated (float32), and the total is divided by
  the total denominator once at the end. This equals the gradient of the full batch for any loss
  that is a ratio of additive terms (token-mean over the global token count, mean over pairs),
  whereas averaging per-micro-batch means does not when the denominators differ. With M = 1 the
  scalar loss is divided before differentiating: the same value, without a pass over the gradients.

  Args:
    loss_terms_fn: (params, micro_batch) -> (loss_sum, denom, metrics). loss_sum is
      differentiable; denom must not depend on params (it is stop-gradient'ed); metrics are
      additive sums (scalars), e.g. `grpo.policy_loss_terms`'s third output.
    params: the params pytree.
    micro_batches: pytree whose leaves have a leading micro-batch axis [M, ...].

  Returns:
    loss: scalar float32 = Σ loss_sum / Σ denom.
    grads: pytree like params (each leaf in its param's dtype).
    metrics: the metrics summed over micro-batches, plus "denom" (Σ denom).
  """
  def value_fn(p, mb):
    loss_sum, denom, metrics = loss_terms_fn(p, mb)
    return loss_sum, (jax.lax.stop_gradient(denom), metrics)

  safe = lambda den: jnp.where(den > 0, den, 1.0)  # noqa: E731
  as_param = lambda g, p: g.astype(jnp.result_type(p))  # noqa: E731
  first = jax.tree.map(lambda x: x[0], micro_batches)

  if jax.tree.leaves(micro_batches)[0].shape[0] == 1:
    # M = 1: differentiate loss_sum / denom. The same value, but the 1/denom reaches every gradient
    # through the backward's scalar seed instead of a pass over the whole gradient tree afterwards
    # (on XLA:CPU that pass was ~2% of the config-S DPO step).
    def scaled(p):
      loss_sum, (denom, metrics) = value_fn(p, first)
      denom = jnp.asarray(denom, jnp.float32)
      return loss_sum.astype(jnp.float32) / safe(denom), (denom, metrics)

    (loss, (denom, metrics)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
    metrics = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)    # as the scan's sums
    return loss, jax.tree.map(as_param, grads, params), metrics | {"denom": denom}

  grad_fn = jax.value_and_grad(value_fn, has_aux=True)
  _, (_, metrics_shape) = jax.eval_shape(value_fn, params, first)

  def body(carry, mb):
    g_acc, loss_acc, den_acc, m_acc = carry
    (loss_sum, (denom, metrics)), g = grad_fn(params, mb)
    g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
    m_acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), m_acc, metrics)
    return (g_acc, loss_acc + loss_sum.astype(jnp.float32),
            den_acc + jnp.asarray(denom, jnp.float32), m_acc), None

  zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)
  init = (zeros(params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
          zeros(metrics_shape))
  (g_sum, loss_total, den_total, metrics), _ = jax.lax.scan(body, init, micro_batches)
  grads = jax.tree.map(lambda g, p: as_param(g / safe(den_total), p), g_sum, params)
  return loss_total / safe(den_total), grads, metrics | {"denom": den_total}
