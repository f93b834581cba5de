"""Shardings for the train state and batches, derived from logical axis names.

The state's shardings come from its abstract value (`jax.eval_shape` of the init function), never
from hand-written per-tensor specs:

    abstract = jax.eval_shape(init_fn, rng)          # pytree with nn.Partitioned boxes
    shardings = logical_state_shardings(abstract, mesh, cfg.mesh.logical_axis_rules,
                                        cfg.mesh.min_shard_bytes)
    state = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings)(rng)

Optimiser states built from boxed parameters (optax `init` maps over the boxes) carry the same
logical names, so Adam's mu/nu and EMA copies get the parameters' shardings automatically.

Activations use `nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))` inside
the model; for those to bind, trace the step under `jax.set_mesh(mesh)` and
`nn.logical_axis_rules(rules)` (`sharding_context(mesh, rules)` does both); without them the
constraints are no-ops and XLA propagates layouts from the in/out shardings alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cdd_jax.parallel.mesh import BATCH_AXES, check_batch_divisible

MeshAxes = tuple[str, ...]
Rules = tuple[tuple[str, MeshAxes], ...]


def normalize_rules(rules: Sequence[Sequence[Any]], mesh: Mesh | None = None) -> Rules:
    """Checks logical-axis rules and returns them as ((logical, (mesh axes...)), ...).

    Accepts mesh axes as a str, a sequence of str, or None (replicated). With `mesh`, every mesh
    axis a rule names must exist in it.
    """
    out = []
    for rule in rules:
        if isinstance(rule, str) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(
                f"A logical-axis rule must be (logical_name, mesh_axes), got {rule!r}."
            )
        name, axes = rule
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        else:
            axes = tuple(axes)
        for a in axes:
            if not isinstance(a, str):
                raise ValueError(f"Rule {rule!r}: mesh axis names must be str, got {a!r}.")
            if mesh is not None and a not in mesh.shape:
                raise ValueError(
                    f"Rule {rule!r} names mesh axis {a!r}, which is not in the mesh axes "
                    f"{tuple(mesh.axis_names)}."
                )
        out.append((name, axes))
    return tuple(out)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    itemsize: int,
    mesh: Mesh,
    rules: Rules,
    min_shard_bytes: int = 0,
) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec on `mesh`.

    For each dimension the rules naming its logical axis are tried in order; a rule is used if
    its mesh axes are not taken by an earlier dimension and their total size divides the
    dimension, otherwise the dimension stays whole (replicated). Arrays smaller than
    `min_shard_bytes` are replicated entirely. Unknown logical names are an error (a typo would
    otherwise silently replicate a large tensor).
    """
    if len(names) != len(shape):
        raise ValueError(f"Logical names {tuple(names)} do not match the array shape {shape}.")
    if math.prod(shape) * itemsize < min_shard_bytes:
        return PartitionSpec(*([None] * len(shape)))
    known = {name for name, _ in rules}
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in known:
            raise ValueError(
                f"Logical axis {name!r} (array names {tuple(names)}) has no rule in "
                f"{[n for n, _ in rules]}; add one (map it to None to replicate)."
            )
        chosen: tuple[str, ...] = ()
        for rule_name, axes in rules:
            if rule_name != name or used.intersection(axes):
                continue
            if size % math.prod(mesh.shape[a] for a in axes) == 0:
                chosen = axes
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _open_box(x: nn.meta.AxisMetadata) -> Any:
    """The box's content, without the constraint LogicallyPartitioned.unbox adds under a mesh."""
    if isinstance(x, nn.LogicallyPartitioned):
        return x.unbox(apply_constraint=False)
    return x.unbox()


def logical_state_shardings(
    abstract_state: Any,
    mesh: Mesh,
    rules: Sequence[Sequence[Any]],
    min_shard_bytes: int = 0,
) -> Any:
    """NamedShardings for every leaf of `abstract_state` (after `unbox`).

    `abstract_state` is typically `jax.eval_shape(init_fn, rng)`: a pytree whose leaves are
    `nn.Partitioned` boxes (logically annotated parameters and their optimiser mirrors) or plain
    arrays/ShapeDtypeStructs (step counters, optax scalars, unannotated tensors), which are
    replicated. The result has the structure of `unbox(abstract_state)`, ready for `jax.jit`'s
    in/out shardings and for Orbax restore targets.
    """
    rules_t = normalize_rules(rules, mesh)
    rep = replicated(mesh)

    def leaf_sharding(x: Any) -> NamedSharding:
        if _is_box(x) and getattr(x, "names", None) is not None:
            value = _open_box(x)
            if not hasattr(value, "shape"):
                raise TypeError(f"Partitioned box holds a non-array value {value!r}.")
            spec = logical_to_spec(
                x.names,
                value.shape,
                np.dtype(value.dtype).itemsize,
                mesh,
                rules_t,
                min_shard_bytes,
            )
            return NamedSharding(mesh, spec)
        return rep

    return jax.tree.map(leaf_sharding, abstract_state, is_leaf=_is_box)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Iterator[None]:
    """`jax.set_mesh(mesh)` plus flax's logical-axis rules, so activation constraints bind."""
    flax_rules = tuple((name, axes or None) for name, axes in normalize_rules(rules, mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules):
        yield


def unbox(tree: Any) -> Any:
    """Strips flax metadata boxes (nn.Partitioned) from a pytree, leaving the raw arrays.

    Unlike `nn.meta.unbox`, it adds no sharding constraint from flax's own rule mapping (which
    ignores `min_shard_bytes`): layouts come from the shardings given to `jax.jit`.
    """

    return nn.meta.map_axis_meta(lambda x: unbox(_open_box(x)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the mesh's data and fsdp axes; the rest whole."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of the batch into global arrays sharded by batch.

    Every process passes its own rows (leading dimension = global batch / process count); the
    result holds the concatenation over processes in process order, laid out by
    `batch_sharding(mesh)`.
    """
    if not isinstance(local_batch, Mapping) or not local_batch:
        raise TypeError(f"local_batch must be a non-empty dict of arrays, got {type(local_batch)}.")
    sizes = {}
    for key, value in local_batch.items():
        shape = np.shape(value)
        if len(shape) == 0:
            raise ValueError(f"Batch entry {key!r} is a scalar; every entry needs a batch axis.")
        sizes[key] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Batch entries differ in their leading (batch) size: {sizes}.")
    n_local = next(iter(sizes.values()))
    check_batch_divisible(n_local * jax.process_count(), mesh, jax.process_count())
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
