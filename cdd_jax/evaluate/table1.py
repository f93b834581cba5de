"""The paper's Table 1 at small scale, the evaluation side: the rows and the paper's figures,
the `table1` config section, the samplers and step counts evaluated per row, the check of the
paper's claims, and the report (table1.json / .md, quality-versus-NFE plot, image grid).

The rows are trained by `cdd_jax.stages.table1`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from cdd_jax import config_checks as checks
from cdd_jax.distill.sampling import consistency_sample, few_step_sample, solver_sample
from cdd_jax.evaluate.figures import image_grid, plot_quality_vs_nfe
from cdd_jax.evaluate.harness import MethodSpec, bicubic_method, timing_device
from cdd_jax.evaluate.report import write_results
from cdd_jax.parallel.distributed import is_main_process

PyTree = Any

# New rows go last: each row trains and evaluates with its own seeds, but the order is the
# table's and the report's.
ROWS = ("bicubic", "finetune", "cm", "gd", "pe_codi", "codi", "direct_cm")
# The paper's names of the rows (Table 1 of Mei et al., CVPR 2024).
PAPER_NAMES = {
    "bicubic": "bicubic upsampling (not in the paper's table)",
    "finetune": "LDM (fine-tuned conditional model; DDIM, or DPM-Solver++)",
    "cm": "CM-II (consistency distillation of the fine-tuned model)",
    "gd": "GD-II (guided / progressive distillation of the fine-tuned model)",
    "pe_codi": "PE-CoDi (parameter-efficient CoDi)",
    "codi": "CoDi",
    "direct_cm": "Direct CM (Vouitsis et al. 2024; not in the paper's table): CM-II's consistency "
    "function regressed onto the fine-tuned model's many-step ODE solve",
}
# Paper Table 1 (real-world SR x4, DF2K, Real-ESRGAN degradations): LPIPS by (row, sampler, steps).
PAPER_LPIPS = {
    ("finetune", "ddim", 250): 0.2639,
    ("finetune", "ddim", 50): 0.2603,
    ("finetune", "ddim", 4): 0.3014,
    ("finetune", "dpmpp_2m", 4): 0.3073,
    ("gd", "ddim", 4): 0.2796,
    ("cm", "consistency", 4): 0.3172,
    ("pe_codi", "ddim", 4): 0.2941,
    ("codi", "ddim", 4): 0.2656,
}
# The `table1` fields that determine each row's result (the other rows' fields do not).
ROW_FIELDS = {
    "bicubic": (),
    "finetune": ("finetune_ddim_steps", "finetune_dpm_steps"),
    "cm": ("cm_steps",),
    "gd": ("gd_rounds", "gd_student_steps"),
    "pe_codi": ("pe_codi_steps",),
    "codi": ("codi_steps",),
    "direct_cm": ("direct_cm_steps",),
}
def table1_section() -> ml_collections.ConfigDict:
    """Default `table1` config section: which rows, their samplers and step counts."""
    c = ml_collections.ConfigDict()
    c.rows = ROWS  # Rows to produce, in table order (any subset of ROWS).
    c.finetune_ddim_steps = (200, 50, 20, 8, 4)  # DDIM step counts of the fine-tuned model.
    c.finetune_dpm_steps = (4,)  # DPM-Solver++(2M) step counts of the fine-tuned model.
    c.cm_steps = (4,)  # Multistep consistency sampling step counts of CM-II.
    # GD-II: halving rounds; round 1 distils the fine-tuned model's DDIM with
    # gd_student_steps * 2**gd_rounds steps, each later round halves again, down to
    # gd_student_steps. Each round trains train.num_steps // gd_rounds steps.
    c.gd_rounds = 2
    c.gd_student_steps = 4  # Final student step count of GD-II (evaluated with DDIM).
    c.pe_codi_steps = (4,)  # DDIM step counts of the PE-CoDi student.
    c.codi_steps = (1, 2, 4)  # DDIM step counts of the CoDi student.
    # Multistep consistency sampling step counts of the Direct CM student (its teacher ODE solve
    # takes distill.direct_cm.num_teacher_steps DDIM steps of the fine-tuned model).
    c.direct_cm_steps = (4,)
    c.plot_metrics = ("lpips_alex", "psnr")  # Panels of the quality-versus-NFE plot.
    return c


def validate_table1_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad `table1` field (the rest is checked as for "sr")."""
    tab, p = config.table1, "table1."
    checks.check_keys(tab, table1_section(), p)
    checks.subset(tab, "rows", ROWS, prefix=p)
    for name in ("finetune_ddim_steps", "finetune_dpm_steps", "cm_steps", "pe_codi_steps",
                 "codi_steps", "direct_cm_steps", "gd_rounds", "gd_student_steps"):
        checks.positive_ints(tab, name, prefix=p)
    if "gd" in tab.rows and config.train.num_steps < tab.gd_rounds:
        raise ValueError(
            f"train.num_steps {config.train.num_steps} leaves no step for each of "
            f"table1.gd_rounds={tab.gd_rounds} GD rounds")
    missing = [m for m in tab.plot_metrics if m not in config.evaluate.metrics]
    if missing or not tab.plot_metrics:
        raise ValueError(
            f"table1.plot_metrics {tuple(tab.plot_metrics)!r} must be a non-empty "
            f"subset of evaluate.metrics {tuple(config.evaluate.metrics)!r}")


