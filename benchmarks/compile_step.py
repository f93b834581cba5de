"""Compile time of the main job's CoDi train step (issue 19, acceptance 7), in one process.

Builds the step exactly as `python -m cdd_jax.main --config=configs/sr.py` does (the shipped
teacher, `cdd_jax.stages.distill.distill_job`, `cdd_jax.train.builder.build_train_step` on the
job's own mesh and batch 0 of its pipeline), then times tracing + lowering, `lowered.compile()`
and `--steps` steps after the first. `--set key=value` overrides config fields (e.g.
`--set model.ch=8` for a small program while looking for a mechanism: the shipped teacher is
then replaced by a random init of the smaller U-Net).

    python benchmarks/compile_step.py [--variant=default|tiny] [--set model.ch=16] [--steps=5]
        [--json=OUT.json]

Prints (and writes to --json) setup, trace + lower and compile seconds, JAX's own compile and
cache events (`cache_retrieval_time_sec`: loading an entry), the first and median step times,
the losses (and their float32 bits, to check that a change keeps them bit-identical) and the
peak RSS.

XLA flags come from the environment (XLA_FLAGS), the persistent cache from
$CDD_JAX_COMPILATION_CACHE (as the CLI: `cdd_jax.compile_cache`); run it twice with one cache
folder to time a second process.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", default="default", help="configs/sr.py variant: default, tiny")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    from cdd_jax.compile_cache import enable_compilation_cache
    from cdd_jax.config.presets import sr_config

    cache = enable_compilation_cache()
    config = sr_config(args.variant)
    small = args.variant != "default"
    for item in args.set:
        key, _, value = item.partition("=")
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = _parse_value(value)
        small = small or key.startswith("model.")

    import jax
    import numpy as np

    events: dict[str, float] = {}  # JAX's own timings: cache retrieval, backend compile, ...

    def record(name: str, secs: float, **_) -> None:
        events[name] = events.get(name, 0.0) + secs

    jax.monitoring.register_event_duration_secs_listener(record)

    from cdd_jax.parallel.mesh import configure_cpu_devices
    from cdd_jax.stages.distill import distill_job
    from cdd_jax.stages.sr import make_sr_eval_set
    from cdd_jax.stages.teacher import load_teacher, resolve_teacher
    from cdd_jax.train.builder import build_train_step

    configure_cpu_devices(config.mesh.num_cpu_devices, config.data.batch_size)
    if small:  # a changed U-Net: no shipped teacher fits it; a random init stands in
        from cdd_jax.models.backbone import backbone_from_config
        from cdd_jax.models.unet import init_params
        from cdd_jax.parallel.sharding import unbox

        config.teacher.checkpoint = ""
        size = config.data.crop_size
        teacher = unbox(init_params(backbone_from_config(config.model, size),
                                    jax.random.key(config.seed), size))
    else:
        resolve_teacher(config)
        teacher = load_teacher(config, "/nonexistent")
    eval_set = make_sr_eval_set(config)
    job, _, _ = distill_job(config, teacher, eval_set)
    step = build_train_step(job, config)
    batch = step.global_batch(job.make_dataset(0, 1)[0])
    t_built = time.perf_counter()
    events.clear()
    step.compile(batch)
    t_compiled = time.perf_counter()
    step_events = dict(events)
    losses = []
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        _, metrics = step(batch)
        losses.append(float(jax.block_until_ready(metrics["loss"])))
        times.append(time.perf_counter() - t0)
    out = {
        "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cache": cache,
        "overrides": args.set,
        "setup_s": t_built - t_start,
        "trace_lower_s": step.trace_s,
        "compile_s": step.compile_s,
        "first_step_s": times[0],
        "step_s_median": statistics.median(times[1:]) if args.steps else float("nan"),
        "losses": losses,
        "loss_bits": [np.float32(x).view(np.uint32).item() for x in losses],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load": os.getloadavg(),
        "compile_done_after_s": t_compiled - t_start,
        "jax_events_of_step_compile": step_events,
    }
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
