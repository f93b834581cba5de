"""Stage 1: unconditional v-prediction pretraining of the teacher U-Net, exported to
<workdir>/export: a diffusers pipeline folder for the "unet2d" family
(`cdd_jax.convert.pipeline`), an Orbax params folder + metadata.json for "cdd"."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cdd_jax.console import note
from cdd_jax.convert.pipeline import save_pipeline, scheduler_config
from cdd_jax.data.pipeline import build_train_dataset, make_eval_set
from cdd_jax.diffusion import Schedule, get_schedule, prediction_target, sample
from cdd_jax.distill.diffusion_loss import diffusion_loss
from cdd_jax.evaluate.figures import tile_images
from cdd_jax.models.apply import ApplyFn, unet_apply_fn
from cdd_jax.models.backbone import backbone_from_config, timestep_scale
from cdd_jax.models.unet import init_params
from cdd_jax.parallel.distributed import barrier, to_host
from cdd_jax.train.checkpoint import export_params
from cdd_jax.train.job import Job
from cdd_jax.train.loop import train

PyTree = Any


def heldout_denoising_loss(apply_fn: ApplyFn, schedule: Schedule, images: np.ndarray,
                           seed: int = 0, prediction_type: str = "v_prediction"):
    """A jitted fn(params) -> MSE of the network's output (v for a v-prediction network) on fixed
    held-out crops, fixed noise, t on a fixed grid."""
    images = jnp.asarray(images)
    n = images.shape[0]
    t = jnp.linspace(0.05, 0.95, n)
    eps = jax.random.normal(jax.random.key(seed), images.shape)

    @jax.jit
    def loss(params):
        alpha, sigma = schedule.alpha_sigma(t)
        a, s = alpha[:, None, None, None], sigma[:, None, None, None]
        out = apply_fn(params, a * images + s * eps, t, None, None)
        return jnp.mean((out - prediction_target(prediction_type, images, eps, a, s)) ** 2)

    return loss


def pretrain_job(config: ml_collections.ConfigDict) -> tuple[Job, Any]:
    """The unconditional pretraining Job and a jitted held-out loss fn(params) -> v-MSE."""
    size = config.data.crop_size
    model = backbone_from_config(config.model, size)
    apply_fn = unet_apply_fn(model, timestep_scale(config.model))
    schedule = get_schedule(config.diffusion.schedule)
    kind = config.diffusion.prediction_type
    heldout = heldout_denoising_loss(apply_fn, schedule,
                                     make_eval_set(config.data, task="pretrain")["image"],
                                     prediction_type=kind)

    def loss_fn(params, target_params, finetuned_params, batch, rng):
        return diffusion_loss(apply_fn, params, batch, rng, schedule=schedule,
                              weighting=config.diffusion.weighting,
                              snr_gamma=config.diffusion.snr_gamma, prediction_type=kind)

    n_img = config.train.num_sample_images
    z_T = jax.random.normal(jax.random.key(config.seed + 1), (n_img, size, size, 3))

    @jax.jit
    def draw(params):
        def model_fn(z, t):
            return apply_fn(params, z, jnp.broadcast_to(t, (z.shape[0],)), None, None)

        return sample(model_fn, z_T, schedule=schedule, num_steps=config.train.sample_steps,
                      prediction_type=kind)

    job = Job(
        name="pretrain",
        init_params=lambda rng: init_params(model, rng, size),
        loss_fn=loss_fn,
        ema=config.ema,
        eval_fn=lambda s: {"heldout_vloss_ema": float(heldout(s.ema_params)),
                           "heldout_vloss": float(heldout(s.params))},
        sample_fn=lambda s: tile_images(jax.device_get(draw(s.ema_params))),
        make_dataset=lambda pi, pc: build_train_dataset(config.data, task="pretrain",
                                                        process_index=pi, process_count=pc),
    )
    return job, heldout


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> tuple[PyTree, dict]:
    """Trains the unconditional teacher; returns (EMA params, metadata) and exports them."""
    job, heldout = pretrain_job(config)
    state = train(job, config, workdir)
    params = to_host(state.ema_params)  # collective when FSDP spans several processes
    meta = {
        "model": config.model.to_dict(),
        "diffusion": config.diffusion.to_dict(),
        "crop_size": config.data.crop_size,
        "steps": int(state.step),
        "heldout_vloss_ema": float(heldout(state.ema_params)),
    }
    out = os.path.join(workdir, "export")
    export_teacher(out, params, config, meta)
    note("exported teacher to %s", out)
    logging.info("teacher metadata: %s", json.dumps(meta, sort_keys=True))
    return params, meta


def export_teacher(out: str, params: PyTree, config: ml_collections.ConfigDict,
                   meta: dict) -> None:
    """Writes a teacher's params where `teacher.checkpoint` can read them: a diffusers pipeline
    folder ("unet2d": the UNet2DModel, its scheduler, `meta` as cdd_jax.json) or an Orbax
    params folder with metadata.json ("cdd"). Every process calls it."""
    if config.model.family == "cdd":
        export_params(out, params, meta)
        return
    if jax.process_index() == 0:
        module = backbone_from_config(config.model, config.data.crop_size)
        save_pipeline(out, module, jax.device_get(params),
                      scheduler=scheduler_config(config.diffusion.schedule,
                                                 config.model.num_train_timesteps,
                                                 config.diffusion.prediction_type),
                      metadata=meta)
    barrier("cdd_jax:export_teacher")
