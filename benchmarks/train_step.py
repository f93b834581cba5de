"""Train-step speed: the pretraining step and the CoDi step, cdd_jax vs a PyTorch peer.

For each model variant ("default": the preset U-Net, ch 32, ch_mult (1, 2, 2), 1 res block,
attention at 8 px, 32 px crops, batch 32; "large": ch 64, 2 res blocks, attention at 16 px,
32 groups, batch 16) and each step kind ("pretrain": v-prediction diffusion loss; "codi": the
CoDi loss, two forward passes of the conditional network and one backward), it builds the step
with `cdd_jax.train.builder.build_train_step`, as `cdd_jax.train.loop.train` does (jax.jit with
in/out shardings, donated state, compiled ahead of time; `contenders.build_contender`) on a real
batch of the pipeline and reports:
trace + compile seconds, the step time (median of the timed steps after warm-up, each blocked
with block_until_ready), FLOPs per step from `compiled.cost_analysis()`, achieved FLOP/s, and
the ratio to an f32 matmul roofline (2048^2 and 4096^2, best of the two) measured in the same run.

Contenders run in separate worker processes and are timed in alternation (A/B/A/B, see
`common.interleave`), so the load of a shared machine falls on all of them alike:
  cdd_jax        the real step, as the preset configures it (the default presets: one XLA:CPU
                 device per core, `mesh.num_cpu_devices = -1`)
  peer           the same shapes in PyTorch (`peer_torch.py`: diffusers UNet2DModel, or
                 UNet2DConditionModel + ControlNetModel for CoDi), eager mode
  cdd_jax+xnn    with XLA_FLAGS += --xla_cpu_experimental_xnn_graph_fusion_mode=..._GREEDY
  cdd_jax-xnnpack  with XLA_FLAGS += --xla_cpu_use_xnnpack=false (Eigen convolutions and dots)
  cdd_jax+conc   with XLA_FLAGS += --xla_cpu_enable_concurrency_optimized_scheduler=true
  cdd_jax+fastrt with XLA_FLAGS += --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME
  cdd_jax+remat  with model.remat = True (rematerialised residual blocks)
  cdd_jax-nodonate  without donate_argnums (what donation saves)
  cdd_jax@1dev / @2dev  with JAX_NUM_CPU_DEVICES = 1 / 2 (one XLA device; two, one per core)
The cdd_jax worker also times the EMA update as a separate jitted call, i.e. what the step
would cost if the EMA were not fused into it.

The "sd" kind (`benchmarks/sd_train_step.py` runs it) is the CoDi step of the latent,
text-conditioned job (`configs/sr.py:sd`) on an SD-1.5-structured U-Net, its peer diffusers'
UNet2DConditionModel + ControlNetModel.from_unet; variants "sd_small" (CPU) and "sd15" (SD 1.5
size, skipped with a message where no GPU is present).

    python benchmarks/train_step.py [--variants=default,large] [--kinds=pretrain,codi]
        [--rounds=6] [--per_round=2] [--no_peer] [--dtype=float32|bfloat16] [--batch_size=N]
        [--crop_size=PX]
        [--experiments=xnn,noxnnpack,concurrent,fastrt,cpu1,cpu2,remat,nodonate]
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

# Contenders that differ from cdd_jax only by extra XLA flags: name -> (label, flags).
FLAG_EXPERIMENTS = {
    "xnn": ("cdd_jax+xnn", common.XNN_GREEDY),
    "noxnnpack": ("cdd_jax-xnnpack", common.NO_XNNPACK),
    # Lets XLA:CPU's thunk executor run independent ops at the same time (more cores busy).
    "concurrent": ("cdd_jax+conc", "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
    # XLA:CPU's optimisation preset for run time over compile time.
    "fastrt": ("cdd_jax+fastrt", "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME"),
}
# Contenders that differ from cdd_jax only by environment variables: name -> (label, env).
# The cdd_jax contender runs as the preset configures it: the default presets split the CPU into
# one XLA device per core (`mesh.num_cpu_devices = -1`, the batch split over them).
ENV_EXPERIMENTS = {
    "cpu1": ("cdd_jax@1dev", {"JAX_NUM_CPU_DEVICES": "1"}),  # one XLA device (JAX's default)
    "cpu2": ("cdd_jax@2dev", {"JAX_NUM_CPU_DEVICES": "2"}),
}
EXPERIMENTS = (*FLAG_EXPERIMENTS, *ENV_EXPERIMENTS, "remat", "nodonate")


class JaxStep(contenders.TrainStepBench):
    """The cdd_jax step in a worker, plus the cost of an unfused EMA update."""

    def unfused_ema_s(self, n: int = 10) -> float:
        """Median seconds of one EMA update of the parameters as its own jitted call."""
        import jax

        from cdd_jax.distill.ema import ema_update

        if not self.update:  # the gradient alone: no state, no EMA
            return float("nan")
        f = jax.jit(ema_update)
        s = self.contender.step.state
        jax.block_until_ready(f(s.ema_params, s.params, 0.999))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(f(s.ema_params, s.params, 0.999))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


def _peer(kind: str, variant: str, warmup: int = 3, threads: int = 0, **kw):
    from benchmarks.peer_torch import PeerTrainStep

    return PeerTrainStep(kind, variant, warmup, threads=threads, **kw)


def _env_1t(base_flags: str) -> dict[str, str]:
    """Environment of a one-thread worker: XLA's Eigen pool and OpenMP (PyTorch) at 1 thread,
    one XLA:CPU device."""
    flags = (base_flags + " " + common.XLA_ONE_THREAD).strip()
    return {"XLA_FLAGS": flags, "OMP_NUM_THREADS": "1", "JAX_NUM_CPU_DEVICES": "1"}


def credited_flops(workers: list[common.Worker]) -> tuple[float, str]:
    """FLOPs of one step, credited to every contender (the same work), and where they come from.

    XLA's cost analysis of the cdd_jax step, unless the peer's layer count (torch
    FlopCounterMode: convolutions and matmuls only, so a lower bound) exceeds it, which happens
    on GPUs: XLA:GPU's cost analysis does not count the convolutions it hands to cuDNN."""
    xla = float(workers[0].info["flops_per_step"])
    peer = [w.info["layer_flops_per_step"] for w in workers if w.name.startswith("peer")]
    if peer and not xla >= 0.95 * peer[0]:  # also when XLA reports nan
        return float(peer[0]), "torch FlopCounterMode (convs/matmuls; XLA's count was lower)"
    return xla, "XLA cost analysis"


