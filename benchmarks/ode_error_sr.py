"""ODE error of CM vs Direct CM on the super-resolution task (issue 20).

Both students distil the fine-tuned conditional model of a Table 1 run (`configs/table1.py`):
CM-II bootstraps its own EMA one teacher step earlier, Direct CM regresses onto the teacher's
M-step ODE solve. The Direct CM paper (Vouitsis et al. 2024) found Direct CM closer to the
teacher's ODE but with worse samples. This measures both on held-out SR crops:

- ODE error: for each t in `--times`, z_t = alpha_t x + sigma_t eps from held-out x and the same
  eps for every model; the distance (RMS over pixels and crops, in [-1, 1] image units) of each
  student's one-step output f_theta(z_t, t) from the fine-tuned teacher's `--ref_steps`-step DDIM
  solve from the same (z_t, t) to t_min. Beside them, as references: the consistency function of
  the fine-tuned model (where both students start), the teacher's 1-step solve (its x_hat), its
  k-step solve on the training grid (CM's closed-form optimum, k = t N), its M-step solve
  (Direct CM's target), and its `--ref_steps // 2`-step solve (how converged the reference is).
- Sample metrics: the existing Table 1 evaluation (`cdd_jax.evaluate.table1.row_methods`) of
  both students with multistep consistency sampling at K = 1, 2, 4, and of the fine-tuned model
  with DDIM at the same K and at `--ref_steps`.

    python benchmarks/ode_error_sr.py --workdir=DIR [--variant=tiny]
    python benchmarks/ode_error_sr.py --workdir=DIR --variant=tiny --train --set=train.num_steps=300

DIR is a Table 1 workdir whose finetune, cm and direct_cm rows finished (with the same variant
and --set overrides); with --train the three rows are first trained there (or reused) by the
Table 1 driver. Writes benchmarks/results/ode_error_sr_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cdd_jax.config import presets  # noqa: E402
from cdd_jax.config.validate import validate_config  # noqa: E402
from cdd_jax.diffusion import add_noise, get_schedule  # noqa: E402
from cdd_jax.distill.baselines import consistency_fn  # noqa: E402
from cdd_jax.distill.codi import as_model_fn  # noqa: E402
from cdd_jax.distill.direct_cm import teacher_ode_solve  # noqa: E402
from cdd_jax.evaluate.harness import evaluate_methods  # noqa: E402
from cdd_jax.evaluate.metrics import MetricSuite  # noqa: E402
from cdd_jax.evaluate.table1 import row_methods  # noqa: E402
from cdd_jax.stages.distill import conditional_model  # noqa: E402
from cdd_jax.stages.sr import make_sr_eval_set  # noqa: E402
from cdd_jax.stages.table1 import finished_params, run_table1  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROWS = ("finetune", "cm", "direct_cm")
STUDENTS = ("cm", "direct_cm")
STEPS_K = (1, 2, 4)


def make_config(variant: str, overrides: list[str]):
    """The Table 1 preset with only the three rows, one seed (the first of `table1.seeds`; set
    another with --set=table1.seeds=S), K = 1, 2, 4, and `key=value` overrides."""
    config = presets.table1_config(variant)
    config.table1.rows = ROWS
    config.table1.seeds = config.table1.seeds[:1]
    config.table1.cm_steps = config.table1.direct_cm_steps = STEPS_K
    for item in overrides:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        section = config
        for p in path:
            section = section[p]
        kind = type(section[last])
        if kind is tuple:  # e.g. table1.finetune_ddim_steps=200,4
            section[last] = tuple(type(section[last][0])(v) for v in value.split(","))
        else:
            section[last] = value in ("1", "true", "True") if kind is bool else kind(value)
    config.seed = config.table1.seeds[0]  # as the Table 1 driver runs that seed's rows
    validate_config(config)
    return config


def load_rows(config, workdir: str) -> dict:
    """{row: EMA params} of the finished finetune, cm and direct_cm rows of the first seed of
    `config.table1.seeds` in `workdir` (DIR/seed<S>/<row>)."""
    params = {}
    seed_dir = os.path.join(workdir, f"seed{config.table1.seeds[0]}")
    for row in ROWS:
        p = finished_params(os.path.join(seed_dir, row), config.train.num_steps)
        if p is None:
            raise FileNotFoundError(
                f"no finished {row} run of {config.train.num_steps} steps in {seed_dir}/{row} "
                "(run the Table 1 job there first, or pass --train)")
        params[row] = p
    return params


# Keys of the ODE-error table besides the students: the teacher's own solves from (z_t, t).
REFERENCES = {
    "finetune_f": "the consistency function f of the fine-tuned model (both students' start)",
    "teacher_1_step": "the fine-tuned teacher's 1-step DDIM (its x_hat)",
    "teacher_grid": "its k-step DDIM on the grid, k = t N (CM's closed-form optimum)",
    "teacher_direct_target": "its M-step DDIM (Direct CM's target)",
    "teacher_half_ref": "its (ref_steps / 2)-step DDIM (how converged the reference is)",
}


def ode_errors(config, params: dict, eval_set: dict, *, times, ref_steps: int, seed: int):
    """{t: {name: RMS distance from the fine-tuned teacher's ref_steps-step solve}} for the
    students and REFERENCES, from the same z_t (held-out x, one eps per crop and t)."""
    _, apply_fn = conditional_model(config)
    schedule = get_schedule(config.diffusion.schedule)
    dcfg = config.distill
    t_min = dcfg.cm.eps_t_min

    @functools.partial(jax.jit, static_argnums=4)  # one compilation per number of steps
    def solve(finetuned, z_t, t, cond, num_steps):
        teacher = as_model_fn(apply_fn, finetuned, cond, z_t.shape[0])
        return teacher_ode_solve(teacher, z_t, t, t_min, num_steps, schedule)

    @jax.jit
    def student(p, z_t, t, cond):
        return consistency_fn(apply_fn, p, z_t, t, cond, None, schedule=schedule, cm_cfg=dcfg.cm)

    out, bs = {}, config.evaluate.batch_size
    n = eval_set["image"].shape[0]
    for i, t_scalar in enumerate(times):
        k_grid = max(1, round((t_scalar - t_min) / (1.0 - t_min) * dcfg.num_grid_steps))
        steps = {"teacher_1_step": 1, "teacher_grid": k_grid,
                 "teacher_direct_target": dcfg.direct_cm.num_teacher_steps,
                 "teacher_half_ref": ref_steps // 2}
        sums: dict[str, float] = {}
        for start in range(0, n, bs):
            x = jnp.asarray(eval_set["image"][start:start + bs])
            cond = jnp.asarray(eval_set["cond"][start:start + bs])
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), start)
            t = jnp.full((x.shape[0],), t_scalar, jnp.float32)
            alpha, sigma = schedule.alpha_sigma(t)
            z_t = add_noise(x, jax.random.normal(rng, x.shape, jnp.float32), alpha, sigma)
            ref = solve(params["finetune"], z_t, t, cond, ref_steps)
            outs = {name: student(params[name], z_t, t, cond) for name in STUDENTS}
            outs["finetune_f"] = student(params["finetune"], z_t, t, cond)
            outs.update({k: solve(params["finetune"], z_t, t, cond, m) for k, m in steps.items()})
            for k, v in outs.items():
                sums[k] = sums.get(k, 0.0) + float(jnp.sum(jnp.mean((v - ref) ** 2, (1, 2, 3))))
        out[t_scalar] = {k: float(np.sqrt(v / n)) for k, v in sums.items()}
        print(f"  t = {t_scalar}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[t_scalar].items()),
              flush=True)
    return out


def sample_metrics(config, params: dict, eval_set: dict, *, ref_steps: int, lpips: bool):
    """Rows of the Table 1 evaluation: both students (consistency sampling, K = 1, 2, 4) and
    the fine-tuned model (DDIM at K = 1, 2, 4 and ref_steps)."""
    _, apply_fn = conditional_model(config)
    schedule = get_schedule(config.diffusion.schedule)
    cfg = config.copy_and_resolve_references()
    cfg.table1.finetune_ddim_steps, cfg.table1.finetune_dpm_steps = STEPS_K + (ref_steps,), ()
    methods = {}
    for row in ROWS:
        methods.update(row_methods(cfg, row, params[row], apply_fn, schedule))
    metrics = tuple(config.evaluate.metrics) + (("lpips_alex",) if lpips else ())
    results = evaluate_methods(methods, eval_set, MetricSuite(tuple(dict.fromkeys(metrics))),
                               batch_size=config.evaluate.batch_size, rng_seed=config.seed,
                               keep_predictions=0)
    return [{k: r[k] for k in ("method", "sampler", "steps", "metric", "value", "stderr")}
            for r in results]


def markdown(result: dict) -> str:
    """The ODE-error table (one row per model, one column per t) and the sample-metric table."""
    times = list(result["ode_error"])
    names = list(result["ode_error"][times[0]])
    lines = [f"**ODE error**: RMS distance (pixels in [-1, 1]) from the fine-tuned teacher's "
             f"{result['ref_steps']}-step DDIM solve from the same (z_t, t) to t_min, "
             f"{result['n_images']} held-out crops", "",
             "| model | " + " | ".join(f"t = {t}" for t in times) + " |",
             "|---|" + "---|" * len(times)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{result['ode_error'][t][name]:.4f}" for t in times) + " |")
    lines += [""] + [f"- `{k}`: {v}" for k, v in REFERENCES.items()]
    metrics = list(dict.fromkeys(r["metric"] for r in result["samples"]))
    lines += ["", "**Samples** (mean +- standard error over the crops)", "",
              "| model | sampler | K | " + " | ".join(metrics) + " |",
              "|---|---|---|" + "---|" * len(metrics)]
    table = {(r["method"], r["sampler"], r["steps"], r["metric"]): r for r in result["samples"]}
    for ident in dict.fromkeys((r["method"], r["sampler"], r["steps"])
                               for r in result["samples"]):
        cells = [table.get((*ident, m)) for m in metrics]
        lines.append("| " + " | ".join(str(x) for x in ident) + " | " + " | ".join(
            "" if c is None else f"{c['value']:.4g} +- {c['stderr']:.2g}" for c in cells) + " |")
    lines += ["", f"workdir {result['workdir']}, variant {result['variant']}, overrides "
              f"{result['overrides']}; {result['train_steps']} training steps per row; Direct CM "
              f"M = {result['direct_cm_teacher_steps']}, grid N = {result['num_grid_steps']}; "
              f"wall {result['wall_s']} s"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a Table 1 workdir")
    ap.add_argument("--variant", default="default", help="of configs/table1.py")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--train", action="store_true", help="train the three rows first")
    ap.add_argument("--times", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--ref_steps", type=int, default=200)
    ap.add_argument("--lpips", action="store_true", help="add LPIPS (crops of 32 px or more)")
    ap.add_argument("--name", default=None, help="results file suffix (default: the variant)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    t0 = time.time()
    config = make_config(args.variant, args.set)
    if args.train:
        run_table1(config, args.workdir)
    params = load_rows(config, args.workdir)
    eval_set = make_sr_eval_set(config)
    times = [float(t) for t in args.times.split(",")]
    result = {
        "workdir": args.workdir, "variant": args.variant, "overrides": args.set,
        "train_steps": int(config.train.num_steps), "ref_steps": args.ref_steps,
        "num_grid_steps": int(config.distill.num_grid_steps),
        "direct_cm_teacher_steps": int(config.distill.direct_cm.num_teacher_steps),
        "n_images": int(eval_set["image"].shape[0]), "references": REFERENCES,
        "ode_error": ode_errors(config, params, eval_set, times=times, ref_steps=args.ref_steps,
                                seed=config.seed),
        "samples": sample_metrics(config, params, eval_set, ref_steps=args.ref_steps,
                                  lpips=args.lpips),
    }
    result["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ode_error_sr_{args.name or args.variant}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
