"""Parameter and train-state shardings for Qwen2.5-VL from logical-axis rules.

Two tables, both plain data:

  PARAM_RULES        parameter path regex → logical axes of its dimensions, first match wins:
                     ("model/layers_3/mlp/gate_proj/kernel" → ("embed", "mlp"))
  LOGICAL_TO_MESH    logical axis → mesh axis (or None = replicated):
                     embed → fsdp, vocab / heads / mlp → tensor, layers → None

Paths are the param pytree's keys joined by "/" (HF-mirroring names, see STYLE.md §4). Kernels are
[in, out] (linen). Stacked layers (`scan_layers`) have one extra leading dimension, which gets the
"layers" logical axis (replicated). Norm scales and biases are replicated.

A mesh axis is dropped from a dimension it does not divide (e.g. a vocab of 483 on tensor=2), axes
of size 1 are left out (specs stay canonical: P("fsdp") rather than P("fsdp", "tensor") on
tensor=1), and a mesh axis is used at most once per parameter; the resulting spec is still correct,
only less sharded. `state_shardings` gives the optimizer moments the same specs as their parameters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "LOGICAL_TO_MESH",
    "PARAM_RULES",
    "logical_axes",
    "param_partition_specs",
    "param_shardings",
    "shard_params",
    "sharding_fn",
    "state_shardings",
]

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, tuple[str | None, ...]]]

PARAM_RULES: Rules = (
    # text decoder
    (r"(^|/)embed_tokens/embedding$", ("vocab", "embed")),                    # [V, D]
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),                            # [D, V]
    (r"self_attn/(q|k|v)_proj/kernel$", ("embed", "heads")),                  # [D, H·hd]
    (r"self_attn/o_proj/kernel$", ("heads", "embed")),                        # [H·hd, D]
    (r"mlp/(gate|up)_proj/kernel$", ("embed", "mlp")),                        # [D, F] (text and vision)
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),                             # [F, D]
    # vision tower
    (r"^visual/patch_embed/proj/kernel$", (None, "embed")),                   # [C·t·p·p, Dv]
    (r"^visual/.*attn/qkv/kernel$", ("embed", "heads")),                      # [Dv, 3·Dv]
    (r"^visual/.*attn/proj/kernel$", ("heads", "embed")),                     # [Dv, Dv]
    (r"^visual/merger/mlp_0/kernel$", ("embed", "mlp")),                      # [4·Dv, 4·Dv]
    (r"^visual/merger/mlp_2/kernel$", ("mlp", "embed")),                      # [4·Dv, D]
    # replicated: norm scales, biases
    (r"(^|/)(scale|bias|weight)$", ()),
)

LOGICAL_TO_MESH: Mapping[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "layers": None,
}


def path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def logical_axes(path: str, ndim: int, rules: Rules = PARAM_RULES) -> tuple[str | None, ...]:
  """Logical axes of the parameter at `path` with `ndim` dimensions.

  The first matching rule gives the trailing dimensions; extra leading dimensions (stacked layers)
  get "layers". A rule with no axes, or no matching rule, means replicated (unmatched parameters
  with 2+ dimensions are logged, since they are probably a missing rule).
  """
  for pattern, axes in rules:
    if re.search(pattern, path):
      if not axes:
        return (None,) * ndim
      if len(axes) > ndim:
        raise ValueError(f"rule {pattern!r} gives {len(axes)} axes to {path!r}, which has {ndim} dims")
      return ("layers",) * (ndim - len(axes)) + tuple(axes)
  if ndim >= 2:
    log.warning("no sharding rule for %s (%d dims): replicated", path, ndim)
  return (None,) * ndim


def _spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules,
              logical_to_mesh: Mapping[str, str | None]) -> P:
  used: set[str] = set()
  spec: list[str | None] = []
  for dim, logical in zip(shape, logical_axes(path, len(shape), rules)):
    axis = logical_to_mesh.get(logical) if logical is not None else None
    if axis is not None and axis not in mesh.shape:
      raise ValueError(f"logical axis {logical!r} maps to {axis!r}, which is not a mesh axis {tuple(mesh.shape)}")
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      if axis is not None and dim % mesh.shape[axis]:
        log.debug("%s: dim %d not divisible by %s=%d, replicated on it", path, dim, axis, mesh.shape[axis])
      spec.append(None)
      continue
    used.add(axis)
    spec.append(axis)
  while spec and spec[-1] is None:   # P("fsdp", None) == P("fsdp"); keep specs canonical
    spec.pop()
  return P(*spec)


def param_partition_specs(params_or_shapes: Any, mesh: Mesh, rules: Rules = PARAM_RULES,
                          logical_to_mesh: Mapping[str, str | None] = LOGICAL_TO_MESH) -> Any:
  """A pytree of `PartitionSpec`s for a params pytree (arrays or `jax.ShapeDtypeStruct`s).

  Args:
    params_or_shapes: the params pytree, or its `jax.eval_shape` counterpart.
    mesh: the mesh (its axis sizes decide which dims are divisible).
    rules: (path regex, logical axes) pairs, first match wins.
    logical_to_mesh: logical axis → mesh axis name or None.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _spec_for(path_str(path), x.shape, mesh, rules, logical_to_mesh), params_or_shapes)