def make_workers(kind: str, variant: str, args) -> list[common.Worker]:
    """The contenders of one (kind, variant): cdd_jax (and the peer) per thread setting, then the
    experiments. Workers already started are closed if a later one fails."""
    base = os.environ.get("XLA_FLAGS", "")
    threads = [t for t in args.threads.split(",") if t]
    exps = [e for e in args.experiments.split(",") if e]
    for e in exps:
        if e not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {e!r}; valid: {EXPERIMENTS}")
    workers: list[common.Worker] = []
    # Shapes and precision shared by every contender (--batch_size, --dtype).
    shape = {"batch_size": args.batch_size or None, "crop_size": args.crop_size or None,
             "dtype": args.dtype, "update": not args.grad_only}

    def jax_worker(label: str, env: dict, **kw) -> common.Worker:
        return common.Worker(label, JaxStep, kind, variant, env=env, **shape, **kw)

    try:
        for t in threads:
            sfx, env = ("", {}) if t == "all" else ("@1t", _env_1t(base))
            workers.append(jax_worker("cdd_jax" + sfx, env))
            if not args.no_peer:
                workers.append(
                    common.Worker(
                        "peer" + sfx, _peer, kind, variant, threads=0 if t == "all" else 1,
                        env=env, **shape,
                    )
                )
        sfx, env = ("", {}) if args.experiment_threads == "all" else ("@1t", _env_1t(base))
        for e in exps:
            if e in FLAG_EXPERIMENTS:
                label, extra = FLAG_EXPERIMENTS[e]
                flags = (env.get("XLA_FLAGS", base) + " " + extra).strip()
                workers.append(jax_worker(label + sfx, {**env, "XLA_FLAGS": flags}))
            if e in ENV_EXPERIMENTS:
                label, extra_env = ENV_EXPERIMENTS[e]
                workers.append(jax_worker(label + sfx, {**env, **extra_env}))
        if "remat" in exps:
            workers.append(jax_worker("cdd_jax+remat" + sfx, env, remat=True))
        if "nodonate" in exps:
            workers.append(jax_worker("cdd_jax-nodonate" + sfx, env, donate=False))
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers


