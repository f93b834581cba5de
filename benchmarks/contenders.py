"""What the benchmarks time: the benchmark's configs, the train-step contenders built with the
package (`cdd_jax.stages` jobs, `cdd_jax.train.builder.build_train_step`, exactly as
`cdd_jax.train.loop.train` builds its step), and the measured matmul roofline.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Bench, time_calls

VARIANTS = ("default", "large", "tiny", "sr_large")
KINDS = ("pretrain", "codi")
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
    layer for layer, so the comparison is at equal architecture (`model.family` overrides)."""
    from cdd_jax.config.presets import pretrain_config, sr_config

    if kind not in KINDS:
        raise ValueError(f"kind must be 'pretrain' or 'codi', got {kind!r}")
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


def real_batch(config, kind: str) -> dict:
    """Batch 0 of the real training pipeline (bundled photos; SR pairs for "codi")."""
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


def contender_job(kind: str, config, batch: dict):
    """The Job of a step `kind`: the package's pretraining job, or `codi_job`."""
    from cdd_jax.stages.pretrain import pretrain_job

    if kind not in KINDS:
        raise ValueError(f"kind must be 'pretrain' or 'codi', got {kind!r}")
    return pretrain_job(config)[0] if kind == "pretrain" else codi_job(config, batch)


@dataclasses.dataclass
class Contender:
    """A compiled `TrainStep` (cdd_jax.train.builder) on its global batch; the state is donated
    and replaced per step. `first_metrics`: the metrics of the first step (run at build)."""

    step: Any
    batch: Any
    warnings: list[str]
    num_params: int
    first_metrics: dict

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
    ahead of time and run once; records the warnings of compiling and the first call."""
    import jax

    from cdd_jax.train.builder import build_train_step
    from cdd_jax.train.state import count_params

    batch_np = real_batch(config, kind)
    step = build_train_step(contender_job(kind, config, batch_np), config, donate=donate)
    batch = step.global_batch(batch_np)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step.compile(batch)
        first = jax.block_until_ready(step(batch)[1])  # the first call (and any donation warning)
    return Contender(step, batch, [str(w.message) for w in caught],
                     count_params(step.state.params), first)


class TrainStepBench(Bench):
    """A worker's cdd_jax train step: kind "pretrain" | "codi", variant from `VARIANTS`."""

    def __init__(
        self,
        kind: str,
        variant: str = "default",
        warmup: int = 3,
        donate: bool = True,
        batch_size: int | None = None,
        crop_size: int | None = None,
        **model_overrides,
    ):
        config = make_config(kind, variant, batch_size, crop_size, **model_overrides)
        # As training does: split the CPU into devices (the preset's mesh.num_cpu_devices) before
        # JAX starts; an explicit JAX_NUM_CPU_DEVICES in the worker's environment wins.
        from cdd_jax.parallel.mesh import configure_cpu_devices

        configure_cpu_devices(config.mesh.num_cpu_devices, config.data.batch_size)
        import jax

        self.contender = build_contender(kind, config, donate=donate)
        warm = self.contender.timed_steps(warmup)[0]
        c = self.contender
        self.info = {
            "kind": kind,
            "variant": variant,
            "model": config.model.to_dict(),
            "batch_size": config.data.batch_size,
            "crop_size": config.data.crop_size,
            "num_params": c.num_params,
            **c.info(),
            "warnings": c.warnings,
            "warmup_s": warm,
            "donate": donate,
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