def param_shardings(params_or_shapes: Any, mesh: Mesh, rules: Rules = PARAM_RULES,
                    logical_to_mesh: Mapping[str, str | None] = LOGICAL_TO_MESH) -> Any:
  """`param_partition_specs` as `NamedSharding`s on `mesh`."""
  specs = param_partition_specs(params_or_shapes, mesh, rules, logical_to_mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh, rules: Rules = PARAM_RULES,
                 logical_to_mesh: Mapping[str, str | None] = LOGICAL_TO_MESH) -> Any:
  """Places every parameter with its rule's sharding (`jax.device_put`)."""
  return jax.device_put(params, param_shardings(params, mesh, rules, logical_to_mesh))


def sharding_fn(mesh: Mesh, rules: Rules = PARAM_RULES,
                logical_to_mesh: Mapping[str, str | None] = LOGICAL_TO_MESH):
  """A `(path tuple, shape) -> NamedSharding` callable for `qwen2_5_vl.from_pretrained(sharding_fn=...)`,
  so each tensor is placed sharded as it is read (a 7B checkpoint never sits whole on one device)."""
  def fn(path: Sequence[str], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, _spec_for("/".join(map(str, path)), shape, mesh, rules, logical_to_mesh))
  return fn


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = PARAM_RULES,
                    logical_to_mesh: Mapping[str, str | None] = LOGICAL_TO_MESH) -> Any:
  """`NamedSharding`s for a whole train state (a `TrainState` or any pytree with a "params" field).

  Parameters get their rule's sharding. Every other leaf whose trailing dict keys name a parameter
  and whose shape equals it (Adam's mu / nu, wherever optax nests them, e.g. under
  `inner_states["trainable"]` of a multi_transform) gets the same sharding; everything else (step
  counters, the RNG key, schedule counts) is replicated.

  Args:
    abstract_state: the state or its `jax.eval_shape` (leaves need `.shape`).
  Returns:
    a pytree of `NamedSharding` with the structure of `abstract_state` (pass it to jit's
    in/out_shardings or as the target shardings of a checkpoint restore).
  """
  params = abstract_state.params if hasattr(abstract_state, "params") else abstract_state["params"]
  specs: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    keys = _dict_keys(path)
    specs[keys] = (tuple(x.shape), _spec_for("/".join(keys), x.shape, mesh, rules, logical_to_mesh))

  def leaf(path, x):
    keys = _dict_keys(path)
    shape = tuple(getattr(x, "shape", ()))
    for start in range(len(keys)):
      hit = specs.get(keys[start:])
      if hit is not None and hit[0] == shape:
        return NamedSharding(mesh, hit[1])
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(leaf, abstract_state)
