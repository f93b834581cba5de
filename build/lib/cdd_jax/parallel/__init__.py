"""Sharding and multi-host helpers: mesh, logical-axis rules, state/batch shardings, start-up."""

from cdd_jax.parallel.config import LOGICAL_AXIS_RULES, MESH_AXES, mesh_config
from cdd_jax.parallel.distributed import (
    assert_same_config_across_processes,
    config_fingerprint,
    detect_cluster,
    is_main_process,
    maybe_initialize,
)
from cdd_jax.parallel.mesh import (
    BATCH_AXES,
    check_batch_divisible,
    check_mesh_config,
    data_parallel_size,
    make_mesh,
    resolve_sizes,
)
from cdd_jax.parallel.sharding import (
    batch_sharding,
    global_batch,
    logical_state_shardings,
    logical_to_spec,
    normalize_rules,
    replicated,
    sharding_context,
    unbox,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "assert_same_config_across_processes",
    "batch_sharding",
    "check_batch_divisible",
    "check_mesh_config",
    "config_fingerprint",
    "data_parallel_size",
    "detect_cluster",
    "global_batch",
    "is_main_process",
    "logical_state_shardings",
    "logical_to_spec",
    "make_mesh",
    "maybe_initialize",
    "mesh_config",
    "normalize_rules",
    "replicated",
    "resolve_sizes",
    "sharding_context",
    "unbox",
]
