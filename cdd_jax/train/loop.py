"""The training loop shared by every stage (pretraining, distillation, baselines).

A `Job` says what to train (model, objective, which parameters train, initial parameters); `train`
does the rest the same way for all of them: mesh and shardings from the abstract state, the step
compiled ahead of time, resume from the newest complete checkpoint (state + data iterator), the
grain input pipeline, logging, periodic evaluation and samples, SIGTERM-safe checkpointing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from cdd_jax.parallel.mesh import check_batch_divisible, make_mesh
from cdd_jax.parallel.sharding import (
    batch_sharding,
    global_batch,
    logical_state_shardings,
    replicated,
    sharding_context,
    unbox,
)
from cdd_jax.train.checkpoint import Checkpointer
from cdd_jax.train.state import (
    TrainState,
    count_params,
    create_state,
    make_optimizer,
    param_labels,
)
from cdd_jax.train.step import make_train_step

PyTree = Any


@dataclasses.dataclass
class Job:
    """What one training stage trains. Everything else comes from the config."""

    name: str  # Sub-directory of the workdir and prefix of the logs ("teacher", "codi", ...).
    init_params: Callable[[jax.Array], PyTree]  # rng -> boxed (logically annotated) params.
    loss_fn: Callable  # (params, target_params, teacher_params, batch, rng) -> (loss, metrics)
    mode: str  # "pretrain" | "codi" | "pe_codi": which parameters train.
    ema: ml_collections.ConfigDict  # Evaluation EMA: decay, warmup.
    target_ema: ml_collections.ConfigDict | None = None  # Target EMA (None: no target).
    initial_params: PyTree = None  # Unboxed params replacing the random init (e.g. teacher).
    teacher_params: PyTree = None  # Frozen parameters passed to the loss (CM / GD teachers).
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None  # Held-out scalars.
    sample_fn: Callable[[TrainState], np.ndarray] | None = None  # -> uint8 image grid (H, W, 3).
    make_dataset: Callable[[int, int], Any] | None = None  # (process_index, count) -> dataset.


class _Preemption:
    """Turns SIGTERM into a flag that the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, never requested
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: finishing the current step, then checkpointing.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _abstract_with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program from XLA's cost analysis, per device (XLA analyses
    the SPMD program each device runs); None where the backend reports no costs."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def _log_compiled(compiled, writer, name: str, num_devices: int = 1) -> dict[str, float]:
    """FLOPs and memory of the compiled step (logged once at start). XLA analyses the SPMD
    program that each device runs, so both are per device; `flops_per_step` multiplies by
    `num_devices`, the program's device count (exact for data parallelism)."""
    info: dict[str, float] = {}
    flops = compiled_flops(compiled)
    if flops is not None:
        info["flops_per_step_per_device"] = flops
        info["flops_per_step"] = flops * num_devices
    try:
        mem = compiled.memory_analysis()
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            info[field] = float(getattr(mem, field))
    except Exception:  # noqa: BLE001
        pass
    logging.info("[%s] compiled train step: %s", name, json.dumps(info))
    return info


