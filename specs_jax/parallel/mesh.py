"""Device mesh from config, multi-host start-up, and batches sharded over the data axes.

Mesh axes (always all three, in this order; an axis not named in the config has size 1):

  data     pure data parallelism: params replicated, batch split.
  fsdp     ZeRO-3 style: params *and* batch split (params all-gathered per layer by XLA).
  tensor   Megatron-style tensor parallelism: heads / MLP / vocab dims split, batch replicated.

A batch's row dimension is split over ("data", "fsdp") (`BATCH_AXES`); everything else about
parameter placement lives in `sharding.py`. The mesh uses `AxisType.Auto` (GSPMD propagation:
jit in/out shardings plus a few `with_sharding_constraint`s), not `Explicit` sharding-in-types,
which `jax.make_mesh` defaults to in jax 0.10 and which the model code is not written for.

Multi-host: call `maybe_initialize_distributed(config)` first thing (before any other JAX call),
then every host builds the same mesh over the global devices, loads *its own* rows of each batch,
and `host_local_to_global` assembles the global arrays (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "AXES",
    "BATCH_AXES",
    "REPLICATED_BATCH_KEYS",
    "batch_partition_spec",
    "batch_shardings",
    "data_sharding",
    "divisible_axes",
    "host_local_to_global",
    "make_mesh",
    "maybe_initialize_distributed",
    "mesh_shape",
    "multi_host_requested",
    "replicated",
]

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Batch entries that are not split by rows: the vision patches of a batch are one concatenated array
# ([N_patches, 1176]) that every device needs whole (window attention runs over segments of it).
REPLICATED_BATCH_KEYS = frozenset({"pixel_values", "vision", "image_grid_thw", "patch_valid"})
# Entries whose row dimension is not the first one.
BATCH_DIMS = {"position_ids": 1}


# ------------------------------------------------------------------------------------- the mesh

def mesh_shape(axes: Mapping[str, int] | Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
  """Resolves a mesh config to sizes for all of `AXES`.

  Args:
    axes: {"data": 2, "fsdp": -1} or [("fsdp", -1)] (the ml_collections-friendly form). At most one
      size may be -1, meaning "all remaining devices". Missing axes get size 1.
    num_devices: the number of devices the mesh spans.

  Returns:
    {"data": d, "fsdp": f, "tensor": t} with d·f·t == num_devices.

  Raises:
    ValueError: an unknown axis name, more than one -1, a non-positive size, or sizes whose product
      does not divide / equal the device count (the message gives both).
  """
  items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
  sizes: dict[str, int] = {}
  for name, size in items:
    if name not in AXES:
      raise ValueError(f"unknown mesh axis {name!r}; the axes are {AXES}")
    if name in sizes:
      raise ValueError(f"mesh axis {name!r} given twice")
    size = int(size)
    if size == 0 or size < -1:
      raise ValueError(f"mesh axis {name!r} has size {size}; use a positive size or -1 (the rest)")
    sizes[name] = size
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1], dtype=np.int64))
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(sizes)}: the fixed axes ({fixed} devices) do not divide the "
                       f"{num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh {dict(sizes)} needs {fixed} devices but {num_devices} are available "
                     "(use -1 for one axis to take the rest)")
  return {name: sizes.get(name, 1) for name in AXES}


def make_mesh(
    axes: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with `AxisType.Auto` axes.

  Args:
    axes: sizes per axis (see `mesh_shape`); None means {"fsdp": -1} (all devices on fsdp).
    devices: the devices to use (default: all global devices, `jax.devices()`).

  Returns:
    a `jax.sharding.Mesh` of shape (data, fsdp, tensor). With the default devices it is built by
    `jax.make_mesh`, which orders devices along the physical topology (TPU ICI rings).
  """
  sizes = mesh_shape({"fsdp": -1} if axes is None else axes,
                     len(devices) if devices is not None else jax.device_count())
  shape = tuple(sizes[a] for a in AXES)
  auto = (AxisType.Auto,) * len(AXES)
  if devices is None:
    mesh = jax.make_mesh(shape, AXES, axis_types=auto)
  else:
    mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=auto)
  log.info("mesh %s over %d devices (%d processes)", sizes, mesh.size, jax.process_count())
  return mesh


# ------------------------------------------------------------------------------- multi-host init