def contender_summary(w: common.Worker, times: dict, flops: float, roofs: dict) -> dict:
    """Step times of one contender with the credited FLOPs against its roofline."""
    wall, cpu = common.summarize(times["step"]), common.summarize(times["step_cpu"])
    one_thread = w.name.endswith("@1t")
    roof = roofs["roofline@1t" if one_thread and "roofline@1t" in roofs else "roofline"]
    info = dict(w.info)
    return {
        "wall": wall,
        "cpu": cpu,
        "times": times,
        "info": info,
        "compile_s": info.get("first_step_s")
        if w.name.startswith("peer")
        else info["trace_s"] + info["compile_s"],
        # The same work is credited to every contender: XLA's count for the cdd_jax step.
        "gflop_per_step": flops / 1e9,
        "gflops_wall": flops / wall["median_s"] / 1e9,
        "gflop_per_cpu_s": flops / cpu["median_s"] / 1e9,
        "roofline_fraction_wall": flops / wall["median_s"] / 1e9 / roof["best_wall"],
        "roofline_fraction_cpu": flops / cpu["median_s"] / 1e9 / roof["best_cpu"],
    }


def run_group(kind: str, variant: str, args, rooflines: list[common.Worker]) -> dict:
    """Builds the contenders of one (kind, variant), times them in alternation, summarises."""
    print(f"== {variant} / {kind}: compiling ({common.uptime()})", flush=True)
    load_start = common.load_average()
    workers = make_workers(kind, variant, args)
    try:
        res = common.interleave(workers + rooflines, args.rounds, args.per_round)
        ema_s = workers[0].call("unfused_ema_s")
    finally:
        for w in workers:
            w.close()
    roofs = {w.name: contenders.roofline_gflops(res["times"][w.name]) for w in rooflines}
    flops, flops_source = credited_flops(workers)
    out = {
        "kind": kind,
        "variant": variant,
        "rooflines": roofs,
        "load_average_start": load_start,
        "load_average_end": common.load_average(),
        "load_per_round": res["load_per_round"],
        "unfused_ema_update_s": ema_s,
        "flops_credited": flops,
        "flops_source": flops_source,
        "contenders": {w.name: contender_summary(w, res["times"][w.name], flops, roofs)
                       for w in workers},
        "peer_ratios": {},
    }
    for sfx in ("", "@1t"):
        mine, peer = out["contenders"].get("cdd_jax" + sfx), out["contenders"].get("peer" + sfx)
        if mine and peer:
            r = {
                "wall": peer["wall"]["median_s"] / mine["wall"]["median_s"],
                "cpu": peer["cpu"]["median_s"] / mine["cpu"]["median_s"],
            }
            out["peer_ratios"]["all_threads" if not sfx else "one_thread"] = r
            print(
                f"   cdd_jax{sfx} / peer{sfx} speed ({variant} {kind}): {r['wall']:.2f}x wall, "
                f"{r['cpu']:.2f}x CPU time",
                flush=True,
            )
    return out