def train(job: Job, config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `job` in `workdir` (resuming if a checkpoint is there) and returns the final state."""
    tcfg = config.train
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)

    # --- mesh, optimiser, state shardings (from the abstract state, not per tensor) ----------
    mesh = make_mesh(config.mesh)
    check_batch_divisible(config.data.batch_size, mesh, jax.process_count())
    abstract_params = unbox(jax.eval_shape(job.init_params, jax.random.key(0)))
    labels = param_labels(abstract_params, job.mode)
    tx, schedules = make_optimizer(config.optim, tcfg.num_steps, labels)
    with_target = job.target_ema is not None

    def init_state(rng):
        return create_state(job.init_params(rng), tx, with_target=with_target, labels=labels)

    boxed = jax.eval_shape(init_state, jax.random.key(0))
    state_sh = logical_state_shardings(boxed, mesh, config.mesh.logical_axis_rules,
                                       config.mesh.min_shard_bytes)
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    state = jax.jit(lambda r: unbox(init_state(r)), out_shardings=state_sh)(init_rng)
    if job.initial_params is not None:
        # Separate buffers for each copy: the step donates its state, and one buffer cannot be
        # donated twice.
        def put():
            return jax.tree.map(lambda x, s: jax.device_put(np.array(x), s),
                                job.initial_params, state_sh.params)

        state = state.replace(params=put(), ema_params=put(),
                              target_params=put() if with_target else None)
    teacher_sh = None
    teacher = job.teacher_params
    if teacher is not None:
        teacher_sh = state_sh.params
        teacher = jax.device_put(teacher, teacher_sh)

    n_total = count_params(state.params)
    n_train = int(sum(x.size for x, lab in zip(jax.tree.leaves(state.params),
                                                  jax.tree.leaves(labels)) if lab != "frozen"))
    logging.info("[%s] parameters: %d total, %d trainable (mode %s)", job.name, n_total,
                 n_train, job.mode)
    # "global": the statistics of arrays sharded over several processes need a collective (every
    # process takes part; a plain device_get cannot fetch them). Process 0 logs the table.
    parameter_overview.log_parameter_overview(state.params, include_stats="global",
                                              jax_logging_process=0)
    writer.write_hparams({"params_total": n_total, "params_trainable": n_train})

    # --- checkpoints: resume from the newest complete one ------------------------------------
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints,
                        async_save=tcfg.async_checkpoints)
    restored = ckpt.restore_latest(_abstract_with_shardings(state, state_sh))
    data_state = None
    if restored is not None:
        start, state, data_state = restored
        logging.info("[%s] resumed from step %d", job.name, start)
    start_step = int(state.step)

    # --- data ------------------------------------------------------------------------------
    from cdd_jax.data.pipeline import make_train_iterator

    dataset = job.make_dataset(jax.process_index(), jax.process_count())
    it = make_train_iterator(dataset, config.data.num_workers, config.data.prefetch,
                             read_threads=config.data.read_threads)
    if data_state:
        it.set_state(data_state)

    # --- the step, compiled ahead of time ----------------------------------------------------
    inner = make_train_step(job.loss_fn, tx, labels, ema=job.ema, target_ema=job.target_ema,
                            lr_schedules={k: v for k, v in schedules.items()
                                          if k in set(jax.tree.leaves(labels))})

    def step_fn(state, batch, base_rng, teacher_params):
        rng = jax.random.fold_in(base_rng, state.step)
        return inner(state, batch, rng, teacher_params)

    b_sh = batch_sharding(mesh)
    first = next(it)
    batch = global_batch(first, mesh)
    t0 = time.time()
    jitted = jax.jit(step_fn, in_shardings=(state_sh, b_sh, replicated(mesh), teacher_sh),
                     out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))
    with sharding_context(mesh, config.mesh.logical_axis_rules):  # binds activation constraints
        compiled = jitted.lower(state, batch, step_rng, teacher).compile()
    compile_s = time.time() - t0
    info = _log_compiled(compiled, writer, job.name, mesh.size)
    writer.write_scalars(start_step, {"compile_seconds": compile_s, **info})

    # --- loop --------------------------------------------------------------------------------
    config_dict = config.to_dict()
    report = periodic_actions.ReportProgress(num_train_steps=tcfg.num_steps, writer=writer,
                                             every_steps=tcfg.log_every)
    hooks = [report]
    if tcfg.profile and is_main:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))

    def periodic(step, final=False):
        if job.eval_fn is not None and (final or step == 0 or (
                tcfg.eval_every and step % tcfg.eval_every == 0)):
            scalars = job.eval_fn(state)
            writer.write_scalars(step, scalars)
            logging.info("[%s] step %d eval %s", job.name, step, scalars)
        if job.sample_fn is not None and (final or (tcfg.sample_every and step > 0
                                                    and step % tcfg.sample_every == 0)):
            grid = job.sample_fn(state)
            writer.write_images(step, {"samples": grid[None]})
            if is_main:
                from PIL import Image

                os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
                Image.fromarray(grid).save(os.path.join(workdir, "samples", f"{step:07d}.png"))

    def save(step, force=False):
        ckpt.save(step, state, it.get_state(), config_dict, force=force)

    if start_step == 0:
        periodic(0)
    acc: dict[str, list] = {}
    wait_s = 0.0
    wall0 = time.time()
    halted = None
    step = start_step
    with _Preemption() as preempt:
        while step < tcfg.num_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = compiled(state, batch, step_rng, teacher)
            step += 1
            for k, v in metrics.items():
                acc.setdefault(k, []).append(v)
            for h in hooks:
                h(step)
            if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                # Per-step flags of this window (not the cumulative count, which a run resumed
                # from a "skip" run would carry): 0 marks a skipped non-finite update.
                finite = np.asarray(jax.device_get(acc.get("finite", [])))
                summary = {k: float(np.mean(jax.device_get(v))) for k, v in acc.items()}
                wall = time.time() - wall0
                summary["data_wait_fraction"] = wait_s / max(wall, 1e-9)
                summary["nonfinite_steps"] = int(state.nonfinite_steps)
                writer.write_scalars(step, summary)
                acc, wait_s, wall0 = {}, 0.0, time.time()
                if tcfg.nonfinite == "halt" and finite.size and not finite.all():
                    halted = (step - finite.size + 1 + int(np.argmin(finite)), step)
            if halted is not None:
                break
            periodic(step)
            if step % tcfg.ckpt_every == 0 and step < tcfg.num_steps:
                save(step)
            stop = preempt.requested or (jax.process_count() > 1
                                         and ckpt.reached_preemption(step))
            if stop:
                logging.warning("[%s] preempted at step %d: checkpointing and exiting", job.name,
                                step)
                save(step, force=True)
                ckpt.close()
                writer.flush()
                raise SystemExit(0)
            if step < tcfg.num_steps:
                t_wait = time.time()
                batch = global_batch(next(it), mesh)
                wait_s += time.time() - t_wait

    if halted is not None:
        ckpt.close()
        raise FloatingPointError(
            f"[{job.name}] non-finite loss or gradients at step {halted[0]} (detected at step "
            f"{halted[1]}; {int(state.nonfinite_steps)} updates skipped, none applied); "
            f"train.nonfinite='halt'. The last "
            f"good checkpoint in {ckpt.directory} is kept."
        )
    if int(state.step) != start_step or restored is None:
        save(int(state.step), force=True)
    periodic(int(state.step), final=True)
    ckpt.close()
    writer.flush()
    return state
