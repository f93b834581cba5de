"""Shared pieces of the benchmarks: the machine, timing, A/B-interleaved worker processes, the
measured matmul roofline, and the train step built the way `cdd_jax.train.loop.train` builds it.

Why worker processes: XLA flags are read once per process, and PyTorch and XLA each keep their own
thread pool. Every contender (cdd_jax with or without a flag, the PyTorch peer, the roofline) runs
in its own process, compiles and warms up there, then waits; the parent asks each in turn for a
few timed steps (round robin, A/B/A/B...), so a load that comes and goes on a shared machine falls
on all contenders alike. Only one worker computes at any moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
XNN_GREEDY = "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"
# XLA:CPU without its XNNPACK/YNNPACK library fusions (convolutions and dots then run on Eigen).
NO_XNNPACK = "--xla_cpu_use_xnnpack=false"
# XLA:CPU on one thread (Eigen's intra-op pool); PyTorch workers get OMP_NUM_THREADS=1 beside it.
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

# ----------------------------------------------------------------------------------------------
# The machine and its load.
# ----------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the `uptime` figures)."""
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return f"load average: {load_average()}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def accelerator_name() -> str | None:
    """The first GPU's name from nvidia-smi (without starting JAX in this process), or None."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, library versions, flags, load right now."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "grain", "numpy", "torch", "diffusers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "accelerator": accelerator_name(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "xla_flags_env": os.environ.get("XLA_FLAGS", ""),
        "uptime": uptime(),
        "load_average": load_average(),
        "nice": os.nice(0),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def time_calls(fn: Callable[[], Any], n: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds (all threads of this process) of `n` blocking calls.

    CPU seconds per call are robust to other processes' load (they count the work done, not
    the time spent waiting for a core); wall seconds are what a user waits.
    """
    wall, cpu = [], []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median and spread of a list of seconds."""
    xs = sorted(float(t) for t in times)
    if not xs:
        return {"n": 0}

    def q(p):
        return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]

    return {
        "n": len(xs),
        "median_s": statistics.median(xs),
        "p10_s": q(0.1),
        "p90_s": q(0.9),
        "min_s": xs[0],
        "mean_s": statistics.fmean(xs),
    }


# ----------------------------------------------------------------------------------------------
# Worker processes, driven round robin from the parent.
# ----------------------------------------------------------------------------------------------


class Bench:
    """What runs inside a worker: set up once (compile, warm up), then `run(n)` on request.

    `run(n)` returns {label: [seconds, ...]}: a worker may time several things per request.
    """

    info: dict[str, Any] = {}

    def run(self, n: int) -> dict[str, list[float]]:  # pragma: no cover - interface
        raise NotImplementedError


def _serve(conn, factory: Callable[..., Bench], args: tuple, kwargs: dict) -> None:
    try:
        bench = factory(*args, **kwargs)
        import resource

        info = dict(bench.info)
        info["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        conn.send(("ok", info))
    except BaseException:  # noqa: BLE001 - report any setup failure to the parent
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            return
        try:
            if cmd == "run":
                conn.send(("ok", bench.run(int(arg))))
            elif cmd == "call":  # a named method with keyword arguments
                name, kw = arg
                conn.send(("ok", getattr(bench, name)(**kw)))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


@contextlib.contextmanager
def _env(overrides: dict[str, str | None]):
    old = {k: os.environ.get(k) for k in overrides}
    try:
        for k, v in overrides.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Worker:
    """A `Bench` in its own (spawned) process with its own environment, e.g. XLA_FLAGS."""

    def __init__(
        self,
        name: str,
        factory: Callable[..., Bench],
        *args,
        env: dict[str, str | None] | None = None,
        **kwargs,
    ):
        self.name = name
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        with _env(env or {}):
            self._proc = ctx.Process(
                target=_serve, args=(child, factory, args, kwargs), daemon=True
            )
            self._proc.start()
        t0 = time.perf_counter()
        self.info = self._recv()
        self.info.setdefault("setup_s", time.perf_counter() - t0)

    def _recv(self):
        status, payload = self._conn.recv()
        if status != "ok":
            self.close()
            raise RuntimeError(f"benchmark worker {self.name!r} failed:\n{payload}")
        return payload

    def run(self, n: int) -> dict[str, list[float]]:
        self._conn.send(("run", n))
        return self._recv()

    def call(self, method: str, **kw):
        self._conn.send(("call", (method, kw)))
        return self._recv()

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(("stop", None))
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()


def interleave(
    workers: Sequence[Worker],
    rounds: int,
    per_round: int = 1,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Round-robin timing: each round asks every worker (rotating the order) for `per_round`
    timed repetitions. Returns {worker: {label: [seconds]}} plus the load average per round."""
    out: dict[str, dict[str, list[float]]] = {w.name: {} for w in workers}
    loads = []
    for r in range(rounds):
        order = list(workers[r % len(workers) :]) + list(workers[: r % len(workers)])
        for w in order:
            for label, times in w.run(per_round).items():
                out[w.name].setdefault(label, []).extend(times)
        loads.append(load_average())
        if log:
            meds = {
                f"{w.name}/{lab}": round(statistics.median(ts), 4)
                for w in workers
                for lab, ts in out[w.name].items()
            }
            log(f"  round {r + 1}/{rounds}: load {loads[-1]} medians {meds}")
    return {"times": out, "load_per_round": loads}


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


