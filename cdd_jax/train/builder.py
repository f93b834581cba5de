"""The one builder of the compiled, sharded train step, used by the loop, the benchmarks and the
tests.

    step = build_train_step(job, config)         # mesh, optimiser, sharded initial state
    step.state = ...                             # (optionally) a restored checkpoint
    step.compile(batch)                          # AOT: in/out shardings, donated state
    step.state, metrics = step(batch)

State shardings come from `jax.eval_shape` of the init function and the config's logical-axis
rules (`cdd_jax.parallel`); the per-step rng is `fold_in(base_rng, state.step)`, so a resumed run
draws the same randomness as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cdd_jax.console import note, verbose
from cdd_jax.parallel.mesh import check_batch_divisible, make_mesh
from cdd_jax.parallel.sharding import (
    batch_sharding,
    global_batch,
    logical_state_shardings,
    replicated,
    sharding_context,
    unbox,
)
from cdd_jax.train.job import Job
from cdd_jax.train.state import TrainState, create_state, make_optimizer, param_labels
from cdd_jax.train.step import make_train_step

PyTree = Any


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program from XLA's cost analysis, per device (XLA analyses
    the SPMD program each device runs); None where the backend reports no costs."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def compiled_info(compiled, num_devices: int = 1) -> dict[str, float]:
    """FLOPs and memory of a compiled step. XLA analyses the SPMD program that each device runs,
    so both are per device; `flops_per_step` multiplies by `num_devices`, the program's device
    count (exact for data parallelism)."""
    info: dict[str, float] = {}
    flops = compiled_flops(compiled)
    if flops is not None:
        info["flops_per_step_per_device"] = flops
        info["flops_per_step"] = flops * num_devices
    try:
        mem = compiled.memory_analysis()
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            info[field] = float(getattr(mem, field))
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    return info


@dataclasses.dataclass
class TrainStep:
    """The sharded state and its step. `state` is donated: each call replaces it."""

    mesh: Mesh
    rules: Any
    state: TrainState
    state_shardings: Any
    labels: PyTree
    finetuned: PyTree  # Device copy of `Job.finetuned_params` (None if the job has none).
    frozen_inputs: PyTree  # Device copy of `Job.frozen_inputs`, replicated (or None).
    base_rng: jax.Array
    jitted: Any
    compiled: Any = None
    trace_s: float = float("nan")
    compile_s: float = float("nan")

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's batch as a global array sharded over the batch axes."""
        return global_batch(local_batch, self.mesh)

    def compile(self, batch: dict[str, jax.Array]) -> TrainStep:
        """Lowers and compiles the step ahead of time for `batch`'s shapes."""
        with sharding_context(self.mesh, self.rules):  # binds activation constraints
            t0 = time.perf_counter()
            lowered = self.jitted.lower(self.state, batch, self.base_rng, self.finetuned,
                                        self.frozen_inputs)
            t1 = time.perf_counter()
            self.compiled = lowered.compile()
            self.trace_s, self.compile_s = t1 - t0, time.perf_counter() - t1
        return self

    def __call__(self, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        self.state, metrics = self.compiled(self.state, batch, self.base_rng, self.finetuned,
                                            self.frozen_inputs)
        return self.state, metrics

    def info(self) -> dict[str, float]:
        """Compile seconds (tracing and lowering included; `trace_seconds` of them tracing and
        lowering alone), FLOPs per step and memory of the compiled step."""
        return {"compile_seconds": self.trace_s + self.compile_s, "trace_seconds": self.trace_s,
                **compiled_info(self.compiled, self.mesh.size)}

    def abstract_state(self) -> TrainState:
        """The state's shapes with their shardings: the restore target of a checkpoint."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.state, self.state_shardings)


def build_train_step(job: Job, config: ml_collections.ConfigDict, *, donate: bool = True,
                     devices: Sequence[jax.Device] | None = None) -> TrainStep:
    """Mesh, labels and optimiser, the initial state (random init, then `job.initial_params`)
    placed with its shardings, and the jitted step (compile it with `TrainStep.compile`).
    `devices`: the mesh's devices (default: all of them, as training uses)."""
    mesh = make_mesh(config.mesh, devices)
    check_batch_divisible(config.data.batch_size, mesh, jax.process_count())
    abstract_params = unbox(jax.eval_shape(job.init_params, jax.random.key(0)))
    labels = param_labels(abstract_params, freeze_backbone=job.freeze_backbone)
    tx, schedules = make_optimizer(config.optim, config.train.num_steps, labels)
    with_target = job.target_ema is not None

    def init_state(rng):
        return create_state(job.init_params(rng), tx, with_target=with_target)

    state_sh = logical_state_shardings(jax.eval_shape(init_state, jax.random.key(0)), mesh,
                                       config.mesh.logical_axis_rules,
                                       config.mesh.min_shard_bytes)
    init_rng, base_rng = jax.random.split(jax.random.key(config.seed))
    if job.initial_params is None:
        state = jax.jit(lambda r: unbox(init_state(r)), out_shardings=state_sh)(init_rng)
    else:  # the parameters are replaced below: zeros of their shapes (no initialiser compiled)
        def zero_state():
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params)
            return create_state(zeros, tx, with_target=with_target)

        state = jax.jit(zero_state, out_shardings=state_sh)()
    if job.initial_params is not None:
        # Separate buffers for each copy: the step donates its state, and one buffer cannot be
        # donated twice.
        def put():
            return jax.tree.map(lambda x, s: jax.device_put(np.array(x), s),
                                job.initial_params, state_sh.params)

        state = state.replace(params=put(), ema_params=put(),
                              target_params=put() if with_target else None)
    finetuned, finetuned_sh = job.finetuned_params, None
    if finetuned is not None:
        finetuned_sh = state_sh.params
        finetuned = jax.device_put(finetuned, finetuned_sh)

    present = set(jax.tree.leaves(labels))
    inner = make_train_step(job.loss_fn, tx, labels, ema=job.ema, target_ema=job.target_ema,
                            lr_schedules={k: v for k, v in schedules.items() if k in present})

    frozen_inputs = job.frozen_inputs
    if frozen_inputs is not None:
        frozen_inputs = jax.device_put(frozen_inputs, replicated(mesh))

    def step_fn(state, batch, base_rng, finetuned_params, frozen):
        rng = jax.random.fold_in(base_rng, state.step)
        return inner(state, batch, rng, finetuned_params, frozen)

    jitted = jax.jit(step_fn,
                     in_shardings=(state_sh, batch_sharding(mesh), replicated(mesh), finetuned_sh,
                                   None if frozen_inputs is None else replicated(mesh)),
                     out_shardings=(state_sh, replicated(mesh)),
                     donate_argnums=(0,) if donate else ())
    return TrainStep(mesh, config.mesh.logical_axis_rules, state, state_sh, labels, finetuned,
                     frozen_inputs,
                     base_rng, jitted)


def log_step_info(step: TrainStep, name: str) -> dict[str, float]:
    info = step.info()
    if verbose():
        logging.info("[%s] compiled train step: %s", name, json.dumps(info))
    else:
        note("[%s] compiled train step in %.1f s", name, info.get("compile_seconds", float("nan")))
    return info
