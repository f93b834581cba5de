"""Configurations of the jobs, built from each module's default section.

`configs/*.py` are thin wrappers around these functions (`--config=configs/sr.py:tiny`), so the same
configurations are available programmatically: `cdd_jax.train_and_evaluate(sr_config("tiny"), dir)`.

Variants: "default" (this 2-core CPU, bundled photos), "tiny" (tests: seconds), "large"
(accelerators: a TFDS dataset, 256 px).
"""

from __future__ import annotations

import difflib
import os

import ml_collections

from cdd_jax.data.config import data_config
from cdd_jax.data.degradations import degradation_config
from cdd_jax.distill.config import _ema_config, distill_config
from cdd_jax.models.conditional import adapter_config
from cdd_jax.models.unet import model_config
from cdd_jax.parallel.config import mesh_config
from cdd_jax.train.state import optim_config

VARIANTS = ("default", "tiny", "large")
SHIPPED_TEACHER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "teacher")


def diffusion_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.schedule = "cosine"  # "cosine" | "linear" | "scaled_linear" (see cdd_jax.diffusion).
    c.weighting = "none"  # v-loss weighting: "none" | "min_snr" | "truncated_snr" | "snr_plus_one".
    c.snr_gamma = 5.0  # gamma of the min-SNR weighting.
    return c


def train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_steps = 6000  # Optimiser steps.
    c.log_every = 50  # Steps between scalar logs.
    c.eval_every = 1000  # Steps between held-out evaluations (0: only at start and end).
    c.sample_every = 2000  # Steps between sample grids (0: only at the end).
    c.ckpt_every = 500  # Steps between checkpoints (a final one is always written).
    c.keep_checkpoints = 3  # Checkpoints kept (older ones deleted after a newer one completes).
    c.async_checkpoints = True  # Orbax async saves (the step loop does not wait for the write).
    c.nonfinite = "skip"  # Non-finite loss/gradients: "skip" the update and count it, or "halt".
    c.num_sample_images = 16  # Images in the periodic sample grid.
    c.sample_steps = 50  # DDIM steps for the pretraining sample grid.
    c.profile = False  # Capture a profiler trace of a few steps (clu periodic_actions.Profile).
    return c


def _common(variant: str) -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"  # "pretrain" | "sr" (teacher -> distillation -> evaluation).
    c.seed = 0  # Seed of parameter init and of the per-step randomness (noise, t).
    c.model = model_config()
    c.diffusion = diffusion_config()
    c.data = data_config()
    c.optim = optim_config()
    c.ema = _ema_config(decay=0.999, warmup="power")  # Evaluation EMA of pretraining.
    c.train = train_config()
    c.mesh = mesh_config()
    c.data.crop_size = 32
    c.data.batch_size = 32
    if variant == "default":
        # One XLA:CPU device per core, the batch split over them (docs/PERFORMANCE.md).
        c.mesh.num_cpu_devices = -1
    if variant == "tiny":
        c.model.ch = 8
        c.model.ch_mult = (1, 2)
        c.model.attn_resolutions = (8,)
        c.model.num_groups = 4
        c.data.crop_size = 16
        c.data.batch_size = 8
        c.data.num_eval_crops = 8
        c.data.min_records_per_epoch = 64
        c.optim.warmup_steps = 2
        c.train.num_steps = 6
        c.train.log_every = 2
        c.train.eval_every = 3
        c.train.sample_every = 0
        c.train.ckpt_every = 3
        c.train.num_sample_images = 4
        c.train.sample_steps = 4
        c.train.async_checkpoints = False
    elif variant == "large":
        c.model.ch = 128
        c.model.ch_mult = (1, 1, 2, 2, 4, 4)
        c.model.num_res_blocks = 2
        c.model.attn_resolutions = (16,)
        c.model.num_groups = 32
        c.model.head_dim = 64
        c.model.dtype = "bfloat16"
        c.model.remat = True
        c.data.source = "tfds"
        c.data.tfds_name = "div2k"
        c.data.crop_size = 256
        c.data.batch_size = 256
        c.data.num_workers = 16
        c.optim.lr = 1e-4
        c.optim.warmup_steps = 5000
        c.mesh.sizes = (-1, 8, 1)
        c.train.num_steps = 500_000
        c.train.log_every = 100
        c.train.eval_every = 10_000
        c.train.sample_every = 10_000
        c.train.ckpt_every = 2000
    return c


