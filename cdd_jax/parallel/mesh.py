"""Device mesh construction from the `mesh` config section, and batch-size checks."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Mesh axes the batch dimension is split over (in this order) when present in the mesh.
BATCH_AXES = ("data", "fsdp")


def resolve_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 in `sizes` by whatever fills `num_devices`; checks the product."""
    sizes = tuple(int(s) for s in sizes)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh sizes must be positive or -1, got {sizes}.")
    n_fill = sizes.count(-1)
    if n_fill > 1:
        raise ValueError(f"At most one mesh size may be -1, got {sizes}.")
    known = math.prod(s for s in sizes if s != -1)
    if n_fill == 1:
        if num_devices % known:
            raise ValueError(
                f"Mesh sizes {sizes}: the fixed sizes multiply to {known}, which does not divide "
                f"the device count {num_devices}."
            )
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    elif known != num_devices:
        raise ValueError(
            f"Mesh sizes {sizes} multiply to {known}, but there are {num_devices} devices."
        )
    return sizes


def _get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def _axes(mesh_cfg: Any) -> tuple[str, ...]:
    """The config's axis names, checked against its sizes."""
    axes = tuple(_get(mesh_cfg, "axes"))
    sizes = tuple(_get(mesh_cfg, "sizes"))
    if len(axes) != len(sizes):
        raise ValueError(f"Mesh axes {axes} and sizes {sizes} differ in length.")
    if len(set(axes)) != len(axes):
        raise ValueError(f"Mesh axis names must be unique, got {axes}.")
    return axes


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `Mesh` with `Auto` axis types from a config with `axes` and `sizes`.

    `devices` defaults to all global devices (every process must pass the same list). Auto axes keep
    the classic behaviour: jit's in/out shardings and logical constraints steer the partitioner,
    and shardings are not part of the array types (jax.make_mesh now defaults to Explicit).
    """
    axes = _axes(mesh_cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(_get(mesh_cfg, "sizes"), len(devices))
    return jax.make_mesh(sizes, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: the product of the mesh's data and fsdp axis sizes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def check_batch_divisible(
    global_batch: int, mesh: Mesh | Mapping[str, int], process_count: int | None = None
) -> int:
    """Checks that `global_batch` splits evenly over batch shards and processes.

    `mesh` is a Mesh or its shape ({axis name: size}). Returns the per-process batch size (what
    each host's data pipeline must produce).
    """
    if process_count is None:
        process_count = jax.process_count()
    if not isinstance(global_batch, (int, np.integer)) or global_batch <= 0:
        raise ValueError(f"Global batch size must be a positive int, got {global_batch!r}.")
    shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    dp = math.prod(shape[a] for a in BATCH_AXES if a in shape)
    if global_batch % dp:
        raise ValueError(
            f"Global batch size {global_batch} is not divisible by the data-parallel size {dp} "
            f"(mesh {shape}, batch split over {BATCH_AXES})."
        )
    if global_batch % process_count:
        raise ValueError(
            f"Global batch size {global_batch} is not divisible by the process count "
            f"{process_count}."
        )
    return int(global_batch) // process_count


def check_mesh_config(
    mesh_cfg: Any,
    global_batch: int,
    num_devices: int | None = None,
    process_count: int | None = None,
) -> dict[str, int]:
    """Validates a `mesh` config section against the devices and the global batch size.

    Builds nothing and compiles nothing, so configuration checks can call it before any data is
    loaded or any model is initialised: the mesh sizes must multiply to the device count (default:
    all global devices) and the global batch must split over the data-parallel size and the
    processes. Returns the resolved mesh shape {axis name: size}.
    """
    axes = _axes(mesh_cfg)
    if num_devices is None:
        num_devices = jax.device_count()
    shape = dict(zip(axes, resolve_sizes(_get(mesh_cfg, "sizes"), num_devices), strict=True))
    check_batch_divisible(global_batch, shape, process_count)
    return shape


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_cpu_devices(requested: int, batch_size: int, cores: int | None = None) -> int:
    """The CPU device count `mesh.num_cpu_devices` asks for: `requested` when positive; for -1
    ("auto") the largest divisor of `batch_size` not above the usable cores (so the batch splits
    evenly, one device per core); 0 means "leave JAX's setting" and is returned as 0."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < -1:
        raise ValueError(
            f"mesh.num_cpu_devices must be -1 (one per core), 0 (JAX's default) or a positive "
            f"count, got {requested}."
        )
    if requested != -1:
        return requested
    cores = usable_cores() if cores is None else cores
    return max(d for d in range(1, max(1, min(cores, batch_size)) + 1) if batch_size % d == 0)


def _cpu_count_set_elsewhere() -> str | None:
    """Names the user's explicit CPU-device setting (environment), which takes precedence."""
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return "JAX_NUM_CPU_DEVICES"
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return "XLA_FLAGS=--xla_force_host_platform_device_count"
    return None


def configure_cpu_devices(requested: int, batch_size: int) -> int | None:
    """Splits the host CPU into several XLA devices before JAX starts its backends.

    XLA:CPU runs a step's operations largely one after another and only its large convolutions
    use every core; with one device per core the data-parallel mesh keeps all cores busy on
    separate shards of the batch (measured on the 2-core machine: docs/PERFORMANCE.md). It only
    affects the CPU backend: on GPU/TPU hosts the accelerator devices form the mesh.

    Returns the device count set, or None when nothing was changed: `requested` is 0, the user
    chose a count in the environment (`JAX_NUM_CPU_DEVICES` or XLA_FLAGS' host device count),
    or the backends already run (JAX cannot re-split them; a warning says so if they differ).
    """
    from absl import logging

    n = resolve_num_cpu_devices(requested, batch_size)
    if n == 0:
        return None
    other = _cpu_count_set_elsewhere()
    if other is not None:
        logging.info("mesh.num_cpu_devices=%d not applied: %s is set.", requested, other)
        return None
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends already run (JAX's validator refuses a change)
        if jax.default_backend() == "cpu" and jax.local_device_count() != n:
            logging.warning(
                "mesh.num_cpu_devices asks for %d CPU devices but JAX's backends already run "
                "with %d; it takes effect only when set before the first JAX operation (the "
                "CLI and train_and_evaluate do this first). Continuing with %d.",
                n, jax.local_device_count(), jax.local_device_count(),
            )
        return None
    logging.info("JAX CPU backend split into %d devices (mesh.num_cpu_devices=%d).", n, requested)
    return n
