"""The job presets, built from each section's defaults.

`configs/*.py` are thin wrappers around these functions (`--config=configs/sr.py:tiny`), so the
same configurations are available programmatically:
`cdd_jax.train_and_evaluate(sr_config("tiny"), workdir)`.

Variants: "default" (this 2-core CPU, bundled photos), "tiny" (tests: seconds), "large"
(accelerators: a TFDS dataset, 256 px). Every default value is set once, in its section's
function; a preset only overrides.
"""

from __future__ import annotations

import ml_collections

from cdd_jax.data.config import data_config
from cdd_jax.data.degradations import degradation_config
from cdd_jax.distill.config import diffusion_config, distill_config, ema_config
from cdd_jax.evaluate.sr import evaluate_config
from cdd_jax.evaluate.table1 import table1_section
from cdd_jax.models.backbone import model_config
from cdd_jax.models.control import control_config
from cdd_jax.parallel.config import mesh_config
from cdd_jax.stages.teacher import teacher_config
from cdd_jax.train.config import optim_config, train_config

VARIANTS = ("default", "tiny", "large")
STAGES = ("pretrain", "sr", "table1")


def _common(variant: str) -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"  # "pretrain" | "sr" (teacher -> distillation -> evaluation) | "table1".
    c.seed = 0  # Seed of parameter init and of the per-step randomness (noise, t).
    c.model = model_config()
    c.diffusion = diffusion_config()
    c.data = data_config()
    c.optim = optim_config()
    c.ema = ema_config(decay=0.999, warmup="power")  # Evaluation EMA of pretraining.
    c.train = train_config()
    c.mesh = mesh_config()
    c.data.crop_size = 32
    c.data.batch_size = 32
    if variant == "default":
        # One XLA:CPU device per core, the batch split over them (docs/PERFORMANCE.md).
        c.mesh.num_cpu_devices = -1
    elif variant == "tiny":
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
    else:  # large
        c.model.update(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                       attn_resolutions=(16,), num_groups=32, head_dim=64, dtype="bfloat16",
                       remat=True)
        c.data.update(source="tfds", tfds_name="div2k", crop_size=256, batch_size=256,
                      num_workers=16)
        c.optim.lr = 1e-4
        c.optim.warmup_steps = 5000
        c.mesh.sizes = (-1, 8, 1)
        c.train.update(num_steps=500_000, log_every=100, eval_every=10_000,
                       sample_every=10_000, ckpt_every=2000)
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


def _distillation(variant: str) -> ml_collections.ConfigDict:
    """Teacher -> distillation -> evaluation with the paper's network and loss (lambda = 1, no
    anchor); `sr_config` adds the CPU-scale deviations, `table1_config` the table's rows."""
    c = _common(variant)
    c.stage = "sr"
    c.control = control_config()
    c.degradation = degradation_config("bicubic" if variant == "tiny" else "realesrgan")
    if variant == "default":
        # Degrade the training crop itself: the reference's 400 px pre-crop costs ~17x more per
        # pair at 32-64 px crops and changes nothing a 32 px crop can see.
        c.degradation.degrade_size = 0
    c.distill = distill_config()
    c.teacher = teacher_config(pretrain_config(variant), shipped=variant == "default")
    c.evaluate = evaluate_config()
    c.optim.lr = 5e-4  # Backbone (initialised from the teacher).
    c.optim.new_lr = 2e-3  # Control encoder, embedder and gates: new, so a higher rate.
    c.optim.warmup_steps = 100
    c.train.num_steps = 1500
    c.train.eval_every = 500
    c.train.sample_every = 0
    if variant == "tiny":
        c.control.cond_embed_ch = (8,)
        c.train.num_steps = 6
        c.optim.warmup_steps = 2
        c.evaluate.batch_size = 8
        c.evaluate.num_grid_images = 4
        c.evaluate.metrics = ("psnr", "ssim")  # LPIPS-Alex needs >= 31 px crops.
        c.evaluate.photos.splits = ()  # Off: the tests switch it on where they check it.
        c.distill.num_grid_steps = 4
    elif variant == "large":
        c.control.cond_embed_ch = (32, 64, 128)
        c.distill.num_grid_steps = 50
        c.evaluate.metrics = ("psnr", "ssim", "lpips_alex", "lpips_vgg")
        c.evaluate.photos.size = 0  # Whole photos: 256 px tiles do not fit 128 px crops.
        c.train.num_steps = 100_000
    return c


def sr_config(variant: str = "default") -> ml_collections.ConfigDict:
    """The main job: teacher (stage 1) -> CoDi distillation (stage 2) -> evaluation (stage 3)."""
    c = _distillation(variant)
    if variant != "large":  # Deviations from the paper at CPU scale (BUILD_NOTES.md section 4).
        # The low-frequency anchor: at CPU scale (8 px inputs, ~1500 steps) the zero-initialised
        # control path alone does not learn to carry the input's colours through. p = 4: the
        # condition's low frequencies weigh as an observation with noise std 0.5 before the 4x4
        # averaging.
        c.control.anchor_precision = 4.0
        # lambda = 100 (the paper: 1). With lambda = 1 the self-consistency term, which outweighs
        # the signal term below t ~ 0.5, left ~9% of the noise in x_hat at t = 0.25 (the teacher:
        # 2%) and 4-step samples full of invented texture; 10 fixed most of it, 100 was better
        # again on every held-out row.
        c.distill.lambda_x = 100.0
    if variant == "default":
        # Training-only augmentation (not part of Real-ESRGAN): permute the colour channels of
        # half the training crops, so that seven photos' colours are not learned as a prior.
        # +0.6 dB at 4 steps on held-out crops.
        c.degradation.channel_shuffle_prob = 0.5
        # The exported student's sampler: "fresh" re-noising, chosen on the validation photos
        # (whole images through the tiled path; DDIM lost ~0.5 dB Y-PSNR to bicubic at K = 4).
        c.evaluate.default_renoise = "fresh"
    return c