def pretrain_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Stage 1: unconditional v-prediction pretraining of the teacher U-Net."""
    c = _common(variant)
    c.stage = "pretrain"
    if variant == "default":
        c.train.num_steps = 2000  # ~20 min on 2 CPU cores.
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 100
        c.train.eval_every = 250
        c.train.sample_every = 1000
    return c


def sr_config(variant: str = "default") -> ml_collections.ConfigDict:
    """The main job: teacher (stage 1) -> CoDi distillation (stage 2) -> evaluation (stage 3)."""
    c = _common(variant)
    c.stage = "sr"
    c.adapter = adapter_config()
    # The low-frequency anchor (a deviation from the paper; BUILD_NOTES.md section 4): at CPU
    # scale (8 px inputs, ~1500 steps) the zero-initialised control path alone does not learn to
    # carry the input's colours through. p = 4: the condition's low frequencies weigh as an
    # observation with noise std 0.5 before the 4x4 averaging. Off in the "large" variant.
    c.adapter.anchor_precision = 4.0
    c.degradation = degradation_config("realesrgan")
    # Degrade the training crop itself: the reference's 400 px pre-crop costs ~17x more per pair
    # at 32-64 px crops and changes nothing a 32 px crop can see.
    c.degradation.degrade_size = 0
    # Training-only augmentation (not part of Real-ESRGAN): permute the colour channels of half
    # the training crops, so that seven photos' colours are not learned as a prior. +0.6 dB at
    # 4 steps on held-out crops (BUILD_NOTES.md section 4). Off in "large" (real datasets).
    c.degradation.channel_shuffle_prob = 0.5
    c.distill = distill_config()
    # lambda = 100 (the paper: 1). With lambda = 1 the self-consistency term, which outweighs the
    # signal term below t ~ 0.5, left ~9% of the noise in x_hat at t = 0.25 (the teacher: 2%)
    # and 4-step samples full of invented texture; 10 fixed most of it, 100 was better again on
    # every held-out row (BUILD_NOTES.md section 4). Off in "large".
    c.distill.lambda_x = 100.0
    c.teacher = ml_collections.ConfigDict()
    # Teacher checkpoint: an exported params dir, a pretraining workdir or its checkpoints/ dir.
    # Empty: pretrain one with `teacher.pretrain` in <workdir>/teacher (reused if already there).
    c.teacher.checkpoint = SHIPPED_TEACHER if variant == "default" else ""
    c.teacher.pretrain = pretrain_config(variant)
    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.student_steps = (1, 2, 4)  # K of the few-step student sampler.
    c.evaluate.grid = "uniform"  # Student time grid: "uniform" or "released" (authors' code).
    # How the student's K-step sampler re-noises between steps, one table row each (K = 1 is the
    # same for all, so it is evaluated once): "ddim" (the paper: the noise the network implies)
    # and "fresh" (new Gaussian noise, as consistency models do); distill/sampling.py.
    c.evaluate.renoise = ("ddim", "fresh")
    c.evaluate.metrics = ("psnr", "ssim", "lpips_alex")  # Also available: "lpips_vgg".
    c.evaluate.batch_size = 16  # Images per evaluation batch.
    c.evaluate.num_grid_images = 8  # Rows of the PNG comparison grid.
    c.optim.lr = 5e-4  # Backbone (initialised from the teacher).
    c.optim.new_lr = 2e-3  # Adapter copy, embedder and gates: new, so a higher rate.
    c.optim.warmup_steps = 100
    c.train.num_steps = 1500
    c.train.eval_every = 500
    c.train.sample_every = 0
    if variant == "tiny":
        c.degradation = degradation_config("bicubic")
        c.adapter.cond_embed_ch = (8,)
        c.train.num_steps = 6
        c.optim.warmup_steps = 2
        c.evaluate.batch_size = 8
        c.evaluate.num_grid_images = 4
        c.evaluate.metrics = ("psnr", "ssim")  # LPIPS-Alex needs >= 31 px crops.
        c.distill.num_grid_steps = 4
    elif variant == "large":
        c.degradation = degradation_config("realesrgan")
        c.adapter.cond_embed_ch = (32, 64, 128)
        c.adapter.anchor_precision = 0.0  # The paper's network and loss weight.
        c.distill.lambda_x = 1.0
        c.distill.num_grid_steps = 50
        c.evaluate.metrics = ("psnr", "ssim", "lpips_alex", "lpips_vgg")
        c.train.num_steps = 100_000
    return c


def table1_config(variant: str = "default") -> ml_collections.ConfigDict:
    """The paper's Table 1 at small scale: every baseline and CoDi, one teacher, one budget.

    The default fits in about 2 hours on 2 CPU cores (see `cdd_jax.train.table1`); "tiny" runs
    the whole table in a test.
    """
    from cdd_jax.train.table1 import table1_section

    c = sr_config(variant)
    c.stage = "table1"
    # Table 1 tests the paper's claims, so every row uses the paper's network (no anchor) and
    # the paper's lambda = 1.
    c.adapter.anchor_precision = 0.0
    c.distill.lambda_x = 1.0
    c.degradation.channel_shuffle_prob = 0.0  # The published table was made without it.
    c.mesh.num_cpu_devices = 0  # ... and on one CPU device (bit-for-bit reruns).
    c.table1 = table1_section()
    if variant == "default":
        # Per trained row (GD: split over its rounds). Estimated ~55 min of training for the
        # whole table on 2 quiet CPU cores (docs/RESULTS.md): step cost relative to pretraining
        # (~0.57 s) from the compiled FLOPs: finetune 1.34x, PE-CoDi 1.46x, CoDi 1.78x, CM 2.23x,
        # GD 2.23x; plus compilation and the 200-step DDIM evaluation.
        c.train.num_steps = 500
        c.train.eval_every = 250
        c.train.ckpt_every = 100
    elif variant == "tiny":
        c.train.num_steps = 4
        c.train.eval_every = 0
        c.train.ckpt_every = 2
        c.table1.finetune_ddim_steps = (8, 4)
        c.table1.codi_steps = (1, 4)
        c.table1.plot_metrics = ("psnr", "ssim")
    return c


# ----------------------------------------------------------------------------------------------
# Validation: unknown keys are errors (with close matches), checked before any compilation.
# ----------------------------------------------------------------------------------------------


def reference_config(stage: str) -> ml_collections.ConfigDict:
    if stage == "pretrain":
        return pretrain_config("default")
    if stage == "sr":
        return sr_config("default")
    if stage == "table1":
        return table1_config("default")
    raise ValueError(f"config.stage must be 'pretrain', 'sr' or 'table1', got {stage!r}")


def check_unknown_keys(cfg, ref, prefix: str = "") -> None:
    """ValueError naming the first key of `cfg` that `ref` does not have, with close matches."""
    for key in cfg.keys():
        if key not in ref:
            close = difflib.get_close_matches(key, list(ref.keys()), n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ValueError(f"unknown config key {prefix + key!r}{hint}")
        if isinstance(cfg[key], ml_collections.ConfigDict) and isinstance(
            ref[key], ml_collections.ConfigDict
        ):
            check_unknown_keys(cfg[key], ref[key], prefix + key + ".")