_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def multi_host_requested(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> bool:
  """Whether this process is one of several hosts of one job.

  True when `config["distributed"]["enabled"]` is True, or it gives `num_processes` > 1, or (when
  `enabled` is unset or "auto") the environment says so: `JAX_COORDINATOR_ADDRESS` /
  `MEGASCALE_COORDINATOR_ADDRESS` set, more than one TPU worker in `TPU_WORKER_HOSTNAMES`, or more
  than one task under SLURM (`SLURM_NTASKS`) or Open MPI (`OMPI_COMM_WORLD_SIZE`).
  """
  env = os.environ if environ is None else environ
  dist = _distributed_block(config)
  enabled = dist.get("enabled", "auto")
  if enabled is True or (dist.get("num_processes") or 1) > 1:
    return True
  if enabled is False:
    return False
  if any(env.get(k) for k in _MULTI_HOST_ENV):
    return True
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return True
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(env.get(key, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def _distributed_block(config: Mapping[str, Any] | None) -> dict[str, Any]:
  if config is None:
    return {}
  block = config.get("distributed") if hasattr(config, "get") else None
  if block is None:
    return {}
  return dict(block.items()) if hasattr(block, "items") else {}


def maybe_initialize_distributed(config: Mapping[str, Any] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` on a multi-host job; a no-op on one host.

  Must run before anything else touches JAX devices. The optional `config["distributed"]` block may
  give `coordinator_address`, `num_processes`, `process_id`, `local_device_ids` and
  `initialization_timeout`; whatever is missing JAX auto-detects (TPU VMs, SLURM, Open MPI, or the
  `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment variables).

  Returns:
    True if JAX's distributed runtime is initialised after the call (now or earlier), else False.
  """
  if jax.distributed.is_initialized():
    return True
  if not multi_host_requested(config):
    log.info("single host: jax.distributed.initialize() not called")
    return False
  dist = _distributed_block(config)
  kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id", "local_device_ids",
                                 "initialization_timeout") if dist.get(k) is not None}
  log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


# ---------------------------------------------------------------------------------- batch specs

def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def divisible_axes(dim: int, axes: Sequence[str], mesh: Mesh) -> tuple[str, ...]:
  """The longest prefix of `axes` whose total mesh size divides `dim` (possibly empty).

  ("data", "fsdp") on a 2×4 mesh: dim 16 → both; dim 4 → ("data",); dim 3 → ().
  """
  out: list[str] = []
  total = 1
  for a in axes:
    total *= mesh.shape[a]
    if dim % total:
      break
    out.append(a)
  return tuple(out)


def batch_partition_spec(shape: Sequence[int], mesh: Mesh, batch_dim: int = 0,
                         axes: Sequence[str] = BATCH_AXES) -> P:
  """PartitionSpec splitting dimension `batch_dim` of `shape` over `axes` (only those that divide it)."""
  if len(shape) <= batch_dim:
    return P()
  use = divisible_axes(int(shape[batch_dim]), axes, mesh)
  spec: list[Any] = [None] * len(shape)
  spec[batch_dim] = use if len(use) > 1 else (use[0] if use else None)
  return P(*spec)


def data_sharding(mesh: Mesh, ndim: int = 1, batch_dim: int = 0) -> NamedSharding:
  """Rows (dimension `batch_dim`) split over ("data", "fsdp"), other dims replicated."""
  spec: list[Any] = [None] * ndim
  spec[batch_dim] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def _key_name(path) -> str:
  for k in path:
    if hasattr(k, "key"):
      return str(k.key)
  return ""


def _leaf_sharding(path, x, mesh: Mesh, global_rows_scale: int) -> NamedSharding | None:
  if not hasattr(x, "shape"):
    return None
  key = _key_name(path)
  if key in REPLICATED_BATCH_KEYS or len(x.shape) == 0:
    return replicated(mesh)
  dim = BATCH_DIMS.get(key, 0)
  shape = list(x.shape)
  shape[dim] *= global_rows_scale
  return NamedSharding(mesh, batch_partition_spec(shape, mesh, dim))


def batch_shardings(batch: Any, mesh: Mesh, *, global_rows_scale: int = 1) -> Any:
  """A pytree of `NamedSharding`s for a batch dict (same structure; non-array leaves get None).

  Top-level keys in `REPLICATED_BATCH_KEYS` are replicated; "position_ids" ([3, R, L]) is split on
  dimension 1; every other array on dimension 0, over the batch axes that divide its global size
  (local size × `global_rows_scale`, the number of processes contributing rows). 0-d arrays are
  replicated; python scalars (e.g. "prompt_len") get None.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _leaf_sharding(path, x, mesh, global_rows_scale), batch)


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
  """This host's rows of a batch → global `jax.Array`s sharded over the batch axes.

  Each host passes the rows it loaded (numpy); the global row count is the local one times
  `jax.process_count()`, rows ordered by process index. Replicated entries (vision patches, 0-d
  arrays, and any dimension the batch axes do not divide) must be identical on every host. On one
  host this is a `device_put` with the batch shardings. Python scalars pass through unchanged.

  Returns:
    the batch with every array leaf replaced by a global `jax.Array`.
  """
  n_proc = jax.process_count()

  def put(path, x):
    sharding = _leaf_sharding(path, x, mesh, n_proc)
    if sharding is None:
      return x
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree_util.tree_map_with_path(put, batch)
