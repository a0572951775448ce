"""Device mesh, multi-host start-up, and logical-axis sharding rules (`mesh.py`, `sharding.py`)."""

from specs_jax.parallel.mesh import (AXES, BATCH_AXES, batch_shardings, data_sharding, host_local_to_global,
                                     make_mesh, maybe_initialize_distributed, replicated)
from specs_jax.parallel.sharding import (LOGICAL_TO_MESH, PARAM_RULES, param_partition_specs, param_shardings,
                                         shard_params, sharding_fn, state_shardings)

__all__ = [
    "AXES", "BATCH_AXES", "batch_shardings", "data_sharding", "host_local_to_global", "make_mesh",
    "maybe_initialize_distributed", "replicated",
    "LOGICAL_TO_MESH", "PARAM_RULES", "param_partition_specs", "param_shardings", "shard_params", "sharding_fn",
    "state_shardings",
]
