"""Orbax checkpoints of a stage: train state + data-iterator state + extras; SIGTERM saves; HF export.

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, save_interval_steps=100)
    restored = ckpt.restore_latest(abstract_state, shardings)      # None on a fresh start
    if restored: state, data_state, extra = restored; data_iter.set_state(data_state)
    guard = install_sigterm_handler(lambda: ckpt.save(step, state, data_iter.get_state(), force=True))
    for ...:
      state, metrics = step_fn(state, batch)
      ckpt.save(step, state, data_iter.get_state(), {"seed": 0})  # every save_interval_steps
      guard.maybe_save_and_exit()                                  # after SIGTERM: save, exit(0)
    ckpt.save(step, state, ..., force=True); ckpt.close()
    export_hf(state.params, model.config, workdir / "hf", copy_files_from=base_hf_dir)

One checkpoint is a directory `<step>/` with three items (an `ocp.CheckpointManager` with
`item_names`):
  state   `StandardSave` of {"step", "params", "opt_state", "rng"}; the PRNG key is stored as its
          raw `key_data` (uint32), re-wrapped with the same implementation on restore
  data    `JsonSave` of the data-iterator state (e.g. `grain` `iterator.get_state()`, JSON-able)
  extra   `JsonSave` of anything else JSON-able (seed, config hash, the RNG implementation name)

Atomicity is Orbax's: a save is written to `<step>.orbax-checkpoint-tmp/` (orbax 0.12.8; older
versions add `-<n>`) and renamed to `<step>/` only once complete, and the manager lists only finalised steps, so a save cut short
(preemption mid-write) is never restored; `restore_latest` takes the newest complete one.
Saves are asynchronous (the device→host copy blocks, the file writing does not), so the next
step may donate the state's buffers right after `save` returns.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from specs_jax.training.state import TrainState

__all__ = ["Checkpointer", "SigtermGuard", "export_hf", "install_sigterm_handler"]

log = logging.getLogger(__name__)

PyTree = Any


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _as_dict(state: Any) -> dict[str, Any]:
  """A TrainState's checkpointed fields (not tx) or a mapping of pytrees, as a dict."""
  if isinstance(state, TrainState):
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
  return dict(state)


def _to_saveable(state: Any) -> tuple[dict[str, Any], dict[str, str]]:
  """(items with top-level PRNG keys replaced by their raw uint32 key data, {name: PRNG impl})."""
  items, impls = {}, {}
  for k, v in _as_dict(state).items():
    if _is_key(v):
      impls[k] = str(jax.random.key_impl(v))
      v = jax.random.key_data(v)
    items[k] = v
  return items, impls


def _abstract_leaf(x: Any, sharding: jax.sharding.Sharding | None) -> jax.ShapeDtypeStruct:
  if sharding is None:
    sharding = getattr(x, "sharding", None)
  if sharding is None:
    if jax.process_count() > 1:
      raise ValueError("restoring on several hosts needs target shardings (pass shardings=)")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _restore_target(abstract_state: Any, shardings: Any | None) -> tuple[dict[str, Any], set[str]]:
  """ShapeDtypeStructs (with target shardings) for `_to_saveable(abstract_state)`, and the key names."""
  tree = _as_dict(abstract_state)
  sh = _as_dict(shardings) if shardings is not None else {}
  out, keys = {}, set()
  for k, v in tree.items():
    if _is_key(v):
      keys.add(k)
      v = jax.eval_shape(jax.random.key_data, v)
    s = sh.get(k)
    if s is None:
      out[k] = jax.tree.map(lambda x: _abstract_leaf(x, None), v)
    elif isinstance(s, jax.sharding.Sharding):
      out[k] = jax.tree.map(lambda x: _abstract_leaf(x, s), v)
    else:
      out[k] = jax.tree.map(_abstract_leaf, v, s)
  return out, keys


