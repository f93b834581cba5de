"""Validation of a whole job config before anything loads or compiles: unknown keys against the
stage's preset (with close matches), then each section's own validator, then the checks that
span sections (mesh against devices and batch, crop size against the U-Net's depth, ...)."""

from __future__ import annotations

import logging

import jax
import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.config.presets import STAGES, preset
from cdd_jax.data.config import PAIRED_SOURCES, validate_data_config
from cdd_jax.data.degradations import validate_degradation_config
from cdd_jax.distill.config import (
    validate_diffusion_config,
    validate_distill_config,
    validate_ema_config,
)
from cdd_jax.evaluate.sr import validate_evaluate_config
from cdd_jax.evaluate.table1 import validate_table1_config
from cdd_jax.models.backbone import validate_model_config
from cdd_jax.models.control import validate_control_config
from cdd_jax.parallel.config import validate_mesh_config
from cdd_jax.parallel.mesh import check_mesh_config
from cdd_jax.stages.teacher import validate_teacher_config
from cdd_jax.train.config import validate_optim_config, validate_train_config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError/TypeError naming the first bad or unknown key of a job config."""
    checks.choice(config, "stage", STAGES)
    checks.check_keys(config, preset(config.stage), missing=False)
    checks.number(config, "seed", 0, 2**32, hi_open=True, integer=True)
    validate_model_config(config.model)
    validate_diffusion_config(config.diffusion)
    validate_data_config(config.data)
    validate_optim_config(config.optim)
    validate_ema_config(config.ema, "ema.")
    validate_train_config(config.train)
    validate_mesh_config(config.mesh)
    # The mesh and the batch against the devices present: builds no mesh, compiles nothing.
    check_mesh_config(config.mesh, config.data.batch_size, process_count=jax.process_count())
    _check_model_fits_crops(config)
    if config.data.prompts != "none" and (config.stage != "sr"
                                          or config.model.family != "unet2d_condition"):
        raise ValueError(f"data.prompts={config.data.prompts!r} feeds per-example prompts to a "
                         "text-conditioned teacher: it needs stage 'sr' and model.family "
                         f"'unet2d_condition', got stage {config.stage!r}, model.family "
                         f"{config.model.family!r}")
    if config.stage in ("sr", "table1"):
        _validate_distillation(config)


def _check_model_fits_crops(config: ml_collections.ConfigDict) -> None:
    depth = 2 ** (len(config.model.ch_mult) - 1)
    if config.data.crop_size % depth:
        raise ValueError(f"data.crop_size {config.data.crop_size} must be divisible by {depth} "
                         f"for model.ch_mult={tuple(config.model.ch_mult)}")
    sizes = [config.data.crop_size // 2**i for i in range(len(config.model.ch_mult))]
    unused = [r for r in config.model.attn_resolutions if r not in sizes]
    if unused:
        logging.warning("model.attn_resolutions %s never occur at data.crop_size %d (feature "
                        "map sizes %s): no attention there", unused, config.data.crop_size, sizes)


def _validate_distillation(config: ml_collections.ConfigDict) -> None:
    validate_control_config(config.control)
    validate_degradation_config(config.degradation, config.data.crop_size)
    validate_distill_config(config.distill)
    validate_evaluate_config(config.evaluate, scale=int(config.degradation.scale))
    validate_teacher_config(config.teacher)
    if config.stage == "table1":
        validate_table1_config(config)
    if config.data.source in PAIRED_SOURCES and config.data.scale != config.degradation.scale:
        raise ValueError(
            f"data.scale {config.data.scale} (the paired data's) must equal degradation.scale "
            f"{config.degradation.scale} (the scale the student, its anchor and its export "
            "are for)")
    ctl = config.control
    if ctl.anchor_precision > 0 and (config.data.crop_size % ctl.anchor_factor
                                     or ctl.anchor_factor != config.degradation.scale):
        raise ValueError(
            f"control.anchor_factor {ctl.anchor_factor} must equal degradation.scale "
            f"{config.degradation.scale} and divide data.crop_size {config.data.crop_size} "
            "when the low-frequency anchor is on")
    photos = config.evaluate.photos
    if photos.splits and photos.size and photos.size < (photos.tile or config.data.crop_size):
        raise ValueError(f"evaluate.photos.size={photos.size} is smaller than one tile "
                         f"({photos.tile or config.data.crop_size} px: evaluate.photos.tile, or "
                         "data.crop_size); use larger crops or size=0 (whole photos)")
    if photos.splits and config.model.family == "unet2d_condition":
        raise ValueError("evaluate.photos runs pixel-space students only (the tiled path of "
                         "cdd_jax.Upscaler); set evaluate.photos.splits=() for a latent student")
    if ctl.cond_space == "latent" and config.model.family != "unet2d_condition":
        raise ValueError("control.cond_space='latent' encodes the condition with a latent "
                         "teacher's VAE: it needs model.family='unet2d_condition', got "
                         f"{config.model.family!r}")
    if ctl.cond_space == "latent" and ctl.anchor_precision > 0:
        raise ValueError("the low-frequency anchor reads a pixel-space condition: set "
                         "control.anchor_precision=0 with control.cond_space='latent'")
    if config.stage == "table1" and config.model.family == "unet2d_condition":
        raise ValueError("stage 'table1' runs pixel-space teachers only; a latent "
                         "(unet2d_condition) teacher runs with stage 'sr'")
    latent = config.model.family == "unet2d_condition"
    if config.distill.d_x_space == "pixel" and not latent:
        raise ValueError("distill.d_x_space='pixel' decodes latents through the teacher's VAE; "
                         f"model.family {config.model.family!r} already works in pixels (leave "
                         "it 'latent')")
    if config.distill.guidance_scale != 1.0 and not latent:
        raise ValueError("distill.guidance_scale guides a text-conditioned "
                         "(model.family='unet2d_condition') teacher; this one reads no text")
    kind = config.diffusion.prediction_type
    if ctl.anchor_precision > 0 and kind != "v_prediction":
        raise ValueError(f"control.anchor_precision > 0 (the low-frequency anchor) acts on a "
                         f"v-prediction; diffusion.prediction_type is {kind!r}: set "
                         "control.anchor_precision=0")
    if config.teacher.pretrain.diffusion.prediction_type != kind:
        raise ValueError(f"teacher.pretrain.diffusion.prediction_type "
                         f"{config.teacher.pretrain.diffusion.prediction_type!r} differs from "
                         f"diffusion.prediction_type {kind!r} (the student keeps the teacher's)")
    validate_config(config.teacher.pretrain)
    if not config.teacher.checkpoint and (config.teacher.pretrain.data.crop_size
                                          != config.data.crop_size):
        logging.warning("teacher pretrains at %d px, distillation runs at %d px",
                        config.teacher.pretrain.data.crop_size, config.data.crop_size)
