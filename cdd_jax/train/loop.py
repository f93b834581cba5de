"""The training loop shared by every stage (pretraining, distillation, baselines).

`train(job, config, workdir)`: the compiled step from `build_train_step`, resume from the newest
complete checkpoint (state + data iterator), the grain input pipeline, logging, periodic
evaluation and samples, SIGTERM-safe checkpointing, and the non-finite policy.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from cdd_jax.console import note, progress
from cdd_jax.data.pipeline import make_train_iterator
from cdd_jax.parallel.distributed import is_main_process
from cdd_jax.train.builder import TrainStep, build_train_step, log_step_info
from cdd_jax.train.checkpoint import Checkpointer
from cdd_jax.train.job import Job
from cdd_jax.train.state import TrainState, count_params


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


class _Window:
    """Per-step metrics of the current logging window, summarised as means."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.values: dict[str, list] = {}
        self.wait_s = 0.0
        self.wall0 = time.time()

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)

    def summary(self, state: TrainState) -> tuple[dict[str, float], np.ndarray]:
        """(means, and the per-step finite flags of this window: 0 marks a skipped update)."""
        finite = np.asarray(jax.device_get(self.values.get("finite", [])))
        out = {k: float(np.mean(jax.device_get(v))) for k, v in self.values.items()}
        out["data_wait_fraction"] = self.wait_s / max(time.time() - self.wall0, 1e-9)
        out["nonfinite_steps"] = int(state.nonfinite_steps)
        return out, finite


def _log_parameters(step: TrainStep, job: Job, writer) -> None:
    n_total = count_params(step.state.params)
    n_train = int(sum(x.size for x, lab in zip(jax.tree.leaves(step.state.params),
                                                  jax.tree.leaves(step.labels), strict=True)
                      if lab != "frozen"))
    note("[%s] parameters: %d total, %d trainable", job.name, n_total, n_train)
    # "global": the statistics of arrays sharded over several processes need a collective (every
    # process takes part; a plain device_get cannot fetch them). Process 0 logs the table.
    parameter_overview.log_parameter_overview(step.state.params, include_stats="global",
                                              jax_logging_process=0)
    writer.write_hparams({"params_total": n_total, "params_trainable": n_train})


def _periodic(job: Job, tcfg, writer, workdir: str, state: TrainState, step: int,
              final: bool = False) -> None:
    """Held-out evaluation (at the start, every `eval_every` and at the end) and sample grids."""
    if job.eval_fn is not None and (final or step == 0 or (
            tcfg.eval_every and step % tcfg.eval_every == 0)):
        scalars = job.eval_fn(state)
        writer.write_scalars(step, scalars)
        note("[%s] step %d eval %s", job.name, step,
             ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))
    if job.sample_fn is not None and (final or (tcfg.sample_every and step > 0
                                                and step % tcfg.sample_every == 0)):
        grid = job.sample_fn(state)
        writer.write_images(step, {"samples": grid[None]})
        if is_main_process():
            from PIL import Image

            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            Image.fromarray(grid).save(os.path.join(workdir, "samples", f"{step:07d}.png"))


def prepared_batch(job: Job, batch: dict) -> dict:
    """`job.prepare_batch(batch)`, each array kept on the data pipeline's batch sharding."""
    if job.prepare_batch is None:
        return batch
    out = job.prepare_batch(batch)
    return {k: jax.device_put(v, batch[k].sharding if k in batch else v.sharding)
            for k, v in out.items()}