def markdown(payload: dict) -> str:
    m = payload["machine"]
    acc = f"GPU {m['accelerator']}; " if m.get("accelerator") else ""
    a = payload["args"]
    lines = [
        "# Train-step speed: cdd_jax vs PyTorch (diffusers) on the same U-Net shapes",
        "",
        ("**Gradient of the loss only** (online and target passes, one backward; no optimiser, "
         "clipping, EMA or non-finite guard, on either side). " if a.get("grad_only") else "")
        + f"Compute dtype {a.get('dtype', 'float32')}"
        + (f", batch {a['batch_size']}" if a.get("batch_size") else "")
        + (f", {a['crop_size']} px crops" if a.get("crop_size") else "")
        + (" (PyTorch: autocast bf16; cdd_jax: model.dtype bfloat16; float32 parameters)"
           if a.get("dtype") == "bfloat16" else "")
        + ". " + (
            "On the GPU both sides may use TF32 for float32 matmuls/convolutions (XLA's default "
            "precision; the peer sets allow_tf32), the peer uses cuDNN autotuning and "
            "synchronises after each step; the rooflines are JAX matmuls on the GPU. "
            if acc else ""
        ),
        f"Machine: {acc}{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; jax "
        f"{m['versions']['jax']}, torch {m['versions']['torch']}, diffusers "
        f"{m['versions']['diffusers']}. Load average (1/5/15 min) at start "
        f"{payload['load_average_start']}, at end {payload['load_average_end']}. Contenders ran "
        "in separate processes, alternating round by round (A/B/A/B), so load fell on all alike; "
        f"{payload['args']['rounds']} rounds x {payload['args']['per_round']} steps each after "
        "3 warm-up steps; medians. `@1t`: one thread (XLA Eigen pool / OpenMP at 1). "
        "Wall = seconds a user waits; CPU = process CPU seconds per step (all threads), which "
        "other processes' load does not inflate (spin-waiting threads do). GFLOP/step: XLA's "
        "cost analysis of the cdd_jax step (or, where that is lower, as on GPUs whose cuDNN "
        "convolutions XLA does not count, torch's count of the peer's convolutions and "
        "matmuls), credited to every contender (same work). Rooflines: "
        f"{a.get('dtype', 'float32')} matmul 2048^2 / 4096^2 (best) measured in "
        "the same rounds, per wall second "
        "(all threads, or one thread for `@1t`) and per CPU second.",
        "",
    ]
    for g in payload["groups"]:
        lines += group_markdown(g)
    lines += [f"Not run: {v}: {reason}." for v, reason in payload.get("skipped", {}).items()]
    return "\n".join(lines)


GROUP_COLUMNS = ("contender", "compile / 1st step s", "step wall s", "p10-p90 wall", "step CPU s",
                 "GFLOP/s wall", "of roofline", "GFLOP/CPU-s", "of roofline")


def group_markdown(g: dict) -> list[str]:
    """The section of one (kind, variant) group: its table and a line of notes."""
    r1 = g["rooflines"]
    roof_txt = ", ".join(
        f"{k}: {v['best_wall']:.0f} GFLOP/s wall, {v['best_cpu']:.0f} GFLOP/CPU-s"
        for k, v in r1.items()
    )
    lines = [f"## {g['variant']} U-Net, {g['kind']} step", ""]
    rows = [
        [name, c["compile_s"], c["wall"]["median_s"],
         f"{c['wall']['p10_s']:.3g}-{c['wall']['p90_s']:.3g}", c["cpu"]["median_s"],
         c["gflops_wall"], f"{100 * c['roofline_fraction_wall']:.0f}%", c["gflop_per_cpu_s"],
         f"{100 * c['roofline_fraction_cpu']:.0f}%"]
        for name, c in g["contenders"].items()
    ]
    lines.append(common.md_table(GROUP_COLUMNS, rows))
    # The cdd_jax contender of this run: "cdd_jax", or "cdd_jax@1t" under --threads=1 alone.
    ours = g["contenders"].get("cdd_jax") or next(
        c for n, c in g["contenders"].items() if n.startswith("cdd_jax"))
    info = ours["info"]
    extra = [
        f"{ours['gflop_per_step']:.1f} GFLOP/step "
        f"({g.get('flops_source', 'XLA cost analysis')})",
        f"params {info['num_params']:,}" + (f" ({info['num_frozen_params']:,} frozen)"
                                            if info.get("num_frozen_params") else ""),
        f"batch {info['batch_size']} at {info['crop_size']} px"
        + (f", trained on latents {info['sample_shape']} (NHWC)" if g["kind"] == "sd" else ""),
        f"rooflines ({roof_txt})",
    ]
    if g["unfused_ema_update_s"] == g["unfused_ema_update_s"]:  # nan for --grad_only
        extra.append(f"unfused EMA update {1e3 * g['unfused_ema_update_s']:.1f} ms")
    peers = [c for n, c in g["contenders"].items() if n.startswith("peer")]
    if peers:
        p = peers[0]["info"]
        extra.insert(
            2,
            f"peer params {p['num_params']:,}, peer layer FLOPs "
            f"{p['layer_flops_per_step'] / 1e9:.1f} GFLOP/step (torch FlopCounterMode: "
            "matmuls/convs only)",
        )
    for k, r in g["peer_ratios"].items():
        extra.append(
            f"**cdd_jax / peer speed ({k.replace('_', ' ')}): {r['wall']:.2f}x wall, "
            f"{r['cpu']:.2f}x CPU**"
        )
    if info["warnings"]:
        extra.append(f"warnings at compile: {info['warnings']}")
    extra.append(f"load per round {g['load_per_round']}")
    return [*lines, "", "; ".join(extra) + ".", ""]