class Checkpointer:
  """`ocp.CheckpointManager` for a stage's train state, data-iterator state and extras.

  Args:
    directory: where the step directories go (created if missing).
    max_to_keep: keep the newest N checkpoints (None keeps all).
    save_interval_steps: `save()` without `force` writes only at steps that are multiples of this.
    async_save: write files in a background thread (Orbax async checkpointing).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.fspath(directory)
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.save_interval_steps = int(save_interval_steps)
    # The interval is applied here (multiples of it, so a resumed run saves at the same steps);
    # Orbax's own policy would also save the first step it sees.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "extra"))
    self._lock = threading.Lock()

  # --------------------------------------------------------------------------------- saving

  def save(self, step: int, state: TrainState | Mapping[str, Any], data_state: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves at `step` if the interval says so (or `force`); returns whether a save started.

    Args:
      step: the number of optimizer updates done (the state's step).
      state: a TrainState (its tx is not saved; the restoring code rebuilds it) or a mapping of pytrees.
      data_state: the input iterator's state (JSON-able dict), restored alongside.
      extra: more JSON-able values (seed, derived sizes, ...).
      force: save even off the interval. A step that is already saved is skipped, not overwritten.
    """
    step = int(step)
    if not force and step % self.save_interval_steps:
      return False
    with self._lock:
      if step in self._mngr.all_steps():
        return False
      items, impls = _to_saveable(state)
      meta = dict(extra or {}) | {"_prng_impls": impls}
      args = ocp.args.Composite(state=ocp.args.StandardSave(items), data=ocp.args.JsonSave(dict(data_state or {})),
                                extra=ocp.args.JsonSave(meta))
      saved = self._mngr.save(step, args=args, force=True)
    if saved:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait_until_finished(self) -> None:
    """Blocks until every pending asynchronous save is on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------------------- restoring

  def all_steps(self) -> list[int]:
    """The finalised checkpoint steps, ascending (temporary, unfinished directories excluded)."""
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int, abstract_state: TrainState | Mapping[str, Any], shardings: Any | None = None
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Restores checkpoint `step` into the structure (and shardings) of `abstract_state`.

    Args:
      abstract_state: a TrainState (e.g. `jax.eval_shape` of the state factory, or a real state) whose
        tx is kept; its leaves give shapes and dtypes.
      shardings: a pytree of target shardings with the structure of `abstract_state` (e.g.
        `parallel.state_shardings(...)`); None uses the leaves' own `.sharding` if they have one, else
        the first local device.
    Returns:
      (state, data_state, extra): the state as the same type as `abstract_state`, with arrays placed
      with the target shardings.
    """
    target, key_names = _restore_target(abstract_state, shardings)
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          data=ocp.args.JsonRestore(),
                                                          extra=ocp.args.JsonRestore()))
    extra = dict(out["extra"] or {})
    impls = extra.pop("_prng_impls", {})
    restored = dict(out["state"])
    for k in key_names:
      if k not in impls:
        raise ValueError(f"checkpoint step {step} stores {k!r} as an array, but the target expects a PRNG key")
      restored[k] = jax.random.wrap_key_data(restored[k], impl=impls[k])
    if isinstance(abstract_state, TrainState):
      state = abstract_state.replace(**restored)
    else:
      state = restored
    log.info("checkpoint: restored step %d from %s", step, self.directory)
    return state, dict(out["data"] or {}), extra

  def restore_latest(self, abstract_state: TrainState | Mapping[str, Any], shardings: Any | None = None
                     ) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """`restore(latest_step)`, or None when there is no finalised checkpoint."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state, shardings)


# ------------------------------------------------------------------------------------ SIGTERM

class SigtermGuard:
  """Turns SIGTERM (TPU maintenance / preemption, `kill`) into a save and a clean exit.

  The handler only records the signal; the save runs at the next `maybe_save_and_exit()` call in the
  training loop, between steps, when the state is consistent (a handler that saved immediately could
  see a state whose buffers the running step has already donated). On several hosts the flag is
  agreed on with an all-gather, so all hosts save the same step together.
  """

  def __init__(self, callback: Callable[[], Any], exit_code: int = 0):
    self.callback = callback
    self.exit_code = exit_code
    self.requested = False
    self._previous: Any = None

  def _handler(self, signum, frame) -> None:
    log.warning("received signal %d: will save a checkpoint and exit after the current step", signum)
    self.requested = True

  def install(self) -> "SigtermGuard":
    self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def should_stop(self) -> bool:
    """Whether any host received SIGTERM (a collective on several hosts: call it on all of them)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))
    return bool(np.max(flags))

  def maybe_save_and_exit(self) -> None:
    """If SIGTERM arrived: run the callback (save + wait), then `sys.exit(exit_code)`."""
    if not self.should_stop():
      return
    log.warning("SIGTERM: saving and exiting")
    self.callback()
    self.uninstall()
    sys.exit(self.exit_code)


def install_sigterm_handler(callback: Callable[[], Any], exit_code: int = 0) -> SigtermGuard:
  """Installs a `SigtermGuard` whose `maybe_save_and_exit()` runs `callback` (which should save with
  `force=True` and wait for the write) and exits with `exit_code` once SIGTERM has arrived."""
  return SigtermGuard(callback, exit_code).install()


# ----------------------------------------------------------------------------------- HF export

def export_hf(params: PyTree, model_config, out_dir: str | os.PathLike, copy_files_from: str | None = None,
              dtype: Any = None) -> str | None:
  """Writes the params as an HF checkpoint (`qwen2_5_vl.save_pretrained`) from process 0.

  Sharded params are gathered to the host first (all processes must call this). `copy_files_from`
  names an HF directory whose tokenizer / preprocessor / chat-template files are copied alongside.
  Returns the directory on process 0, None elsewhere.
  """
  from specs_jax.models.qwen2_5_vl.weights import save_pretrained

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    host = multihost_utils.process_allgather(params, tiled=True)
  else:
    host = jax.device_get(params)
  if jax.process_index() != 0:
    return None
  out = save_pretrained(host, model_config, out_dir, dtype=dtype, copy_files_from=copy_files_from)
  log.info("exported HF checkpoint to %s", out)
  return out