def train(job: Job, config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `job` in `workdir` (resuming if a checkpoint is there) and returns the final state."""
    tcfg = config.train
    os.makedirs(workdir, exist_ok=True)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main_process())
    step_fn = build_train_step(job, config)
    _log_parameters(step_fn, job, writer)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints,
                        async_save=tcfg.async_checkpoints)
    restored = ckpt.restore_latest(step_fn.abstract_state())
    data_state = None
    if restored is not None:
        start, step_fn.state, data_state = restored
        note("[%s] resumed from step %d", job.name, start)
    start_step = int(step_fn.state.step)
    if restored is not None and start_step >= tcfg.num_steps:
        # A finished run (a re-run that re-evaluates or re-exports): no data, no compile.
        note("[%s] already trained to step %d: evaluating only", job.name, start_step)
        _periodic(job, tcfg, writer, workdir, step_fn.state, start_step, final=True)
        ckpt.close()
        writer.flush()
        return step_fn.state

    dataset = job.make_dataset(jax.process_index(), jax.process_count())
    it = make_train_iterator(dataset, config.data.num_workers, config.data.prefetch,
                             read_threads=config.data.read_threads)
    if data_state:
        it.set_state(data_state)
    batch = prepared_batch(job, step_fn.global_batch(next(it)))
    step_fn.compile(batch)
    writer.write_scalars(start_step, log_step_info(step_fn, job.name))

    state = _run_steps(job, config, workdir, step_fn, it, batch, ckpt, writer, start_step)
    if int(state.step) != start_step or restored is None:
        ckpt.save(int(state.step), state, it.get_state(), config.to_dict(), force=True)
    _periodic(job, tcfg, writer, workdir, state, int(state.step), final=True)
    ckpt.close()
    writer.flush()
    return state


def _run_steps(job: Job, config, workdir: str, step_fn: TrainStep, it, batch, ckpt, writer,
               start_step: int) -> TrainState:
    """Steps from `start_step` to `train.num_steps`: logs, evaluation, checkpoints, preemption
    (checkpoint and SystemExit(0)) and the non-finite policy ("halt": FloatingPointError)."""
    tcfg, config_dict = config.train, config.to_dict()
    hooks = [periodic_actions.ReportProgress(num_train_steps=tcfg.num_steps, writer=writer,
                                             every_steps=tcfg.log_every)]
    if tcfg.profile and is_main_process():
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))
    state = step_fn.state
    if start_step == 0:
        _periodic(job, tcfg, writer, workdir, state, 0)
    window, halted, step = _Window(), None, start_step
    bar = progress(tcfg.num_steps, start_step, f"[{job.name}]")
    with _Preemption() as preempt, bar:
        while step < tcfg.num_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(batch)
            step += 1
            window.add(metrics)
            bar.update(1)
            for h in hooks:
                h(step)
            if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                summary, finite = window.summary(state)
                writer.write_scalars(step, summary)
                bar.set_postfix(loss=f"{summary['loss']:.4g}", refresh=False)
                window.reset()
                if tcfg.nonfinite == "halt" and finite.size and not finite.all():
                    halted = (step - finite.size + 1 + int(np.argmin(finite)), step)
                    break
            _periodic(job, tcfg, writer, workdir, state, step)
            if step % tcfg.ckpt_every == 0 and step < tcfg.num_steps:
                ckpt.save(step, state, it.get_state(), config_dict)
            if preempt.requested or (jax.process_count() > 1 and ckpt.reached_preemption(step)):
                logging.warning("[%s] preempted at step %d: checkpointing and exiting", job.name,
                                step)
                ckpt.save(step, state, it.get_state(), config_dict, force=True)
                ckpt.close()
                writer.flush()
                raise SystemExit(0)
            if step < tcfg.num_steps:
                t_wait = time.time()
                batch = prepared_batch(job, step_fn.global_batch(next(it)))
                window.wait_s += time.time() - t_wait
    if halted is not None:
        ckpt.close()
        raise FloatingPointError(
            f"[{job.name}] non-finite loss or gradients at step {halted[0]} (detected at step "
            f"{halted[1]}; {int(state.nonfinite_steps)} updates skipped, none applied); "
            f"train.nonfinite='halt'. The last good checkpoint in {ckpt.directory} is kept.")
    return state
