"""What the benchmarks time: the benchmark's configs, the train-step contenders built with the
package (`cdd_jax.stages` jobs, `cdd_jax.train.builder.build_train_step`, exactly as
`cdd_jax.train.loop.train` builds its step), and the measured matmul roofline.

Step kinds: "pretrain" and "codi" on the pixel-space U-Net (`VARIANTS`), and "sd": the CoDi step
of the latent, text-conditioned job of `configs/sr.py:sd` (`SD_VARIANTS`) on a locally written
SD-style teacher folder (`sd_teacher`) whose U-Net has SD 1.5's block structure.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Bench, time_calls

VARIANTS = ("default", "large", "tiny", "sr_large")  # of the pixel kinds
KINDS = ("pretrain", "codi", "sd")
SD_VARIANTS = ("sd_small", "sd15")  # of kind "sd"
GPU_ONLY_VARIANTS = ("sd15",)
_BIG_MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_groups", "head_dim")

# ----------------------------------------------------------------------------------------------
# Configs and data.
# ----------------------------------------------------------------------------------------------


def make_config(kind: str, variant: str = "default", batch_size: int | None = None,
                crop_size: int | None = None, **model_overrides):
    """The preset config of a step `kind` ("pretrain" or "codi") for a model `variant`:
    "default" (the preset: ch 32, ch_mult (1, 2, 2), 1 res block, attention at 8 px, 32 px crops,
    batch 32), "large" (ch 64, 2 res blocks, attention at 16 px, 32 groups, batch 16; ~6.5M
    params), "sr_large" (the U-Net of the accelerator preset `configs/sr.py:large`: ch 128,
    ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 16 px, at 256 px crops, batch 16, on the
    bundled photos; 159 M parameters with the control encoder; float32 unless `dtype` is
    overridden, no remat) or "tiny" (the presets' test config, for checking the scripts in
    seconds).

    The U-Net is the "cdd" family: the PyTorch peer (`benchmarks/peer_torch.py`) mirrors it
    layer for layer, so the comparison is at equal architecture (`model.family` overrides).
    Kind "sd": `sd_bench_config`."""
    from cdd_jax.config.presets import pretrain_config, sr_config

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "sd":
        return sd_bench_config(variant, batch_size, crop_size, **model_overrides)
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; valid: {VARIANTS}")
    preset_of = pretrain_config if kind == "pretrain" else sr_config
    config = preset_of("tiny" if variant == "tiny" else "default")
    config.model.family = "cdd"
    if variant == "large":
        config.model.ch = 64
        config.model.ch_mult = (1, 2, 2)
        config.model.num_res_blocks = 2
        config.model.attn_resolutions = (16,)
        config.model.num_groups = 32
        config.data.batch_size = 16
    if variant == "sr_large":  # the U-Net of configs/sr.py:large (accelerators) at 256 px
        big = preset_of("large")
        for k in _BIG_MODEL_KEYS:
            config.model[k] = big.model[k]
        config.data.crop_size = 256
        config.data.batch_size = 16
    if batch_size:
        config.data.batch_size = int(batch_size)
    if crop_size:
        config.data.crop_size = int(crop_size)
    for k, v in model_overrides.items():
        config.model[k] = v
    return config


# ----------------------------------------------------------------------------------------------
# Kind "sd": the latent, text-conditioned CoDi job on an SD-style teacher folder.
# ----------------------------------------------------------------------------------------------

SD_TOKENS = 77  # CLIP's prompt length: the stored prompt embedding is [1, 77, D], as in SD.
# The U-Nets of the "sd" variants (diffusers UNet2DConditionModel configs). "sd15": Stable Diffusion
# 1.5's (320-640-1280-1280, 2 layers per block, 8 heads, 768-wide text; 860 M parameters).
# "sd_small": the same block structure (cross-attention down blocks then a plain one, the mirror
# image going up, the cross-attention mid block, GEGLU transformer blocks, conv projections) at
# CPU widths, 2 levels and 1 layer per block (1.56 M parameters with the adapter, 333 leaves).
# Even so, XLA:CPU's compile of its CoDi train step passed 5 GB of memory on this 2-core machine,
# a 3-level one's too (docs/PERFORMANCE.md): the per-leaf parameter updates, not the network.
SD_UNETS = {
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "sd_small": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64,
                     attention_head_dim=4, norm_num_groups=8,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
}
# A narrow stand-in for SD's VAE with its 8x downsampling (4 levels) and 4 latent channels: it
# only encodes the batch once, before the timed steps, on both sides.
SD_VAE = dict(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4,
              latent_channels=4)
# (image px, batch) of each variant: latents 4x32x32 (CPU) and SD 1.5's 4x64x64 at 512 px.
SD_SHAPES = {"sd_small": (256, 4), "sd15": (512, 4)}


def sd_unet_config(variant: str) -> dict:
    """The diffusers `UNet2DConditionModel` config of an "sd" variant (the port's defaults, which
    are diffusers', for what `SD_UNETS` does not set)."""
    if variant not in SD_VARIANTS:
        raise ValueError(f"unknown sd variant {variant!r}; valid: {SD_VARIANTS}")
    size = SD_SHAPES[variant][0] // 2 ** (len(SD_VAE["block_out_channels"]) - 1)
    return {"_class_name": "UNet2DConditionModel", "sample_size": size, "in_channels": 4,
            "out_channels": 4, **SD_UNETS[variant]}


def sd_teacher(variant: str, root: str | None = None) -> str:
    """An SD-style teacher folder for `variant` (U-Net `sd_unet_config`, VAE `SD_VAE`, an
    epsilon scaled_linear scheduler and a [1, 77, D] prompt embedding, weights drawn with numpy),
    written under `root` (default: the temp dir) unless it is there already; returns its path.
    The folder name holds a hash of its configs, so a changed config writes a new one."""
    import hashlib
    import json
    import tempfile

    import numpy as np

    from cdd_jax.convert.diffusers import random_params
    from cdd_jax.convert.pipeline import scheduler_config
    from cdd_jax.convert.sd import is_sd_folder, save_sd_pipeline
    from cdd_jax.models.diffusers.autoencoder_kl import AutoencoderKL
    from cdd_jax.models.diffusers.unet_2d_condition import UNet2DConditionModel

    unet_cfg = sd_unet_config(variant)
    vae_cfg = {"_class_name": "AutoencoderKL", **SD_VAE}
    key = hashlib.sha1(json.dumps([unet_cfg, vae_cfg, SD_TOKENS], sort_keys=True).encode())
    folder = os.path.join(root or tempfile.gettempdir(), "cdd_jax_benchmarks",
                          f"{variant}_{key.hexdigest()[:10]}")
    if is_sd_folder(folder):
        return folder
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    width = unet_cfg["cross_attention_dim"]
    embeds = np.random.default_rng(2).normal(size=(1, SD_TOKENS, width)).astype(np.float32)
    # Weights at the scale of a trained SD U-Net's (std ~0.02-0.05), so activations stay finite.
    save_sd_pipeline(folder, unet, random_params(unet, 0, 0.02), vae,
                     random_params(vae, 1, 0.05), prompt_embeds=embeds,
                     scheduler=scheduler_config("scaled_linear", 1000, "epsilon"))
    return folder


def gpu_only_reason(variant: str, accelerator: str | None) -> str | None:
    """Why `variant` is not run on this machine (None: it is)."""
    if variant in GPU_ONLY_VARIANTS and not accelerator:
        return (f"the {variant!r} variant (Stable Diffusion 1.5 size) runs only where a GPU is "
                "present (nvidia-smi found none); on a GPU machine: bash benchmarks/run_gpu.sh")
    return None


def sd_bench_config(variant: str = "sd_small", batch_size: int | None = None,
                    crop_size: int | None = None, teacher_root: str | None = None,
                    **model_overrides):
    """The SD recipe (`configs/sr.py:sd`: epsilon, scaled_linear, ControlNet's condition embedder,
    lambda 1, no anchor) on the `sd_teacher` of `variant`, shaped for one device: float32 unless
    `dtype` is overridden, no remat (the peer does not checkpoint either), one data-parallel
    device (the recipe's FSDP over 8 needs 8; on a CPU the recipe's one XLA device: splitting it
    per core makes the compile larger still), the bundled photos as data; `SD_SHAPES` for crop
    and batch. The config is
    resolved against the folder (`resolve_teacher`: latent factor 8, 77 prompt tokens, ...)."""
    from cdd_jax.config.presets import sd_config
    from cdd_jax.stages.teacher import resolve_teacher

    if variant not in SD_VARIANTS:
        raise ValueError(f"unknown sd variant {variant!r}; valid: {SD_VARIANTS}")
    size, batch = SD_SHAPES[variant]
    config = sd_config("large")
    config.teacher.checkpoint = sd_teacher(variant, teacher_root)
    config.data.update(source="bundled", tfds_name="", num_workers=0,
                       crop_size=int(crop_size or size), batch_size=int(batch_size or batch))
    config.degradation.degrade_size = 0  # degrade the crop itself (the batch is made once)
    config.model.update(dtype="float32", remat=False,
                        prompt_embed_dim=SD_UNETS[variant]["cross_attention_dim"])
    config.mesh.sizes = (-1, 1, 1)
    for k, v in model_overrides.items():
        config.model[k] = v
    resolve_teacher(config)
    return config


def real_batch(config, kind: str) -> dict:
    """Batch 0 of the real training pipeline (bundled photos; SR pairs for "codi" and "sd")."""
    from cdd_jax.data.pipeline import build_train_dataset

    if kind == "pretrain":
        ds = build_train_dataset(config.data, task="pretrain")
    else:
        from cdd_jax.data.degradations import SRPairTransform

        ds = build_train_dataset(
            config.data,
            task="sr",
            sr_transform=SRPairTransform(config.degradation, config.data.crop_size),
        )
    return ds[0]


# ----------------------------------------------------------------------------------------------
# Jobs and the train step, built by the package.
# ----------------------------------------------------------------------------------------------


def codi_job(config, batch: dict):
    """The stage-2 Job of `cdd_jax.stages.distill` (objective `config.distill.objective`; CoDi:
    online + target forward, one backward; eval EMA and target EMA) starting from the random init
    of the whole conditional network, as a benchmark of the step's cost needs no teacher.

    `distill_job` wants a teacher (its structure is checked; the random U-Net init stands in)
    and an eval set for its held-out probe (one example of `batch`: the benchmark never
    evaluates). Its `initial_params` (the teacher copied into the backbone and encoder, zero
    gates) are dropped, so the step starts from the random init as the benchmark always has."""
    import jax

    from cdd_jax.models.backbone import backbone_from_config
    from cdd_jax.models.unet import init_params
    from cdd_jax.parallel.sharding import unbox
    from cdd_jax.stages.distill import distill_job

    size = config.data.crop_size
    teacher = unbox(init_params(backbone_from_config(config.model, size),
                                jax.random.key(config.seed), size))
    probe = {k: v[:1] for k, v in batch.items()}
    job, _, _ = distill_job(config, teacher, probe)
    return dataclasses.replace(job, initial_params=None)


def sd_job(config, batch: dict):
    """The stage-2 Job of the latent job (`cdd_jax.stages.distill`) as training builds it: the
    teacher loaded from the folder, copied into the backbone and the control encoder (zero
    gates), the prompt embedding stored with it, the VAE encoding the batch (`prepare_batch`)."""
    from cdd_jax.stages.distill import distill_job
    from cdd_jax.stages.teacher import load_teacher

    teacher = load_teacher(config, workdir="")
    return distill_job(config, teacher, {k: v[:1] for k, v in batch.items()})[0]


def contender_job(kind: str, config, batch: dict):
    """The Job of a step `kind`: the package's pretraining job, `codi_job` or `sd_job`."""
    from cdd_jax.stages.pretrain import pretrain_job

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "pretrain":
        return pretrain_job(config)[0]
    return codi_job(config, batch) if kind == "codi" else sd_job(config, batch)


@dataclasses.dataclass
class Contender:
    """A compiled `TrainStep` (cdd_jax.train.builder) on its global batch; the state is donated
    and replaced per step. `first_metrics`: the metrics of the first step (run at build)."""

    step: Any
    batch: Any
    warnings: list[str]
    num_params: int
    first_metrics: dict
    num_frozen_params: int = 0

    def step_once(self) -> dict:
        return self.step(self.batch)[1]

    def timed_steps(self, n: int) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of `n` steps, each blocked until its outputs are ready."""
        import jax

        return time_calls(lambda: jax.block_until_ready(self.step(self.batch)), n)

    def info(self) -> dict[str, Any]:
        """Trace and compile seconds, FLOPs per step (all devices; nan if XLA reports none)."""
        info = self.step.info()
        return {"trace_s": self.step.trace_s, "compile_s": self.step.compile_s,
                "flops_per_step": info.get("flops_per_step", float("nan")),
                **{k: v for k, v in info.items() if k.endswith("_bytes")}}


def build_contender(kind: str, config, *, donate: bool = True) -> Contender:
    """The step of `kind` on batch 0 of the real pipeline, built by `build_train_step`, compiled
    ahead of time and run once; records the warnings of compiling and the first call. A latent
    job's batch is encoded once here, as the loop does before each step (`prepared_batch`): the
    timed step starts from latents."""
    import jax

    from cdd_jax.train.builder import build_train_step
    from cdd_jax.train.loop import prepared_batch
    from cdd_jax.train.state import count_params

    batch_np = real_batch(config, kind)
    job = contender_job(kind, config, batch_np)
    step = build_train_step(job, config, donate=donate)
    batch = prepared_batch(job, step.global_batch(batch_np))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step.compile(batch)
        first = jax.block_until_ready(step(batch)[1])  # the first call (and any donation warning)
    frozen = [p for p, label in zip(jax.tree.leaves(step.state.params),
                                    jax.tree.leaves(step.labels), strict=True) if label == "frozen"]
    return Contender(step, batch, [str(w.message) for w in caught],
                     count_params(step.state.params), first, count_params(frozen))


@dataclasses.dataclass
class GradContender:
    """The gradient of a job's loss alone, jitted on one device: the online and target passes and
    one backward of the same network and batch as the train step, without the parameter updates
    (optimiser, clipping, EMA, non-finite guard). A measurement of the network work where the
    whole step cannot be compiled (`TrainStepBench(update=False)`)."""

    fn: Any
    params: Any
    batch: Any
    num_params: int
    num_frozen_params: int
    trace_s: float
    compile_s: float
    flops: float
    warnings: tuple = ()

    def timed_steps(self, n: int) -> tuple[list[float], list[float]]:
        import jax

        key = jax.random.key(0)
        return time_calls(lambda: jax.block_until_ready(
            self.fn(self.params, self.params, self.batch, key)), n)

    def info(self) -> dict[str, Any]:
        return {"trace_s": self.trace_s, "compile_s": self.compile_s,
                "flops_per_step": self.flops}


def build_grad_contender(kind: str, config) -> GradContender:
    """`GradContender` of the job of `kind` from its initial parameters (the teacher's; the
    target network holds the same values, as at the first step)."""
    import time

    import jax

    from cdd_jax.train.builder import compiled_flops
    from cdd_jax.train.loop import prepared_batch
    from cdd_jax.train.state import count_params, merge, param_labels, split_trainable

    batch_np = real_batch(config, kind)
    job = contender_job(kind, config, batch_np)
    params = jax.device_put(job.initial_params)
    batch = prepared_batch(job, {k: jax.device_put(v) for k, v in batch_np.items()})
    labels = param_labels(params, freeze_backbone=job.freeze_backbone)

    def grads(p, target, b, rng):  # as the train step differentiates: trainable leaves only
        trainable, frozen = split_trainable(p, labels)
        return jax.grad(lambda tr: job.loss_fn(merge(tr, frozen), target, None, b, rng)[0])(
            trainable)

    fn = jax.jit(grads)
    t0 = time.perf_counter()
    lowered = fn.lower(params, params, batch, jax.random.key(0))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    frozen = count_params(params.get("text", {}))
    flops = compiled_flops(compiled)
    return GradContender(compiled, params, batch, count_params(params), frozen, t1 - t0, t2 - t1,
                         float("nan") if flops is None else flops)


class TrainStepBench(Bench):
    """A worker's cdd_jax train step: kind "pretrain" | "codi" (variant from `VARIANTS`) or
    "sd" (from `SD_VARIANTS`)."""

    def __init__(
        self,
        kind: str,
        variant: str = "default",
        warmup: int = 3,
        donate: bool = True,
        batch_size: int | None = None,
        crop_size: int | None = None,
        update: bool = True,
        **model_overrides,
    ):
        """`update=False`: the loss's gradient alone (`GradContender`), not the train step."""
        config = make_config(kind, variant, batch_size, crop_size, **model_overrides)
        # As training does: split the CPU into devices (the preset's mesh.num_cpu_devices) before
        # JAX starts; an explicit JAX_NUM_CPU_DEVICES in the worker's environment wins.
        from cdd_jax.parallel.mesh import configure_cpu_devices

        configure_cpu_devices(config.mesh.num_cpu_devices, config.data.batch_size)
        import jax

        self.update = update
        self.contender = (build_contender(kind, config, donate=donate) if update
                          else build_grad_contender(kind, config))
        warm = self.contender.timed_steps(warmup)[0]
        c = self.contender
        self.info = {
            "kind": kind,
            "variant": variant,
            "model": config.model.to_dict(),
            "batch_size": config.data.batch_size,
            "crop_size": config.data.crop_size,
            "num_params": c.num_params,
            "num_frozen_params": c.num_frozen_params,
            "sample_shape": list(c.batch["image"].shape),  # NHWC; latents for "sd"
            **c.info(),
            "warnings": c.warnings,
            "warmup_s": warm,
            "donate": donate,
            "update": update,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "devices": str(jax.devices()),
            "dtype": str(config.model.dtype),
        }

    def run(self, n: int) -> dict[str, list[float]]:
        wall, cpu = self.contender.timed_steps(n)
        return {"step": wall, "step_cpu": cpu}


# ----------------------------------------------------------------------------------------------
# The matmul roofline, measured.
# ----------------------------------------------------------------------------------------------


class MatmulRoofline(Bench):
    """Square matmuls in JAX at XLA's default precision (f32 by default; on a GPU XLA's default
    lets f32 dots use TF32): what this machine's cores (or accelerator) deliver."""

    def __init__(self, sizes: Sequence[int] = (2048, 4096), dtype: str = "float32"):
        import jax
        import jax.numpy as jnp

        self.fns = {}
        for n in sizes:
            a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
            b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
            f = jax.jit(jnp.matmul)
            f(a, b).block_until_ready()
            self.fns[n] = (f, a, b)
        self.info = {"sizes": list(sizes), "flops": {str(n): 2.0 * n**3 for n in sizes},
                     "dtype": dtype, "devices": str(jax.devices())}

    def run(self, n: int) -> dict[str, list[float]]:
        out = {}
        for size, (f, a, b) in self.fns.items():
            wall, cpu = time_calls(lambda f=f, a=a, b=b: f(a, b).block_until_ready(), n)
            out[f"matmul_{size}"], out[f"matmul_{size}_cpu"] = wall, cpu
        return out


def roofline_gflops(result: dict[str, list[float]], sizes: Sequence[int] = (2048, 4096)) -> dict:
    """GFLOP per wall second and per CPU second of each matmul size (medians), and the best of
    each (the rooflines used)."""
    g: dict[str, Any] = {"wall": {}, "cpu": {}}
    for n in sizes:
        if f"matmul_{n}" in result:
            g["wall"][str(n)] = 2.0 * n**3 / statistics.median(result[f"matmul_{n}"]) / 1e9
            g["cpu"][str(n)] = 2.0 * n**3 / statistics.median(result[f"matmul_{n}_cpu"]) / 1e9
    g["best_wall"] = max(g["wall"].values())
    g["best_cpu"] = max(g["cpu"].values())
    return g