def main(argv: list[str] | None = None, **defaults) -> None:
    """The command line; `defaults` replace the arguments' defaults (`sd_train_step.py`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="default,large",
                   help=f"From {contenders.VARIANTS} (kind sd: {contenders.SD_VARIANTS}).")
    p.add_argument("--kinds", default="pretrain,codi", help=f"From {contenders.KINDS}.")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per_round", type=int, default=2)
    p.add_argument(
        "--threads",
        default="all,1",
        help="Thread settings compared: 'all' (the framework defaults, all cores) and/or '1'.",
    )
    p.add_argument(
        "--experiments",
        default="cpu1",
        help=f"Comma-separated extra cdd_jax contenders from {EXPERIMENTS} ('' for none).",
    )
    p.add_argument("--experiment_threads", default="1", choices=("all", "1"))
    p.add_argument("--no_peer", action="store_true", help="Skip the PyTorch peer.")
    p.add_argument("--grad_only", action="store_true",
                   help="Time the loss's gradient alone on both sides (online and target passes, "
                        "one backward), not the train step: no optimiser, clipping or EMA.")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="Compute dtype of every contender (bf16 is for accelerators).")
    p.add_argument("--batch_size", type=int, default=0,
                   help="Override the variant's batch size (0: the variant's own).")
    p.add_argument("--crop_size", type=int, default=0,
                   help="Override the training crop size in px (0: the preset's, 32).")
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    p.add_argument("--name", default="train_step", help="Basename of the result files.")
    p.set_defaults(**defaults)
    args = p.parse_args(argv)

    # Several worker processes may share one GPU: JAX must not grab 75% of it in each.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['uptime']}", flush=True)
    rooflines = []
    groups = []
    skipped = {}
    variants = []
    for v in [v for v in args.variants.split(",") if v]:
        if reason := contenders.gpu_only_reason(v, machine["accelerator"]):
            print(f"== {v}: skipped: {reason}", flush=True)
            skipped[v] = reason
        else:
            variants.append(v)
    try:
        for t in [t for t in args.threads.split(",") if t and variants]:
            if t == "all":
                rooflines.append(
                    common.Worker("roofline", contenders.MatmulRoofline, dtype=args.dtype)
                )
            else:
                env = _env_1t(os.environ.get("XLA_FLAGS", ""))
                rooflines.append(common.Worker("roofline@1t", contenders.MatmulRoofline, env=env))
        for variant in variants:
            for kind in [k for k in args.kinds.split(",") if k]:
                groups.append(run_group(kind, variant, args, rooflines))
    finally:
        for w in rooflines:
            w.close()
    end = common.machine_info()
    payload = {
        **common.payload_header("train_step", machine, end),
        "args": vars(args),
        "groups": groups,
        "skipped": skipped,
    }
    codi = [g for g in groups if g["kind"] in ("codi", "sd") and g["peer_ratios"]]
    if codi:
        payload["target"] = {
            "codi_speed_over_peer": {g["variant"]: g["peer_ratios"] for g in codi},
            "required": 1.0,
            "met_all_threads_wall": all(
                g["peer_ratios"].get("all_threads", {}).get("wall", 0) >= 1.0 for g in codi
            ),
            "met_one_thread_cpu": all(
                g["peer_ratios"].get("one_thread", {}).get("cpu", 0) >= 1.0 for g in codi
            ),
        }
    md = markdown(payload)
    print(md)
    common.write_results(args.name, payload, md, args.out_dir)


if __name__ == "__main__":
    main()