# ----------------------------------------------------------------------------------------------
# Jobs and the train step, the way cdd_jax.train.run / loop build them.
# ----------------------------------------------------------------------------------------------


VARIANTS = ("default", "large", "tiny", "sr_large")


def make_config(kind: str, variant: str = "default", batch_size: int | None = None,
                crop_size: int | None = None, **model_overrides):
    """The preset config of a step `kind` ("pretrain" or "codi") for a model `variant`:
    "default" (the preset: ch 32, ch_mult (1, 2, 2), 1 res block, attention at 8 px, 32 px crops,
    batch 32), "large" (ch 64, 2 res blocks, attention at 16 px, 32 groups, batch 16; ~6.5M
    params), "sr_large" (the U-Net of the accelerator preset `configs/sr.py:large`: ch 128,
    ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 16 px, at 256 px crops, batch 16, on the
    bundled photos; 159 M parameters with the adapter; float32 unless `dtype` is overridden, no
    remat) or "tiny" (the presets' test config, for checking the scripts in seconds)."""
    from cdd_jax.train import presets

    if kind not in ("pretrain", "codi"):
        raise ValueError(f"kind must be 'pretrain' or 'codi', got {kind!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; valid: {VARIANTS}")
    preset = "tiny" if variant == "tiny" else "default"
    config = presets.pretrain_config(preset) if kind == "pretrain" else presets.sr_config(preset)
    if variant == "large":
        config.model.ch = 64
        config.model.ch_mult = (1, 2, 2)
        config.model.num_res_blocks = 2
        config.model.attn_resolutions = (16,)
        config.model.num_groups = 32
        config.data.batch_size = 16
    if variant == "sr_large":  # the U-Net of configs/sr.py:large (accelerators) at 256 px
        big = presets.pretrain_config("large") if kind == "pretrain" else presets.sr_config("large")
        for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_groups", "head_dim"):
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


def pretrain_job(config):
    """The stage-1 Job of `cdd_jax.train.run.pretrain` (model, apply_fn, loss), without eval."""
    from cdd_jax.diffusion import get_schedule
    from cdd_jax.distill.diffusion_loss import diffusion_loss
    from cdd_jax.models.unet import UNet, init_params
    from cdd_jax.train.loop import Job
    from cdd_jax.train.run import _unet_apply

    model = UNet.from_config(config.model)
    apply_fn = _unet_apply(model)
    schedule = get_schedule(config.diffusion.schedule)

    def loss_fn(params, target, teacher, batch, rng):
        return diffusion_loss(
            apply_fn,
            params,
            batch,
            rng,
            schedule=schedule,
            weighting=config.diffusion.weighting,
            snr_gamma=config.diffusion.snr_gamma,
        )

    return Job(
        name="pretrain",
        init_params=lambda rng: init_params(model, rng, config.data.crop_size),
        loss_fn=loss_fn,
        mode="pretrain",
        ema=config.ema,
    )


