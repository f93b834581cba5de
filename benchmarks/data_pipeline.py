"""The SR input pipeline: throughput, and the data-wait fraction inside a real training run.

1. Throughput of `build_train_dataset(task="sr")` with `SRPairTransform` and the default
   `sr_config()` degradation (realesrgan preset, degrading the 32 px crop itself), batch 32,
   through `make_train_iterator` with num_workers 0 (threads in the main process) and 2 (grain
   worker processes). Steady-state batches/s: arrival times of `--batches` batches, skipping the
   first `--skip` (which the prefetch buffer may already hold). The settings alternate over
   `--rounds` rounds (fresh iterator each time), so load changes affect both alike.
2. A short real distillation run: `cdd_jax.stages.distill.distill` of the default SR config for
   `--run_steps` steps with a freshly initialised teacher of the default architecture (the CoDi
   step, the grain iterator and the loop exactly as in a real job), then the `data_wait_fraction`
   scalars that the loop logs to TensorBoard (time blocked in `next(iterator)` + device_put /
   wall time of the logging interval), read back from the event files.

    python benchmarks/data_pipeline.py [--batches=40] [--rounds=3] [--run_steps=60]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def sr_dataset(config):
    from cdd_jax.data.degradations import SRPairTransform
    from cdd_jax.data.pipeline import build_train_dataset

    return build_train_dataset(
        config.data,
        task="sr",
        sr_transform=SRPairTransform(config.degradation, config.data.crop_size),
    )


def pipeline_rate(config, num_workers: int, batches: int, skip: int) -> dict:
    """Steady-state batches/s of the training iterator with `num_workers` workers."""
    from cdd_jax.data.pipeline import make_train_iterator

    t_start = time.perf_counter()
    it = make_train_iterator(
        sr_dataset(config), num_workers, config.data.prefetch, read_threads=config.data.read_threads
    )
    arrivals = []
    for _ in range(batches):
        next(it)
        arrivals.append(time.perf_counter())
    first_s = arrivals[0] - t_start
    del it  # stops grain's threads / worker processes
    steady = (batches - 1 - skip) / (arrivals[-1] - arrivals[skip])
    return {
        "batches_per_s": steady,
        "first_batch_s": first_s,
        "pairs_per_s": steady * config.data.batch_size,
    }


def read_scalars(workdir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar tag from the TensorBoard event files that clu wrote."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    out = []
    for path in sorted(
        glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True)
    ):
        acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        tags = acc.Tags()
        if tag in tags.get("tensors", []):
            out += [
                (e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)
            ]
        elif tag in tags.get("scalars", []):
            out += [(e.step, float(e.value)) for e in acc.Scalars(tag)]
    return sorted(out)


def training_run(steps: int, log_every: int, num_workers: int, workdir: str) -> dict:
    """`stages.distill.distill` of the default SR config with a random default teacher; logged
    scalars."""
    import jax

    from cdd_jax.config.presets import sr_config
    from cdd_jax.models.backbone import backbone_from_config
    from cdd_jax.models.unet import init_params
    from cdd_jax.parallel.sharding import unbox
    from cdd_jax.stages.distill import distill
    from cdd_jax.stages.sr import make_sr_eval_set

    config = sr_config("default")
    config.train.num_steps = steps
    config.train.log_every = log_every
    config.train.eval_every = 0  # held-out PSNR only at the start and the end
    config.train.ckpt_every = 10 * steps  # only the final checkpoint
    config.data.num_workers = num_workers
    config.data.num_eval_crops = config.evaluate.batch_size
    size = config.data.crop_size
    teacher = unbox(
        jax.jit(lambda r: init_params(backbone_from_config(config.model, size), r, size))(
            jax.random.key(0))
    )
    eval_set = make_sr_eval_set(config)
    t0 = time.perf_counter()
    distill(config, workdir, teacher, eval_set)
    wall = time.perf_counter() - t0
    wait = read_scalars(workdir, "data_wait_fraction")
    steps_per_sec = read_scalars(workdir, "steps_per_sec")
    compile_s = read_scalars(workdir, "compile_seconds")
    # Step-weighted mean over the logging intervals.
    prev, num, den = 0, 0.0, 0
    for step, frac in wait:
        num += frac * (step - prev)
        den += step - prev
        prev = step
    return {
        "num_workers": num_workers,
        "steps": steps,
        "log_every": log_every,
        "data_wait_fraction": wait,
        "data_wait_fraction_mean": num / max(den, 1),
        "steps_per_sec": steps_per_sec,
        "compile_seconds": compile_s,
        "wall_s": wall,
        "batch_size": config.data.batch_size,
        "num_pipeline_threads": config.data.read_threads,
        "prefetch": config.data.prefetch,
    }


def measure_throughput(config, args) -> tuple[dict, list]:
    """Steady-state rates of each --workers setting over alternating rounds; the load per round."""
    settings = [int(w) for w in args.workers.split(",") if w != ""]
    rates: dict[int, list[dict]] = {w: [] for w in settings}
    loads = []
    for r in range(args.rounds):
        for w in settings if r % 2 == 0 else settings[::-1]:
            rates[w].append(pipeline_rate(config, w, args.batches, args.skip))
            print(f"  round {r + 1}: num_workers={w}: {rates[w][-1]}")
        loads.append(common.load_average())
    throughput = {}
    for w, rs in rates.items():
        bps = [x["batches_per_s"] for x in rs]
        throughput[str(w)] = {
            "batches_per_s_median": statistics.median(bps),
            "pairs_per_s_median": statistics.median(bps) * config.data.batch_size,
            "rounds": rs,
        }
    return throughput, loads


def markdown(config, args, machines: tuple[dict, dict, dict], throughput: dict,
             runs: list[dict]) -> list[str]:
    """The results page, line by line; `machines`: machine info at start, middle and end."""
    machine, load_mid, machine_end = machines
    rows = [
        [w, t["batches_per_s_median"], t["pairs_per_s_median"], 1e3 / t["batches_per_s_median"]]
        for w, t in throughput.items()
    ]
    md = [
        "# SR input pipeline",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores. Load average (1/5/15 min): start "
        f"{machine['load_average']}, after the throughput part {load_mid['load_average']}, end "
        f"{machine_end['load_average']}. Default `sr_config()`: realesrgan degradation of the "
        f"{config.data.crop_size} px crop, batch {config.data.batch_size}, "
        f"read_threads {config.data.read_threads}, prefetch {config.data.prefetch}.",
        "",
        "## Throughput (steady state, median of alternating rounds)",
        "",
        common.md_table(["num_workers", "batches/s", "pairs/s", "ms / batch"], rows),
    ]
    if runs:
        md += [
            "",
            f"## Data wait inside a real run ({args.run_steps} CoDi steps, default SR "
            "config, random default teacher)",
            "",
            common.md_table(
                [
                    "num_workers",
                    "data_wait_fraction per log interval",
                    "mean",
                    "steps/s (last interval)",
                ],
                [
                    [
                        r["num_workers"],
                        ", ".join(f"{v:.4f}@{s}" for s, v in r["data_wait_fraction"]),
                        r["data_wait_fraction_mean"],
                        r["steps_per_sec"][-1][1] if r["steps_per_sec"] else float("nan"),
                    ]
                    for r in runs
                ],
            ),
            "",
            f"**Target**: data wait < 5% of step time: measured "
            f"{100 * runs[0]['data_wait_fraction_mean']:.2f}% "
            f"({'met' if runs[0]['data_wait_fraction_mean'] < 0.05 else 'MISSED'}).",
        ]
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40, help="Batches timed per measurement.")
    p.add_argument("--skip", type=int, default=10, help="Leading batches left out of the rate.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="0,2", help="num_workers settings to compare.")
    p.add_argument("--run_steps", type=int, default=60, help="Steps of the real run (0: skip).")
    p.add_argument("--run_log_every", type=int, default=20)
    p.add_argument("--run_workers", default="0", help="num_workers of the real run(s).")
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    args = p.parse_args()
    if not 0 <= args.skip <= args.batches - 2:
        p.error(f"--skip ({args.skip}) must leave at least two timed batches of --batches "
                f"({args.batches}): 0 <= skip <= batches - 2")

    from cdd_jax.config.presets import sr_config
    from cdd_jax.parallel.mesh import configure_cpu_devices

    config = sr_config("default")
    # The real run below splits the CPU into devices as `train_and_evaluate` would.
    configure_cpu_devices(config.mesh.num_cpu_devices, config.data.batch_size)
    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['uptime']}")
    throughput, loads = measure_throughput(config, args)
    load_mid = common.machine_info()

    runs = []
    for w in [int(x) for x in args.run_workers.split(",") if x != ""] if args.run_steps else []:
        with tempfile.TemporaryDirectory(prefix="cdd_data_run_") as workdir:
            runs.append(training_run(args.run_steps, args.run_log_every, w, workdir))
        print(f"  training run num_workers={w}: wait {runs[-1]['data_wait_fraction']}")
    machine_end = common.machine_info()

    md = markdown(config, args, (machine, load_mid, machine_end), throughput, runs)
    payload = {
        **common.payload_header("data_pipeline", machine, machine_end),
        "load_average_mid": load_mid["load_average"],
        "load_per_round": loads,
        "args": vars(args),
        "throughput": throughput,
        "training_runs": runs,
    }
    if runs:
        payload["target"] = {
            "data_wait_fraction": runs[0]["data_wait_fraction_mean"],
            "required_below": 0.05,
            "met": runs[0]["data_wait_fraction_mean"] < 0.05,
        }
    print("\n".join(md))
    common.write_results("data_pipeline", payload, "\n".join(md), args.out_dir)


if __name__ == "__main__":
    main()