SD_VARIANTS = ("tiny", "large")


def sd_config(variant: str = "large") -> ml_collections.ConfigDict:
    """Latent, text-conditioned CoDi of a Stable-Diffusion-class teacher (the paper's setting):
    the SR job on a `unet2d_condition` U-Net, its VAE's latent space (d_x there) and the empty
    prompt's stored embedding; the paper's network and loss (no anchor, lambda = 1).

    "large": the accelerator recipe for SD 1.5 at 512 px (64 px latents): bf16 compute, FSDP over
    8 devices per data replica, rematerialised blocks, ControlNet's condition embedder widths.
    SD 2.1 (768, v-prediction): teacher.checkpoint=stabilityai/stable-diffusion-2-1,
    diffusion.prediction_type=v_prediction, model.prompt_embed_dim=1024. The teacher folder needs
    the stored prompt embedding (`cdd_jax.convert.sd.compute_prompt_embeds`, once). Per-example
    prompts: a captioned image folder (data.source="folder", data.prompts="captions";
    `python -m cdd_jax.convert.captions`).
    "tiny": tests and this CPU, on a locally made SD-style folder (teacher.checkpoint required).
    """
    if variant not in SD_VARIANTS:
        raise ValueError(f"unknown sd variant {variant!r}; choose one of {SD_VARIANTS}")
    c = _distillation(variant)
    c.model.family = "unet2d_condition"
    c.diffusion.schedule = "scaled_linear"
    c.diffusion.prediction_type = "epsilon"  # SD 1.x / 2.1-base; SD 2.1 (768): v_prediction
    c.teacher.pretrain.diffusion.update(schedule="scaled_linear", prediction_type="epsilon")
    c.teacher.checkpoint = ""
    c.control.anchor_precision = 0.0  # pixel-space only
    c.evaluate.metrics = ("psnr", "ssim")
    c.evaluate.photos.splits = ()  # The photo evaluation's tiled path is pixel-space only.
    if variant == "tiny":
        c.control.cond_embed_ch = (8, 8)
        c.data.crop_size = 16
        c.distill.num_grid_steps = 4
        return c
    c.model.update(dtype="bfloat16", remat=True, latent_channels=4, prompt_embed_dim=768)
    c.teacher.checkpoint = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    c.control.cond_embed_ch = (16, 32, 96, 256)  # ControlNet's; 3 stride-2 convs: 512 -> 64 px
    c.data.update(crop_size=512, batch_size=64)
    c.mesh.sizes = (-1, 8, 1)  # (data, fsdp, tensor)
    c.evaluate.metrics = ("psnr", "ssim", "lpips_alex", "lpips_vgg")
    return c


def table1_config(variant: str = "default") -> ml_collections.ConfigDict:
    """The paper's Table 1 at small scale: every baseline and CoDi, one teacher, one budget per
    row and seed, `table1.seeds` seeds. Every row uses the paper's loss (lambda = 1) and the
    paper's network without the low-frequency anchor (`_distillation`); the input gate, a
    deviation (BUILD_NOTES.md section 2), stays on as in every preset.

    The default takes about 2.5 hours per seed on 2 CPU cores, half of it the Direct CM row, so
    ~7.5 hours for its three seeds (measured: BUILD_NOTES.md section 15; a run continues across
    restarts, and seeds can run side by side in separate workdirs); "tiny" runs the whole table,
    one seed, in a test.
    """
    c = _distillation(variant)
    c.stage = "table1"
    c.mesh.num_cpu_devices = 0  # One CPU device (bit-for-bit reruns).
    c.table1 = table1_section()
    if variant == "default":
        # Per trained row and seed (GD: split over its runs). Measured on 2 CPU cores (BUILD_NOTES
        # section 15, session 13-14): finetune 8 min + 16 min of evaluation (the 200-step DDIM),
        # cm 11 min, pe_codi 10 min, gd 15 min and codi 20 min with evaluation (beside another
        # job), and direct_cm 77 min (distill.direct_cm.num_teacher_steps = 32 forward passes of
        # the fine-tuned model per step, on ~1.2 cores).
        c.train.num_steps = 500
        c.train.eval_every = 250
        c.train.ckpt_every = 100
    elif variant == "tiny":
        c.table1.seeds = (0,)
        c.train.num_steps = 4
        c.train.eval_every = 0
        c.train.ckpt_every = 2
        c.table1.finetune_ddim_steps = (8, 4)
        c.table1.codi_steps = (1, 4)
        c.table1.plot_metrics = ("psnr", "ssim")
        c.table1.claims_split = "crops"  # The tiny preset evaluates no photos.
    return c


def preset(stage: str, variant: str = "default") -> ml_collections.ConfigDict:
    """The preset of `stage` ("pretrain", "sr", "table1") and `variant`."""
    builders = {"pretrain": pretrain_config, "sr": sr_config, "table1": table1_config}
    if stage not in builders:
        raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
    return builders[stage](variant)