def codi_job(config):
    """The stage-2 Job of `cdd_jax.train.run.distill` (CoDi: online + target forward, one
    backward; eval EMA and target EMA), with the random init standing in for the teacher."""
    import jax.numpy as jnp

    from cdd_jax.diffusion import get_schedule
    from cdd_jax.distill.objectives import compute_loss, needs_target
    from cdd_jax.models.conditional import ConditionalUNet
    from cdd_jax.train.loop import Job
    from cdd_jax.train.run import _cond_apply

    dcfg = config.distill
    model = ConditionalUNet.from_config(config.model, config.adapter, config.diffusion.schedule)
    apply_fn = _cond_apply(model)
    schedule = get_schedule(config.diffusion.schedule)
    cond0 = jnp.zeros((1, config.data.crop_size, config.data.crop_size, 3))

    def init_fn(rng):
        return model.init({"params": rng}, cond0, jnp.zeros((1,)), cond0)["params"]

    def loss_fn(params, target, teacher, batch, rng):
        return compute_loss(
            apply_fn,
            params,
            batch,
            rng,
            schedule=schedule,
            cfg=dcfg,
            target_params=target,
            teacher_params=teacher,
        )

    return Job(
        name=dcfg.objective,
        init_params=init_fn,
        loss_fn=loss_fn,
        mode="pe_codi" if dcfg.objective == "pe_codi" else "codi",
        ema=dcfg.eval_ema,
        target_ema=dcfg.target_ema if needs_target(dcfg.objective) else None,
    )


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


def flops_of(compiled, num_devices: int = 1) -> float:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (nan if absent). XLA
    analyses the per-device SPMD program: pass the device count of a data-parallel program."""
    from cdd_jax.train.loop import compiled_flops

    flops = compiled_flops(compiled)
    return float("nan") if flops is None else flops * num_devices


@dataclasses.dataclass
class BuiltStep:
    """The compiled train step with its live inputs; `state` is donated and replaced per step."""

    jitted: Any
    compiled: Any
    state: Any
    batch: Any
    rng: Any
    teacher: Any
    trace_s: float
    compile_s: float
    flops: float
    warnings: list[str]
    num_params: int

    def step(self):
        self.state, metrics = self.compiled(self.state, self.batch, self.rng, self.teacher)
        return metrics

    def timed_steps(self, n: int) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of `n` steps, each blocked until its outputs are ready."""
        import jax

        return time_calls(lambda: jax.block_until_ready((self.step(), self.state)), n)


def build_train_step(job, config, batch_np: dict, *, donate: bool = True) -> BuiltStep:
    """Mesh, optimiser, state shardings, the step jitted with in/out shardings and donation and
    compiled ahead of time: the same sequence as `cdd_jax.train.loop.train` (minus checkpoints,
    data iterator and logging). Records trace and compile seconds, FLOPs and any warnings."""
    import jax

    from cdd_jax.parallel.mesh import make_mesh
    from cdd_jax.parallel.sharding import (
        batch_sharding,
        global_batch,
        logical_state_shardings,
        replicated,
        sharding_context,
        unbox,
    )
    from cdd_jax.train.state import count_params, create_state, make_optimizer, param_labels
    from cdd_jax.train.step import make_train_step

    mesh = make_mesh(config.mesh)
    abstract_params = unbox(jax.eval_shape(job.init_params, jax.random.key(0)))
    labels = param_labels(abstract_params, job.mode)
    tx, schedules = make_optimizer(config.optim, config.train.num_steps, labels)
    with_target = job.target_ema is not None

    def init_state(rng):
        return create_state(job.init_params(rng), tx, with_target=with_target, labels=labels)

    boxed = jax.eval_shape(init_state, jax.random.key(0))
    state_sh = logical_state_shardings(
        boxed, mesh, config.mesh.logical_axis_rules, config.mesh.min_shard_bytes
    )
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    state = jax.jit(lambda r: unbox(init_state(r)), out_shardings=state_sh)(init_rng)
    inner = make_train_step(
        job.loss_fn,
        tx,
        labels,
        ema=job.ema,
        target_ema=job.target_ema,
        lr_schedules={k: v for k, v in schedules.items() if k in set(jax.tree.leaves(labels))},
    )

    def step_fn(state, batch, base_rng, teacher_params):
        rng = jax.random.fold_in(base_rng, state.step)
        return inner(state, batch, rng, teacher_params)

    batch = global_batch(batch_np, mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_sh, batch_sharding(mesh), replicated(mesh), None),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sharding_context(mesh, config.mesh.logical_axis_rules):
            t0 = time.perf_counter()
            lowered = jitted.lower(state, batch, step_rng, None)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
        built = BuiltStep(
            jitted,
            compiled,
            state,
            batch,
            step_rng,
            None,
            t1 - t0,
            t2 - t1,
            flops_of(compiled, mesh.size),
            [],
            count_params(state.params),
        )
        jax.block_until_ready(built.step())  # the first call (and any donation warning)
    built.warnings = [str(w.message) for w in caught]
    return built


