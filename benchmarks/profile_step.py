"""Where the time of a cdd_jax train step goes: per-op categories from a jax.profiler trace.

Builds the step exactly as `train_step.py` does (`contenders.build_contender`), runs warm-up steps,
then traces `--steps` steps with `jax.profiler` (a Perfetto JSON trace, no extra package needed)
and sums the duration of every XLA:CPU thunk per step, grouped by its HLO name with the numeric
suffix removed (`ynn_fusion.319` -> `ynn_fusion`). Durations are summed over threads, so they are
CPU-time-like: compare categories with each other, not with the wall time of the step.

    python benchmarks/profile_step.py [--kind=codi|pretrain] [--variant=default] [--steps=5]

Writes benchmarks/results/profile_<kind>_<variant>.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, contenders  # noqa: E402

# Host-side trace events (Python frames, the executor's own bookkeeping) are not XLA ops.
_NOT_OPS = re.compile(r"^(\$|ThunkExecutor|PjitFunction|CommonPjRt|PjRt|TfrtCpu|Execute)")


def op_category(name: str) -> str:
    """An HLO op's name without its numeric suffix: 'add_divide_fusion.7' -> 'add_divide_fusion'."""
    return re.sub(r"[._]\d+$", "", name.split(" ")[0])


def per_step_categories(events: list[dict], steps: int) -> dict[str, dict[str, float]]:
    """{category: {"ms": summed duration per step, "count": ops per step}} of the XLA ops."""
    ms: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or not name or _NOT_OPS.match(name):
            continue
        cat = op_category(name)
        ms[cat] += e.get("dur", 0) / 1e3 / steps
        count[cat] += 1
    return {k: {"ms": v, "count": count[k] / steps} for k, v in ms.most_common()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="codi", choices=("codi", "pretrain"))
    p.add_argument("--variant", default="default", choices=contenders.VARIANTS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    from cdd_jax.parallel.mesh import configure_cpu_devices

    config = contenders.make_config(args.kind, args.variant)
    configure_cpu_devices(config.mesh.num_cpu_devices, config.data.batch_size)  # as training does
    import jax

    built = contenders.build_contender(args.kind, config)
    built.timed_steps(3)
    untraced, _ = built.timed_steps(args.steps)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        traced, _ = built.timed_steps(args.steps)
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no perfetto trace under {d}")
        with gzip.open(files[-1]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    cats = per_step_categories(events, args.steps)
    total = sum(c["ms"] for c in cats.values())
    payload = {
        "machine": common.machine_info(),
        "args": vars(args),
        "load_average": common.load_average(),
        "step_wall_s_untraced": statistics.median(untraced),
        "step_wall_s_traced": statistics.median(traced),
        "op_ms_per_step_total": total,
        "categories": cats,
    }
    rows = [
        [k, c["ms"], 100 * c["ms"] / total, c["count"]]
        for k, c in list(cats.items())[: args.top]
    ]
    md = "\n".join(
        [
            f"# Where the {args.variant} {args.kind} step's time goes (XLA:CPU ops, jax.profiler)",
            "",
            f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores; load "
            f"{payload['load_average']}. Step wall time (median of {args.steps}): "
            f"{payload['step_wall_s_untraced']:.3f} s untraced, "
            f"{payload['step_wall_s_traced']:.3f} s traced. Op time summed over threads: "
            f"{total:.0f} ms per step. Command: `python benchmarks/profile_step.py "
            f"--kind={args.kind} --variant={args.variant} --steps={args.steps}`.",
            "",
            common.md_table(["op category (HLO name)", "ms / step", "% of op time", "ops / step"],
                            rows),
            "",
        ]
    )
    name = f"profile_{args.kind}_{args.variant}"
    common.write_results(name, payload, md, args.out_dir)
    print(md)


if __name__ == "__main__":
    main()
