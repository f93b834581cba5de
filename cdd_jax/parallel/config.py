"""Default mesh and logical-axis-rule configuration (the `config.mesh` section).

The sharding story lives in the config, not in code: the U-Net annotates its parameters with logical
axis names (`nn.with_logical_partitioning`) and its activations with logical constraints
(`nn.with_logical_constraint`); the rules below map each logical name to mesh axes.
"""

from __future__ import annotations

import ml_collections

from cdd_jax import config_checks as checks

# Mesh axis names, outermost (slowest interconnect) first: pure data parallelism, fully sharded data
# parallelism (the batch *and* the large parameters/optimiser state are split), tensor parallelism.
MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes or None). Order matters: the first rule naming a logical axis wins, and
# a mesh axis already used by an earlier dimension of the same array is not used again.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),  # activations and batches: data parallel over data x fsdp
    ("channels_out", "fsdp"),  # FSDP: large kernels split along their output channels
    ("channels_in", "tensor"),  # tensor parallelism splits input channels
    ("conv_h", None),  # spatial kernel dims stay whole
    ("conv_w", None),
    ("norm", None),  # GroupNorm / LayerNorm scale and bias: small, replicated
    ("height", None),  # activation spatial dims: not split
    ("width", None),
    ("channels", "tensor"),  # activation channels follow tensor parallelism
)


def mesh_config() -> ml_collections.ConfigDict:
    """Returns the default `mesh` config section (pure data parallelism over all devices)."""
    cfg = ml_collections.ConfigDict()
    # Mesh axis names; the logical-axis rules refer to these.
    cfg.axes = MESH_AXES
    # Size of each mesh axis; one entry may be -1 (fills the remaining devices). The product must
    # equal the global device count. E.g. (-1, 1, 1): data parallel; (1, -1, 1): FSDP everywhere.
    cfg.sizes = (-1, 1, 1)
    # Logical axis name -> mesh axis (str), several mesh axes (tuple) or None (replicated).
    cfg.logical_axis_rules = LOGICAL_AXIS_RULES
    # Parameters (and their optimiser/EMA mirrors) smaller than this many bytes stay replicated:
    # sharding tiny tensors costs more in collectives than it saves in memory.
    cfg.min_shard_bytes = 2**16
    # When JAX runs on the CPU: split it into this many XLA devices before the backends start,
    # so the data-parallel mesh keeps every core busy (XLA:CPU alone leaves cores idle between
    # its large kernels; docs/PERFORMANCE.md). 0: JAX's default (one device); -1: one per usable
    # core (the largest divisor of the batch size not above the core count). An explicit
    # JAX_NUM_CPU_DEVICES or XLA_FLAGS host device count wins. No effect on GPU/TPU meshes.
    cfg.num_cpu_devices = 0
    return cfg


def validate_mesh_config(cfg: ml_collections.ConfigDict) -> None:
    """The section's own values; the fit to the devices and the batch is `check_mesh_config`."""
    checks.check_keys(cfg, mesh_config(), "mesh.")
    if len(tuple(cfg.axes)) != len(tuple(cfg.sizes)):
        raise ValueError(f"mesh.axes {tuple(cfg.axes)} and mesh.sizes {tuple(cfg.sizes)} differ "
                         "in length")
    checks.number(cfg, "min_shard_bytes", 0, integer=True, prefix="mesh.")
    checks.number(cfg, "num_cpu_devices", -1, integer=True, prefix="mesh.")