def gd_plan(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """[(teacher steps N, optimiser steps)] of the GD-II rounds; N halves from round to round."""
    tab = config.table1
    total = int(config.train.num_steps)
    per_round = [total // tab.gd_rounds] * tab.gd_rounds
    per_round[-1] += total - sum(per_round)  # the remainder goes to the last round
    return [(tab.gd_student_steps * 2 ** (tab.gd_rounds - r), per_round[r])
            for r in range(tab.gd_rounds)]


def row_methods(
    config: ml_collections.ConfigDict, row: str, params: PyTree, apply_fn, schedule
) -> dict:
    """{key: MethodSpec} of the samplers and step counts evaluated for `row`."""
    tab, grid = config.table1, config.evaluate.grid
    if row == "bicubic":
        return {"bicubic/none/0": bicubic_method()}
    params = jax.device_put(params)
    plan: list[tuple[str, int]] = []
    if row == "finetune":
        plan = [("ddim", k) for k in tab.finetune_ddim_steps]
        plan += [("dpmpp_2m", k) for k in tab.finetune_dpm_steps]
    elif row in ("cm", "direct_cm"):
        plan = [("consistency", k) for k in tab[f"{row}_steps"]]
    elif row == "gd":
        plan = [("ddim", tab.gd_student_steps)]
    elif row in ("pe_codi", "codi"):
        plan = [("ddim", k) for k in tab[f"{row}_steps"]]
    else:
        raise ValueError(f"unknown table1 row {row!r}; valid: {ROWS}")
    methods = {}
    for sampler, k in plan:
        kw = dict(schedule=schedule, num_steps=k, grid=grid,
                  prediction_type=config.diffusion.prediction_type)
        if sampler == "consistency":
            fn = jax.jit(
                lambda p, cond, rng, kw=kw: consistency_sample(
                    apply_fn, p, cond, rng, cm_cfg=config.distill.cm, **kw
                )
            )
        elif row == "finetune":
            fn = jax.jit(
                lambda p, cond, rng, kw=kw, s=sampler: solver_sample(
                    apply_fn, p, cond, rng, sampler=s, **kw
                )
            )
        else:
            fn = jax.jit(lambda p, cond, rng, kw=kw: few_step_sample(apply_fn, p, cond, rng, **kw))
        methods[f"{row}/{sampler}/{k}"] = MethodSpec(
            row, sampler, int(k), lambda cond, lq, rng, fn=fn: fn(params, cond, rng)
        )
    return methods


def _value(rows, method, sampler, steps, metric):
    for r in rows:
        if (r["method"], r["sampler"], r["steps"], r["metric"]) == (method, sampler, steps, metric):
            return r["value"]
    return None


def check_claims(
    rows: list[dict], config: ml_collections.ConfigDict, metric: str = "lpips_alex"
) -> list[str]:
    """The paper's two claims on this run's `metric` (lower is better), one line each, and the
    Direct CM paper's (its samples are worse than CM's) where both rows ran."""
    if not any(r["metric"] == metric for r in rows):
        return [f"(claims not checked: no {metric} in this run)"]
    lines = []
    ref_steps = max(config.table1.finetune_ddim_steps)
    ref = _value(rows, "finetune", "ddim", ref_steps, metric)
    codi = _value(rows, "codi", "ddim", 4, metric)
    if ref is not None and codi is not None:
        rel = codi / ref - 1.0
        lines.append(
            f"CoDi-4 {metric} {codi:.4f} vs fine-tuned DDIM-{ref_steps} {ref:.4f}: "
            f"{100 * rel:+.1f}% ({'within' if rel <= 0.05 else 'NOT within'} 5%; "
            "paper: +0.6% vs 250 steps)"
        )
    if codi is not None:
        others = (
            ("finetune", "ddim"),
            ("finetune", "dpmpp_2m"),
            ("cm", "consistency"),
            ("gd", "ddim"),
            ("pe_codi", "ddim"),
            ("direct_cm", "consistency"),
        )
        for m, s in others:
            v = _value(rows, m, s, 4, metric)
            if v is not None:
                verdict = "better" if codi < v else "NOT better"
                lines.append(f"CoDi-4 vs {m} ({s}) at 4 steps: {codi:.4f} vs {v:.4f} ({verdict})")
    cm = _value(rows, "cm", "consistency", 4, metric)
    direct = _value(rows, "direct_cm", "consistency", 4, metric)
    if cm is not None and direct is not None:
        verdict = "worse" if direct > cm else "NOT worse"
        lines.append(
            f"Direct CM-4 vs CM-II-4: {direct:.4f} vs {cm:.4f} ({verdict}; the Direct CM paper: "
            "lower ODE error but worse samples)"
        )
    return lines or ["(claims not checked: the CoDi-4 or reference rows are missing)"]


_SHORT = {
    ("finetune", "ddim"): "finetune",
    ("finetune", "dpmpp_2m"): "DPM++",
    ("cm", "consistency"): "CM-II",
    ("gd", "ddim"): "GD-II",
    ("pe_codi", "ddim"): "PE-CoDi",
    ("codi", "ddim"): "CoDi",
    ("direct_cm", "consistency"): "Direct CM",
}


def _label(method: str, sampler: str, steps: int) -> str:
    """Short column labels for the grid, e.g. "finetune 200", "DPM++ 4", "CoDi 1"."""
    if sampler == "none":
        return method
    return f"{_SHORT.get((method, sampler), f'{method} {sampler}')} {steps}"


def write_report(
    config: ml_collections.ConfigDict,
    workdir: str,
    rows: list[dict],
    predictions: Mapping[str, np.ndarray],
    eval_set: dict,
) -> dict[str, str]:
    """table1.json / .md, the quality-versus-NFE plot and the image grid; returns their paths."""
    n = min(
        [config.evaluate.num_grid_images, eval_set["image"].shape[0]]
        + [p.shape[0] for p in predictions.values()]
    )
    tab = config.table1
    legend = "\n".join(f"- `{r}`: {PAPER_NAMES[r]}" for r in tab.rows)
    paper = "\n".join(f"| {m} | {s} | {k} | {v} |" for (m, s, k), v in PAPER_LPIPS.items())
    claims = "\n".join(f"- {line}" for line in check_claims(rows, config))
    budget = config.train.num_steps * config.data.batch_size
    gd = ", ".join(f"N={n_t} -> {n_t // 2} ({s} steps)" for n_t, s in gd_plan(config))
    direct = (f"; Direct CM targets: {config.distill.direct_cm.num_teacher_steps} DDIM steps of "
              "the fine-tuned model" if "direct_cm" in tab.rows else "")
    notes = (
        f"Rows:\n{legend}\n\n"
        f"Budget per trained row: {config.train.num_steps} optimiser steps x batch "
        f"{config.data.batch_size} = {budget} crops of {config.data.crop_size} px (GD-II rounds: "
        f"{gd}{direct}). Degradation preset: {config.degradation.preset}; "
        f"{eval_set['image'].shape[0]} held-out crops; sampling grid: {config.evaluate.grid}. "
        f"Timing device: {timing_device()} (each row timed right after its training).\n\n"
        f"The paper's claims on this run:\n{claims}\n\n"
        "Paper Table 1 LPIPS (DF2K, 256 px latents of a large LDM; only the ordering compares):\n\n"
        "| method | sampler | steps | LPIPS |\n|---|---|---|---|\n"
        f"{paper}\n"
    )
    out = {}
    if not is_main_process():
        return out
    out["json"], out["md"] = write_results(
        rows,
        workdir,
        "Table 1 at small scale: 4x real-world super-resolution",
        stem="table1",
        notes=notes,
    )
    metrics = [m for m in tab.plot_metrics if any(r["metric"] == m for r in rows)]
    if metrics:
        out["plot"] = plot_quality_vs_nfe(
            rows,
            os.path.join(workdir, "table1_quality_vs_nfe.png"),
            metrics,
            title="Quality against network evaluations",
        )
    columns = {"LQ input": eval_set["lq"][:n]}
    seen = []
    for r in rows:  # first-seen order of (method, sampler, steps), as in the table
        ident = (r["method"], r["sampler"], r["steps"])
        if ident not in seen:
            seen.append(ident)
    for m, s, k in seen:
        pred = predictions.get(f"{m}/{s}/{k}")
        if pred is not None:
            columns[_label(m, s, k)] = pred[:n]
    columns["ground truth"] = eval_set["image"][:n]
    image_grid(columns, os.path.join(workdir, "table1_grid.png"))
    out["grid"] = os.path.join(workdir, "table1_grid.png")
    return out
