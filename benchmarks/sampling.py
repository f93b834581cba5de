"""Sampling latency per image: the distilled student at K = 1, 2, 4 steps vs the teacher at 200.

Both use the conditional network of the default SR config (`sr_config("default")`: ch 32, ch_mult
(1, 2, 2), 1 res block, attention at 8 px, the ControlNet-style control encoder) at 32 px, batch
16, with
parameters from its random init (timing does not depend on the values). The student is
`cdd_jax.distill.sampling.few_step_sample` (K-step DDIM); the teacher baseline is
`solver_sample(..., num_steps=200, sampler="ddim")` on the same network, i.e. what sampling a
conditional diffusion model without distillation costs. Each sampler is jitted with the
parameters and the condition as arguments; latency is the median over repeated calls after
warm-up, with block_until_ready, divided by the batch size. Calls of all K (and of the teacher)
alternate round by round so that load changes affect them alike. `--xnn` adds a second worker
process with the XNNPACK greedy graph-fusion flag, alternated with the plain one.

    python benchmarks/sampling.py [--rounds=5] [--batch=16] [--teacher_steps=200] [--xnn]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, contenders  # noqa: E402

STUDENT_STEPS = (1, 2, 4)


class SamplerBench(common.Bench):
    """Student (K = 1, 2, 4) and teacher (`teacher_steps` DDIM steps) samplers, jitted."""

    def __init__(self, batch: int = 16, teacher_steps: int = 200, variant: str = "default"):
        import jax
        import jax.numpy as jnp

        from cdd_jax.data.degradations import SRPairTransform
        from cdd_jax.data.pipeline import make_eval_set
        from cdd_jax.diffusion import get_schedule
        from cdd_jax.distill.sampling import few_step_sample, solver_sample
        from cdd_jax.models.unet import init_params
        from cdd_jax.parallel.sharding import unbox
        from cdd_jax.stages.distill import conditional_model

        config = contenders.make_config("codi", variant)
        size = config.data.crop_size
        model, apply_fn = conditional_model(config)
        schedule = get_schedule(config.diffusion.schedule)
        cond0 = jnp.zeros((1, size, size, 3))
        self.params = unbox(init_params(model, jax.random.key(0), size, cond=cond0))
        eval_set = make_eval_set(
            config.data,
            task="sr",
            num_crops=batch,
            sr_transform=SRPairTransform(config.degradation, size),
        )
        self.cond = jnp.asarray(eval_set["cond"])
        self.rng = jax.random.key(7)
        self.batch = batch
        self.fns, compile_s, flops = {}, {}, {}
        samplers = {f"student_K{k}": (few_step_sample, k) for k in STUDENT_STEPS}
        samplers[f"teacher_{teacher_steps}"] = (solver_sample, teacher_steps)
        for name, (fn, k) in samplers.items():
            jitted = jax.jit(
                lambda p, c, r, fn=fn, k=k: fn(apply_fn, p, c, r, schedule=schedule, num_steps=k)
            )
            t0 = time.perf_counter()
            compiled = jitted.lower(self.params, self.cond, self.rng).compile()
            compile_s[name] = time.perf_counter() - t0
            flops[name] = common.flops_of(compiled)
            compiled(self.params, self.cond, self.rng).block_until_ready()  # warm-up
            self.fns[name] = compiled
        self.info = {
            "batch": batch,
            "crop_size": size,
            "model": config.model.to_dict(),
            "compile_s": compile_s,
            "flops_per_call": flops,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }

    def run(self, n: int) -> dict[str, list[float]]:
        out = {}
        for name, fn in self.fns.items():
            reps = 1 if name.startswith("teacher") else n
            wall, cpu = common.time_calls(
                lambda fn=fn: fn(self.params, self.cond, self.rng).block_until_ready(), reps
            )
            out[name], out[name + "_cpu"] = wall, cpu
        return out


def sampler_results(workers, times_of: dict, batch: int, teacher: str) -> tuple[list, dict]:
    """Per worker and sampler: wall and CPU summaries, ms per image, speed-up over the teacher;
    and the table rows."""
    rows, results = [], {}
    for w in workers:
        times = times_of[w.name]
        per = {}
        for name in (n for n in times if not n.endswith("_cpu")):
            wall = statistics.median(times[name])
            cpu = statistics.median(times[name + "_cpu"])
            per[name] = {
                "wall": common.summarize(times[name]),
                "cpu": common.summarize(times[name + "_cpu"]),
                "per_image_ms": 1e3 * wall / batch,
                "per_image_cpu_ms": 1e3 * cpu / batch,
                "compile_s": w.info["compile_s"][name],
                "flops_per_call": w.info["flops_per_call"][name],
            }
        for name, r in per.items():
            r["speedup_vs_teacher"] = per[teacher]["per_image_ms"] / r["per_image_ms"]
            r["speedup_vs_teacher_cpu"] = per[teacher]["per_image_cpu_ms"] / r["per_image_cpu_ms"]
            rows.append(
                [
                    w.name,
                    name,
                    r["compile_s"],
                    r["per_image_ms"],
                    r["per_image_cpu_ms"],
                    r["speedup_vs_teacher"],
                    r["speedup_vs_teacher_cpu"],
                    r["wall"]["n"],
                ]
            )
        results[w.name] = per
    return rows, results


def markdown(args, machine: dict, machine_end: dict, rows: list, ratio: float,
             ratio_cpu: float) -> list[str]:
    """The results page, line by line."""
    return [
        "# Sampling latency per image (conditional network, default SR config)",
        "",
        "Machine: "
        + (f"GPU {machine['accelerator']}; " if machine.get("accelerator") else "")
        + f"{machine['cpu']}, {machine['cores']} cores. Load average (1/5/15 min) at start "
        f"{machine['load_average']}, at end {machine_end['load_average']}. Batch {args.batch} at "
        f"32 px; parameters from init; {args.rounds} alternating rounds (median). Samplers "
        "jitted with lax.scan over steps; compile time is the ahead-of-time compile.",
        "",
        common.md_table(
            [
                "process",
                "sampler",
                "compile s",
                "ms / image (wall)",
                "CPU ms / image",
                "speed-up vs teacher (wall)",
                "speed-up (CPU)",
                "calls",
            ],
            rows,
        ),
        "",
        f"**Target**: 4-step student >= 40x faster per image than the {args.teacher_steps}-step "
        f"teacher: measured {ratio:.1f}x in wall time, {ratio_cpu:.1f}x in CPU time "
        f"({'met' if ratio >= 40 else 'MISSED'}).",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="Rounds; each times every sampler.")
    p.add_argument("--per_round", type=int, default=3, help="Student calls per round.")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--variant", default="default", choices=contenders.VARIANTS)
    p.add_argument("--teacher_steps", type=int, default=200)
    p.add_argument("--xnn", action="store_true", help="Also time with the XNNPACK greedy flag.")
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    args = p.parse_args()

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['uptime']}")
    workers = [common.Worker("cdd_jax", SamplerBench, args.batch, args.teacher_steps, args.variant)]
    if args.xnn:
        flags = (os.environ.get("XLA_FLAGS", "") + " " + common.XNN_GREEDY).strip()
        try:
            workers.append(common.Worker("cdd_jax+xnn", SamplerBench, args.batch,
                                         args.teacher_steps, args.variant,
                                         env={"XLA_FLAGS": flags}))
        except BaseException:
            workers[0].close()
            raise
    try:
        res = common.interleave(workers, args.rounds, args.per_round)
    finally:
        for w in workers:
            w.close()

    teacher = f"teacher_{args.teacher_steps}"
    rows, results = sampler_results(workers, res["times"], args.batch, teacher)
    main_res = results["cdd_jax"]
    ratio = main_res[teacher]["per_image_ms"] / main_res["student_K4"]["per_image_ms"]
    ratio_cpu = main_res[teacher]["per_image_cpu_ms"] / main_res["student_K4"]["per_image_cpu_ms"]
    machine_end = common.machine_info()
    payload = {
        **common.payload_header("sampling", machine, machine_end),
        "load_per_round": res["load_per_round"],
        "args": vars(args),
        "results": results,
        "raw_times": res["times"],
        "target": {
            "K4_vs_teacher_speedup": ratio,
            "K4_vs_teacher_speedup_cpu": ratio_cpu,
            "required": 40.0,
            "met": ratio >= 40.0,
        },
        "worker_info": {w.name: w.info for w in workers},
    }
    md = markdown(args, machine, machine_end, rows, ratio, ratio_cpu)
    print("\n".join(md))
    common.write_results("sampling", payload, "\n".join(md), args.out_dir)


if __name__ == "__main__":
    main()
