"""Evaluation of a super-resolution student on the held-out crops: PSNR / SSIM / LPIPS of
bicubic upsampling and of the student at K steps with each re-noising, `eval/results.{json,md}`
and a comparison grid; then the same rows on the bundled photos of `evaluate.photos.splits`
through the tiled path (`eval/photos_<split>.{json,md}`, `photos_<split>_per_image.csv`;
`cdd_jax.evaluate.photos`). Also the `evaluate` config section."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.diffusion import Schedule
from cdd_jax.distill.sampling import GRIDS, RENOISE, few_step_sample
from cdd_jax.evaluate.figures import image_grid
from cdd_jax.evaluate.harness import MethodSpec, bicubic_method, evaluate_methods
from cdd_jax.evaluate.metrics import MetricSuite, available_metrics
from cdd_jax.evaluate.photos import (
    evaluate_photos,
    photos_config,
    validate_photos_config,
    write_photo_files,
)
from cdd_jax.evaluate.report import write_results
from cdd_jax.models.apply import ApplyFn
from cdd_jax.parallel.distributed import is_main_process

PyTree = Any


def evaluate_config() -> ml_collections.ConfigDict:
    """The `evaluate` section of a distillation job."""
    c = ml_collections.ConfigDict()
    c.student_steps = (1, 2, 4)  # K of the few-step student sampler.
    c.grid = "uniform"  # Student time grid: "uniform" or "released" (authors' code).
    # How the student's K-step sampler re-noises between steps, one table row each (K = 1 is the
    # same for all, so it is evaluated once): "ddim" (the paper: the noise the network implies)
    # and "fresh" (new Gaussian noise, as consistency models do); distill/sampling.py.
    c.renoise = ("ddim", "fresh")
    # The re-noising an exported student uses unless told otherwise (`python -m cdd_jax.upscale`,
    # `cdd_jax.Upscaler`); "" = the first of `renoise`. Changes no evaluated number.
    c.default_renoise = ""
    c.metrics = ("psnr", "ssim", "lpips_alex")  # Also available: "lpips_vgg".
    c.batch_size = 16  # Images per evaluation batch.
    c.num_grid_images = 8  # Rows of the PNG comparison grid.
    # The evaluation on bundled photos at >= 128 px through the tiled path (`evaluate/photos.py`):
    # by default the validation and test photos' centre crops of 128 px.
    c.photos = photos_config()
    return c


def validate_evaluate_config(cfg: ml_collections.ConfigDict, scale: int = 4) -> None:
    p = "evaluate."
    checks.check_keys(cfg, evaluate_config(), p)
    validate_photos_config(cfg.photos, scale, p)
    checks.positive_ints(cfg, "student_steps", prefix=p)
    checks.choice(cfg, "grid", GRIDS, prefix=p)
    checks.subset(cfg, "renoise", RENOISE, prefix=p)
    if cfg.default_renoise and cfg.default_renoise not in cfg.renoise:
        raise ValueError(f"{p}default_renoise={cfg.default_renoise!r} is not one of the evaluated "
                         f"{p}renoise={tuple(cfg.renoise)} (or '' for the first of them)")
    checks.subset(cfg, "metrics", tuple(available_metrics()), prefix=p)
    for key in ("batch_size", "num_grid_images"):
        checks.number(cfg, key, 1, integer=True, prefix=p)


def student_key(k: int, renoise: str, all_renoise) -> str:
    """Method key of the student at K steps: "student_K4", or "student_K4_fresh" for a
    re-noising other than the first configured one."""
    return f"student_K{k}" + ("" if renoise == all_renoise[0] else f"_{renoise}")


def student_sample(config: ml_collections.ConfigDict, apply_fn: ApplyFn, schedule: Schedule,
                   k: int, renoise: str):
    """sample(params, cond, rng, noise=None) -> x: the student's K-step sampler as the job
    evaluates it (`few_step_sample`; `noise`: the Gaussian draws, e.g. one field over tiles)."""

    def sample(params, cond, rng, noise=None):
        return few_step_sample(apply_fn, params, cond, rng, schedule=schedule, num_steps=k,
                               grid=config.evaluate.grid, renoise=renoise, noise=noise,
                               prediction_type=config.diffusion.prediction_type)

    return sample


def student_plan(ecfg: ml_collections.ConfigDict) -> list[tuple[str, int, str]]:
    """(method key, K, re-noising) of every student row: each K with each re-noising, K = 1
    once (one step never re-noises: the same samples as the first re-noising's)."""
    return [(student_key(k, r, ecfg.renoise), k, r) for r in ecfg.renoise
            for k in ecfg.student_steps if k != 1 or r == ecfg.renoise[0]]


def student_methods(config: ml_collections.ConfigDict, apply_fn: ApplyFn, params: PyTree,
                    schedule: Schedule, sampler=None) -> dict[str, MethodSpec]:
    """Bicubic and the student at each K and re-noising of `config.evaluate`. `sampler`:
    optional sample(params, cond, rng, K, renoise) -> images replacing the pixel-space
    `few_step_sample` (a latent student decoded through its VAE)."""
    ecfg = config.evaluate
    params = jax.device_put(params)
    methods = {"bicubic": bicubic_method()}
    for key, k, renoise in student_plan(ecfg):
        if sampler is not None:
            fn = jax.jit(lambda cond, rng, k=k, r=renoise: sampler(params, cond, rng, k, r))
        else:
            sample = student_sample(config, apply_fn, schedule, k, renoise)
            fn = jax.jit(lambda cond, rng, sample=sample: sample(params, cond, rng))
        methods[key] = MethodSpec(config.distill.objective, f"{renoise}-{ecfg.grid}", k,
                                  lambda cond, lq, rng, fn=fn: fn(cond, rng),
                                  prompts=config.data.prompts == "captions")
    return methods


def student_photo_methods(config: ml_collections.ConfigDict, apply_fn: ApplyFn, params: PyTree,
                          schedule: Schedule) -> dict[tuple, tuple | None]:
    """The rows of `student_methods` for `photos.evaluate_photos`: (method, sampler, steps) ->
    (tile sample function, params), None for bicubic."""
    ecfg = config.evaluate
    methods: dict[tuple, tuple | None] = {("bicubic", "none", 0): None}
    for _, k, renoise in student_plan(ecfg):
        methods[(config.distill.objective, f"{renoise}-{ecfg.grid}", k)] = (
            student_sample(config, apply_fn, schedule, k, renoise), params)
    return methods


def evaluate_sr(config: ml_collections.ConfigDict, workdir: str, apply_fn: ApplyFn,
                params: PyTree, schedule: Schedule, eval_set: dict,
                sampler=None) -> list[dict]:
    """Stage 3: the student against bicubic on `eval_set`; writes <workdir>/eval."""
    ecfg = config.evaluate
    methods = student_methods(config, apply_fn, params, schedule, sampler)
    results = evaluate_methods(methods, eval_set, MetricSuite(ecfg.metrics),
                               batch_size=ecfg.batch_size, rng_seed=config.seed)
    out = os.path.join(workdir, "eval")
    n = ecfg.num_grid_images
    columns = {"LQ input": eval_set["lq"][:n], "bicubic": eval_set["cond"][:n]}
    for key, spec in methods.items():
        if key != "bicubic":
            renoise = spec.sampler.split("-")[0]
            label = f"K={spec.steps}" + ("" if spec.steps == 1 else f" {renoise}")
            columns[label] = results.predictions[key][:n]
    columns["ground truth"] = eval_set["image"][:n]
    if is_main_process():
        write_results(list(results), out, "Super-resolution x4 on held-out crops",
                      notes=f"degradation preset: {config.degradation.preset}; "
                            f"{eval_set['image'].shape[0]} crops of "
                            f"{config.data.crop_size} px; timing device: {jax.devices()[0]}")
        image_grid(columns, os.path.join(out, "grid.png"))
    if ecfg.photos.splits and sampler is None:
        photos = evaluate_photos(config, student_photo_methods(config, apply_fn, params, schedule))
        if is_main_process():
            for split, result in photos.items():
                write_photo_files(out, split, result, "Super-resolution x4 on bundled photos")
    return list(results)