class TrainStepBench(Bench):
    """A worker's cdd_jax train step: kind "pretrain" | "codi", variant "default" | "large"."""

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

        job = pretrain_job(config) if kind == "pretrain" else codi_job(config)
        self.built = build_train_step(job, config, real_batch(config, kind), donate=donate)
        warm = self.built.timed_steps(warmup)[0]
        b = self.built
        self.info = {
            "kind": kind,
            "variant": variant,
            "model": config.model.to_dict(),
            "batch_size": config.data.batch_size,
            "crop_size": config.data.crop_size,
            "num_params": b.num_params,
            "trace_s": b.trace_s,
            "compile_s": b.compile_s,
            "flops_per_step": b.flops,
            "warnings": b.warnings,
            "warmup_s": warm,
            "donate": donate,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "devices": str(jax.devices()),
            "dtype": str(config.model.dtype),
        }

    def run(self, n: int) -> dict[str, list[float]]:
        wall, cpu = self.built.timed_steps(n)
        return {"step": wall, "step_cpu": cpu}


# ----------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------


def load_sr_run(workdir: str) -> dict[str, Any]:
    """A finished `configs/sr.py` run (config_sr.json + distill/ checkpoints) and its held-out set:
    {"config", "params" (EMA), "apply_fn", "schedule", "eval_set"}."""
    import json

    import ml_collections

    from cdd_jax.data.degradations import SRPairTransform, degradation_config
    from cdd_jax.data.pipeline import make_eval_set
    from cdd_jax.diffusion import get_schedule
    from cdd_jax.models.conditional import ConditionalUNet
    from cdd_jax.train.checkpoint import load_params
    from cdd_jax.train.run import _cond_apply

    config_path = os.path.join(workdir, "config_sr.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: --workdir must be a configs/sr.py run")
    with open(config_path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    # Runs saved before a degradation option existed: that option at its default (off).
    degradation = degradation_config(cfg.degradation.preset)
    degradation.update(cfg.degradation.to_dict())
    cfg.degradation = degradation
    params, _ = load_params(os.path.join(workdir, "distill"))
    eval_set = make_eval_set(
        cfg.data, task="sr", sr_transform=SRPairTransform(cfg.degradation, cfg.data.crop_size)
    )
    model = ConditionalUNet.from_config(cfg.model, cfg.adapter, cfg.diffusion.schedule)
    return {"config": cfg, "params": params, "apply_fn": _cond_apply(model),
            "schedule": get_schedule(cfg.diffusion.schedule), "eval_set": eval_set}


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str, out_dir: str = RESULTS_DIR) -> None:
    """benchmarks/results/<name>.json and <name>.md."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown.rstrip() + "\n")
    print(f"wrote {out_dir}/{name}.json and {name}.md", file=sys.stderr)
