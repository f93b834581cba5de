"""The "sr" job: teacher -> conditional distillation in <workdir>/distill -> evaluation in
<workdir>/eval (results.json, results.md, grid.png) -> the exported student in <workdir>/student
(`cdd_jax.train.student_folder`: what `cdd_jax.Upscaler` and `python -m cdd_jax.upscale` load)."""

from __future__ import annotations

import os

import ml_collections

from cdd_jax.data.pipeline import make_eval_set, make_sr_transform
from cdd_jax.evaluate.sr import evaluate_sr
from cdd_jax.parallel.distributed import is_main_process
from cdd_jax.stages.distill import distill, latent_space, student_sampler
from cdd_jax.stages.teacher import load_teacher
from cdd_jax.train.student_folder import save_student


def make_sr_eval_set(config: ml_collections.ConfigDict) -> dict:
    """The fixed held-out crops with their degraded (or, for paired data, given) inputs:
    {"image", "lq", "cond"}."""
    return make_eval_set(config.data, task="sr",
                         sr_transform=make_sr_transform(config.data, config.degradation))


def run_sr(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    teacher = load_teacher(config, workdir)
    eval_set = make_sr_eval_set(config)
    params, apply_fn, schedule = distill(config, os.path.join(workdir, "distill"), teacher,
                                         eval_set)
    space, vae_params, _ = latent_space(config)
    sampler = (None if space is None else
               student_sampler(config, apply_fn, schedule, space, vae_params))
    rows = evaluate_sr(config, workdir, apply_fn, params, schedule, eval_set, sampler)
    if is_main_process():
        save_student(os.path.join(workdir, "student"), params, config, metrics=rows,
                     source_workdir=workdir)
    return rows
