"""Shared pieces of the benchmarks: the machine, timing, A/B-interleaved worker processes, FLOP
counts, finished runs and the result files. What is timed (configs, the train-step contenders,
the matmul roofline) is in `contenders.py`.

Why worker processes: XLA flags are read once per process, and PyTorch and XLA each keep their own
thread pool. Every contender (cdd_jax with or without a flag, the PyTorch peer, the roofline) runs
in its own process, compiles and warms up there, then waits; the parent asks each in turn for a
few timed steps (round robin, A/B/A/B...), so a load that comes and goes on a shared machine falls
on all contenders alike. Only one worker computes at any moment.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
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


def payload_header(name: str, machine: dict, machine_end: dict) -> dict[str, Any]:
    """The fields a benchmark's JSON starts with: its name, `machine_info()` taken at the start,
    and the uptime and load average at the end beside the load at the start."""
    return {
        "benchmark": name,
        "machine": machine,
        "uptime_end": machine_end["uptime"],
        "load_average_start": machine["load_average"],
        "load_average_end": machine_end["load_average"],
    }


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
# FLOPs, finished runs and output.
# ----------------------------------------------------------------------------------------------


def flops_of(compiled, num_devices: int = 1) -> float:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (nan if absent). XLA
    analyses the per-device SPMD program: pass the device count of a data-parallel program."""
    from cdd_jax.train.builder import compiled_flops

    flops = compiled_flops(compiled)
    return float("nan") if flops is None else flops * num_devices


def saved_config(path: str):
    """A run's saved config (config_<stage>.json) on today's defaults
    (`cdd_jax.config.saved.saved_config`)."""
    from cdd_jax.config.saved import saved_config as read

    return read(path)


def load_sr_run(workdir: str) -> dict[str, Any]:
    """A finished `configs/sr.py` run (config_sr.json + distill/ checkpoints) and its held-out set:
    {"config", "params" (EMA), "apply_fn", "schedule", "eval_set"}."""
    from cdd_jax.diffusion import get_schedule
    from cdd_jax.stages.distill import conditional_model
    from cdd_jax.stages.sr import make_sr_eval_set
    from cdd_jax.train.checkpoint import load_params

    config_path = os.path.join(workdir, "config_sr.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: --workdir must be a configs/sr.py run")
    cfg = saved_config(config_path)
    params, _ = load_params(os.path.join(workdir, "distill"))
    _, apply_fn = conditional_model(cfg)
    return {"config": cfg, "params": params, "apply_fn": apply_fn,
            "schedule": get_schedule(cfg.diffusion.schedule), "eval_set": make_sr_eval_set(cfg)}


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
