"""Train-step speed: the pretraining step and the CoDi step, cdd_jax vs a PyTorch peer.

For each model variant ("default": the preset U-Net, ch 32, ch_mult (1, 2, 2), 1 res block,
attention at 8 px, 32 px crops, batch 32; "large": ch 64, 2 res blocks, attention at 16 px,
32 groups, batch 16) and each step kind ("pretrain": v-prediction diffusion loss; "codi": the
CoDi loss, two forward passes of the conditional network and one backward), it builds the step
the way `cdd_jax.train.loop.train` does (jax.jit with in/out shardings, donated state, compiled
ahead of time; `common.build_train_step`) on a real batch of the pipeline and reports:
trace + compile seconds, the step time (median of the timed steps after warm-up, each blocked
with block_until_ready), FLOPs per step from `compiled.cost_analysis()`, achieved FLOP/s, and
the ratio to an f32 matmul roofline (2048^2 and 4096^2, best of the two) measured in the same run.

Contenders run in separate worker processes and are timed in alternation (A/B/A/B, see
`common.interleave`), so the load of a shared machine falls on all of them alike:
  cdd_jax        the real step
  peer           the same shapes in PyTorch (`peer_torch.py`: diffusers UNet2DModel, or
                 UNet2DConditionModel + ControlNetModel for CoDi), eager mode
  cdd_jax+xnn    with XLA_FLAGS += --xla_cpu_experimental_xnn_graph_fusion_mode=..._GREEDY
  cdd_jax+remat  with model.remat = True (rematerialised residual blocks)
  cdd_jax-nodonate  without donate_argnums (what donation saves)
The cdd_jax worker also times the EMA update as a separate jitted call, i.e. what the step
would cost if the EMA were not fused into it.

    python benchmarks/train_step.py [--variants=default,large] [--kinds=pretrain,codi]
        [--rounds=6] [--per_round=2] [--experiments=xnn,remat,nodonate] [--no_peer]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

EXPERIMENTS = ("xnn", "remat", "nodonate")


class JaxStep(common.TrainStepBench):
    """The cdd_jax step in a worker, plus the cost of an unfused EMA update."""

    def unfused_ema_s(self, n: int = 10) -> float:
        """Median seconds of one EMA update of the parameters as its own jitted call."""
        import jax

        from cdd_jax.distill.ema import ema_update

        f = jax.jit(ema_update)
        s = self.built.state
        jax.block_until_ready(f(s.ema_params, s.params, 0.999))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(f(s.ema_params, s.params, 0.999))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


def _peer(kind: str, variant: str, warmup: int = 3):
    from benchmarks.peer_torch import PeerTrainStep

    return PeerTrainStep(kind, variant, warmup)


def run_group(kind: str, variant: str, args, roofline: common.Worker) -> dict:
    """Builds the contenders of one (kind, variant), times them in alternation, summarises."""
    print(f"== {variant} / {kind}: compiling ({common.uptime()})", flush=True)
    load_start = common.load_average()
    workers = [common.Worker("cdd_jax", JaxStep, kind, variant)]
    try:
        if not args.no_peer:
            workers.append(common.Worker("peer", _peer, kind, variant))
        exps = [e for e in args.experiments.split(",") if e]
        for e in exps:
            if e not in EXPERIMENTS:
                raise ValueError(f"unknown experiment {e!r}; valid: {EXPERIMENTS}")
        if "xnn" in exps:
            flags = (os.environ.get("XLA_FLAGS", "") + " " + common.XNN_GREEDY).strip()
            workers.append(
                common.Worker("cdd_jax+xnn", JaxStep, kind, variant, env={"XLA_FLAGS": flags})
            )
        if "remat" in exps:
            workers.append(common.Worker("cdd_jax+remat", JaxStep, kind, variant, remat=True))
        if "nodonate" in exps:
            workers.append(common.Worker("cdd_jax-nodonate", JaxStep, kind, variant, donate=False))
        res = common.interleave(workers + [roofline], args.rounds, args.per_round)
        ema_s = workers[0].call("unfused_ema_s")
    finally:
        for w in workers:
            w.close()
    roof = common.roofline_gflops(res["times"]["roofline"])
    flops = workers[0].info["flops_per_step"]
    out = {
        "kind": kind,
        "variant": variant,
        "roofline_gflops": roof,
        "load_average_start": load_start,
        "load_average_end": common.load_average(),
        "load_per_round": res["load_per_round"],
        "unfused_ema_update_s": ema_s,
        "contenders": {},
    }
    for w in workers:
        ts = res["times"][w.name]["step"]
        s = common.summarize(ts)
        med = s["median_s"]
        info = dict(w.info)
        c = {
            "step": s,
            "times": ts,
            "info": info,
            "compile_s": info.get("trace_s", 0.0) + info.get("compile_s", 0.0)
            if w.name != "peer"
            else info.get("first_step_s"),
            # The same work for every contender: XLA's count for the cdd_jax step.
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / med / 1e9,
            "roofline_fraction": flops / med / 1e9 / roof["best"],
        }
        out["contenders"][w.name] = c
    base = out["contenders"]["cdd_jax"]["step"]["median_s"]
    for c in out["contenders"].values():
        c["speed_vs_cdd_jax"] = base / c["step"]["median_s"]
    if "peer" in out["contenders"]:
        peer = out["contenders"]["peer"]["step"]["median_s"]
        out["cdd_jax_speed_over_peer"] = peer / base
        print(
            f"   cdd_jax / peer speed ({variant} {kind}): {peer / base:.2f}x "
            f"(step {base:.3f} s vs {peer:.3f} s)",
            flush=True,
        )
    return out


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# Train-step speed: cdd_jax vs PyTorch (diffusers) on the same U-Net shapes",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; jax "
        f"{m['versions']['jax']}, torch {m['versions']['torch']}, diffusers "
        f"{m['versions']['diffusers']}. Load average (1/5/15 min) at start "
        f"{payload['load_average_start']}, at end {payload['load_average_end']}: contenders "
        "ran in separate processes, alternating round by round, so load fell on all alike. "
        f"{payload['args']['rounds']} rounds x {payload['args']['per_round']} steps each after "
        "3 warm-up steps; median step time. GFLOP/step from XLA's cost analysis of the cdd_jax "
        "step (the same work is credited to every contender). Roofline: best f32 matmul "
        "(2048^2 / 4096^2) measured in the same rounds.",
        "",
    ]
    for g in payload["groups"]:
        lines += [f"## {g['variant']} U-Net, {g['kind']} step", ""]
        rows = []
        for name, c in g["contenders"].items():
            rows.append(
                [
                    name,
                    c["compile_s"],
                    c["step"]["median_s"],
                    f"{c['step']['p10_s']:.3f}-{c['step']['p90_s']:.3f}",
                    c["gflop_per_step"],
                    c["achieved_gflops"],
                    f"{100 * c['roofline_fraction']:.0f}%",
                    c["speed_vs_cdd_jax"],
                ]
            )
        lines.append(
            common.md_table(
                [
                    "contender",
                    "compile / first step s",
                    "step s (median)",
                    "p10-p90 s",
                    "GFLOP/step",
                    "GFLOP/s",
                    "of roofline",
                    "speed vs cdd_jax",
                ],
                rows,
            )
        )
        info = g["contenders"]["cdd_jax"]["info"]
        extra = [
            f"params {info['num_params']:,}",
            f"batch {info['batch_size']}",
            f"roofline {g['roofline_gflops']['best']:.0f} GFLOP/s",
            f"unfused EMA update {1e3 * g['unfused_ema_update_s']:.1f} ms",
            f"load per round {g['load_per_round']}",
        ]
        if "peer" in g["contenders"]:
            p = g["contenders"]["peer"]["info"]
            extra.insert(
                1,
                f"peer params {p['num_params']:,}, peer layer FLOPs "
                f"{p['layer_flops_per_step'] / 1e9:.1f} GFLOP/step (torch counter)",
            )
            extra.append(f"**cdd_jax / peer speed: {g['cdd_jax_speed_over_peer']:.2f}x**")
        if info["warnings"]:
            extra.append(f"warnings at compile: {info['warnings']}")
        lines += ["", "; ".join(extra) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="default,large")
    p.add_argument("--kinds", default="pretrain,codi")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per_round", type=int, default=2)
    p.add_argument(
        "--experiments",
        default="xnn,remat",
        help=f"Comma-separated extra contenders from {EXPERIMENTS} ('' for none).",
    )
    p.add_argument("--no_peer", action="store_true", help="Skip the PyTorch peer.")
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    p.add_argument("--name", default="train_step", help="Basename of the result files.")
    args = p.parse_args()

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['uptime']}", flush=True)
    roofline = common.Worker("roofline", common.MatmulRoofline)
    groups = []
    try:
        for variant in [v for v in args.variants.split(",") if v]:
            for kind in [k for k in args.kinds.split(",") if k]:
                groups.append(run_group(kind, variant, args, roofline))
    finally:
        roofline.close()
    end = common.machine_info()
    payload = {
        "benchmark": "train_step",
        "machine": machine,
        "uptime_end": end["uptime"],
        "load_average_start": machine["load_average"],
        "load_average_end": end["load_average"],
        "args": vars(args),
        "groups": groups,
    }
    codi = [g for g in groups if g["kind"] == "codi" and "cdd_jax_speed_over_peer" in g]
    if codi:
        payload["target"] = {
            "codi_speed_over_peer": {g["variant"]: g["cdd_jax_speed_over_peer"] for g in codi},
            "required": 1.0,
            "met": all(g["cdd_jax_speed_over_peer"] >= 1.0 for g in codi),
        }
    md = markdown(payload)
    print(md)
    common.write_results(args.name, payload, md, args.out_dir)


if __name__ == "__main__":
    main()
