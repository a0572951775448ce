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
A batch's image table (`pixel_values` + `vision` in the slot layout) is per host too: the hosts'
tables are gathered and concatenated, and the rows' references into it are offset
(`gather_host_images`).
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
    "gather_host_images",
    "global_batch_to_mesh",
    "host_local_to_global",
    "make_mesh",
    "maybe_initialize_distributed",
    "mesh_shape",
    "multi_host_requested",
    "replicated",
    "to_host",
]

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Batch entries that are not split by rows: the vision patches of a batch are one concatenated array
# ([N_patches, 1176]) that every device needs whole (window attention runs over segments of it).
REPLICATED_BATCH_KEYS = frozenset({"pixel_values", "vision", "image_grid_thw", "patch_valid"})
# Row entries that point into the batch's merged image-token features (−1: no image token).
IMAGE_INDEX_KEYS = ("image_index",)
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


def _allgather(tree: Any) -> Any:
  """numpy pytree of this host → the same pytree with a leading [process_count] axis (a collective:
  every process calls it with the same structure and shapes)."""
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=False))


def gather_host_images(pixel_values: np.ndarray, vision: Mapping[str, np.ndarray]
                       ) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
  """Every host's image table → the global one (identical on every host), and this host's offset.

  Each host collates its own rows' images into S slots of Q patches (`rope.vision_metadata`); the
  global table is the hosts' slots in process order (S·n slots). `token_index` (merged image-token
  features in prompt order, valid entries first) is rebuilt so that host h's tokens follow those of
  hosts < h with no gap, so features come out in global row order. Window / full-attention segment
  ids only meet within a slot and need no offset. A collective on more than one process.

  Args:
    pixel_values: [S·Q, C] this host's patches in the slot layout.
    vision: this host's slot-layout metadata: pos_h, pos_w, window_seg, full_seg, valid [S, Q],
      token_index [S·Q/m²].
  Returns:
    (pixel_values [n·S·Q, C], vision with [n·S, Q] and token_index [n·S·Q/m²], offset): offset is
    the number of image tokens on the hosts before this one; add it to this host's row references
    into the features (GRPO's `image_index`; DPO/SFT rows find their features by order).
  Raises:
    ValueError: hosts with different slot layouts (S, Q, C: use the same buckets on every host), or
      metadata without `valid`.
  """
  vision = {k: np.asarray(v) for k, v in vision.items()}
  pv = np.asarray(pixel_values)
  if "valid" not in vision or "token_index" not in vision:
    raise ValueError(f"vision metadata needs 'valid' and 'token_index' to be gathered; has {sorted(vision)}")
  if jax.process_count() == 1:
    return pv, vision, 0
  s, q = vision["valid"].shape
  n_merged = vision["token_index"].shape[0]
  unit = s * q // n_merged                                                    # m² patches per token
  own = np.array([s, q, n_merged, *pv.shape, int(vision["valid"].sum()) // unit], np.int64)
  layouts = _allgather(own)                                                   # [n, 6]
  if (layouts[:, :5] != layouts[0, :5]).any():
    raise ValueError("hosts collated image tables of different layouts (slots, slot size, tokens, patches, "
                     f"channels per host: {layouts[:, :5].tolist()}); use the same patch and image buckets "
                     "on every host")
  counts = layouts[:, 5]
  gathered = _allgather({"pixel_values": pv, "vision": vision})
  n = len(counts)
  out = {k: v.reshape(n * s, *v.shape[2:]) for k, v in gathered["vision"].items() if k != "token_index"}
  token_index = np.zeros((n * n_merged,), vision["token_index"].dtype)
  start = 0
  for h in range(n):
    token_index[start:start + counts[h]] = gathered["vision"]["token_index"][h, :counts[h]] + h * n_merged
    start += counts[h]
  out["token_index"] = token_index
  offset = int(counts[:jax.process_index()].sum())
  return gathered["pixel_values"].reshape(n * s * q, *pv.shape[1:]), out, offset


def _rows_follow_processes(sharding: NamedSharding, global_shape: tuple[int, ...], dim: int) -> bool:
  """Whether process p's devices hold exactly rows [p·r, (p+1)·r) of `dim` (r = rows per process)."""
  n_proc = jax.process_count()
  per = global_shape[dim] // n_proc
  spans: dict[int, set[tuple[int, int]]] = {}
  for dev, index in sharding.devices_indices_map(global_shape).items():
    sl = index[dim]
    spans.setdefault(dev.process_index, set()).add(
        (sl.start or 0, global_shape[dim] if sl.stop is None else sl.stop))
  for p, sp in spans.items():
    if min(a for a, _ in sp) != p * per or max(b for _, b in sp) != (p + 1) * per:
      return False
  return True


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
  """This host's rows of a batch → global `jax.Array`s sharded over the batch axes.

  Each host passes the rows it loaded (numpy); the global row count is the local one times
  `jax.process_count()`, rows ordered by process index. With several processes, a batch dict's image
  table (`pixel_values` with `vision` slot metadata) is this host's images: the tables are gathered
  (`gather_host_images`) and `image_index` rows are offset into the global features. Other
  replicated entries (0-d arrays, flat `pixel_values` without `vision`, `image_grid_thw`,
  `patch_valid`) must be identical on every host. Rows whose split over the devices does not follow
  the processes (a row count the process-spanning axes do not divide) are gathered from all hosts
  first. On one host this is a `device_put` with the batch shardings. Python scalars pass through.

  Returns:
    the batch with every array leaf replaced by a global `jax.Array`.
  """
  n_proc = jax.process_count()
  has_table = isinstance(batch, Mapping) and batch.get("vision") is not None and batch.get("pixel_values") is not None
  if n_proc > 1 and has_table:
    pv, vision, offset = gather_host_images(batch["pixel_values"], batch["vision"])
    batch = {**batch, "pixel_values": pv, "vision": vision}
    for k in IMAGE_INDEX_KEYS:
      if batch.get(k) is not None:
        idx = np.asarray(batch[k])
        batch[k] = np.where(idx >= 0, idx + offset, idx).astype(idx.dtype)

  def put(path, x):
    sharding = _leaf_sharding(path, x, mesh, n_proc)
    if sharding is None:
      return x
    x = np.asarray(x)
    key = _key_name(path)
    if n_proc == 1 or key in REPLICATED_BATCH_KEYS or x.ndim == 0:
      return jax.make_array_from_process_local_data(sharding, x)
    dim = BATCH_DIMS.get(key, 0)
    global_shape = list(x.shape)
    global_shape[dim] *= n_proc
    global_shape = tuple(global_shape)
    if _rows_follow_processes(sharding, global_shape, dim):
      return jax.make_array_from_process_local_data(sharding, x, global_shape)
    # e.g. 4 global rows on a mesh whose process-spanning axis has 8 devices: the rows are not split
    # by process (without global_shape, each host's rows would silently be taken for all of them).
    full = np.concatenate(list(_allgather(x)), axis=dim)
    return jax.make_array_from_callback(global_shape, sharding, lambda index: full[index])
  return jax.tree_util.tree_map_with_path(put, batch)


def global_batch_to_mesh(batch: Any, mesh: Mesh) -> Any:
  """A batch that every host built whole (identical numpy arrays on every host) → global `jax.Array`s.

  The pipeline's stages derive each step's batch deterministically from the step index, so every
  host can collate the same global batch; each host then transfers only the shards its own devices
  hold (`jax.make_array_from_callback`). Unlike `host_local_to_global` this needs no per-host row
  split, so entries that are not split by rows (the vision patches and their per-image slot
  metadata) stay consistent across hosts by construction. Shardings as `batch_shardings`; python
  scalars pass through. On one host this equals a `device_put` with the batch shardings.
  """
  def put(path, x):
    sharding = _leaf_sharding(path, x, mesh, 1)
    if sharding is None:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map_with_path(put, batch)


def to_host(tree: Any) -> Any:
  """Device arrays → numpy on every host. On one host a `device_get`; on several, arrays whose
  shards all live here are read directly, replicated ones from a local copy, and the rest are
  gathered across processes (a collective: every host must call this with the same arrays)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))

  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)
