"""The paper's Table 1 at small scale, the evaluation side: the rows and the paper's figures,
the `table1` config section, the samplers and step counts evaluated per row, the check of the
paper's claims, and the report (table1.json / .md, quality-versus-NFE plot, image grid).

The rows are trained by `cdd_jax.stages.table1`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from cdd_jax import config_checks as checks
from cdd_jax.distill.sampling import consistency_sample, few_step_sample, solver_sample
from cdd_jax.evaluate.figures import image_grid, plot_quality_vs_nfe
from cdd_jax.evaluate.harness import MethodSpec, bicubic_method, timing_device
from cdd_jax.evaluate.report import write_results
from cdd_jax.evaluate.seeds import INTERVAL_TEXT, Difference, paired_difference
from cdd_jax.parallel.distributed import is_main_process

PyTree = Any

# New rows go last: each row trains and evaluates with its own seeds, but the order is the
# table's and the report's.
ROWS = ("bicubic", "finetune", "cm", "gd", "pe_codi", "codi", "direct_cm")
# The rows' names in the paper's terms (Table 1 of Mei et al., CVPR 2024).
PAPER_NAMES = {
    "bicubic": "bicubic upsampling (not in the paper's table)",
    "finetune": "LDM-SR (the fine-tuned conditional model; DDIM, or DPM-Solver++)",
    "cm": "CM (the paper's 'conditional finetuning-first': consistency distillation of the "
    "fine-tuned model)",
    "gd": "GD (guided / progressive distillation; `table1.gd_order` says which model is distilled)",
    "pe_codi": "PE-CoDi (parameter-efficient CoDi: only the adapter trains)",
    "codi": "CoDi",
    "direct_cm": "Direct CM (Vouitsis et al. 2024; not in the paper's table): CM's consistency "
    "function regressed onto the fine-tuned model's many-step ODE solve",
}
GD_ORDERS = {
    "distillation_first": "the paper's order: the unconditional teacher is progressively "
    "distilled to few steps, then the few-step student is made conditional (the conditional "
    "network built from it, trained with the diffusion loss)",
    "finetune_first": "the fine-tuned conditional model is progressively distilled to few steps",
}


class PaperRow(NamedTuple):
    """One row of the paper's Table 1 (real-world SR x4, Real-ESRGAN degradations)."""

    method: str  # as the paper names it
    params: str
    steps: int
    fid: float
    lpips: float
    ours: tuple[str, str, int] | None  # this table's (row, sampler, steps), if it has one


# The paper's Table 1, as printed in its text (../shared/specs/codi.md section 7): the only place
# this package holds the paper's numbers.
PAPER_TABLE1: tuple[PaperRow, ...] = (
    PaperRow("Real-ESRGAN", "16.6M", 1, 37.64, 0.3112, None),
    PaperRow("StableSR", "865M", 200, 24.44, 0.3114, None),
    PaperRow("LDM-SR (fine-tuned conditional)", "1.22B", 4, 30.99, 0.3070, ("finetune", "ddim", 4)),
    PaperRow("DPM-Solver", "1.22B", 4, 30.12, 0.3077, None),
    PaperRow("DPM-Solver++", "1.22B", 4, 30.03, 0.3073, ("finetune", "dpmpp_2m", 4)),
    PaperRow("CM (conditional fine-tuning first, then consistency distillation)", "1.22B", 4,
             30.63, 0.3066, ("cm", "consistency", 4)),
    PaperRow("GD (guided distillation, distillation first)", "1.22B", 4, 27.81, 0.3172,
             ("gd", "ddim", 4)),
    PaperRow("PE-CoDi (only the adapter trains)", "364M", 4, 25.21, 0.2941, ("pe_codi", "ddim", 4)),
    PaperRow("CoDi", "1.22B", 4, 19.64, 0.2656, ("codi", "ddim", 4)),
    PaperRow("LDM-SR", "1.22B", 200, 18.63, 0.2551, ("finetune", "ddim", 200)),
)
# Paper LPIPS by this table's (row, sampler, steps).
PAPER_LPIPS = {r.ours: r.lpips for r in PAPER_TABLE1 if r.ours is not None}
# "Close to the many-step model": CoDi-4's LPIPS at most this much above the fine-tuned model's
# at its most steps (the paper: +4.1% against LDM-SR at 200 steps).
CLOSE_TOLERANCE = 0.05
# The `table1` fields that determine each row's result (the other rows' fields do not).
ROW_FIELDS = {
    "bicubic": (),
    "finetune": ("finetune_ddim_steps", "finetune_dpm_steps"),
    "cm": ("cm_steps",),
    "gd": ("gd_rounds", "gd_student_steps", "gd_order"),
    "pe_codi": ("pe_codi_steps",),
    "codi": ("codi_steps",),
    "direct_cm": ("direct_cm_steps",),
}


def table1_section() -> ml_collections.ConfigDict:
    """Default `table1` config section: which rows, seeds, their samplers and step counts."""
    c = ml_collections.ConfigDict()
    c.rows = ROWS  # Rows to produce, in table order (any subset of ROWS).
    # Training seeds: every trained row is trained and evaluated once per seed (the seed of its
    # initialisation, data order, noise and evaluation noise: it replaces the top-level `seed`,
    # which the table does not read), with the same budget each; the report gives seed means with
    # their 95% t-intervals. A finished seed is reused, so more seeds can be added later.
    c.seeds = (0, 1, 2)
    c.finetune_ddim_steps = (200, 50, 20, 8, 4)  # DDIM step counts of the fine-tuned model.
    c.finetune_dpm_steps = (4,)  # DPM-Solver++(2M) step counts of the fine-tuned model.
    c.cm_steps = (4,)  # Multistep consistency sampling step counts of CM.
    # GD: halving rounds; round 1 distils a DDIM with gd_student_steps * 2**gd_rounds steps,
    # each later round halves again, down to gd_student_steps; the student of each round is the
    # next round's teacher (and starts from it).
    c.gd_rounds = 2
    c.gd_student_steps = 4  # Final student step count of GD (evaluated with DDIM).
    # Which model GD distils (GD_ORDERS): "distillation_first" (the paper's: the unconditional
    # teacher, then the few-step student is made conditional; the budget is split evenly over
    # the gd_rounds rounds and that conditional phase) or "finetune_first" (the fine-tuned
    # conditional model; the budget split evenly over the rounds).
    c.gd_order = "distillation_first"
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
    seeds = tuple(tab.seeds)
    if (not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise ValueError(f"table1.seeds must be distinct non-negative ints, got {seeds!r}")
    checks.choice(tab, "gd_order", tuple(GD_ORDERS), prefix=p)
    phases = len(gd_plan(config))
    if "gd" in tab.rows and config.train.num_steps < phases:
        raise ValueError(
            f"train.num_steps {config.train.num_steps} leaves no step for each of the "
            f"{phases} GD phases (table1.gd_rounds={tab.gd_rounds}, gd_order={tab.gd_order!r})")
    missing = [m for m in tab.plot_metrics if m not in config.evaluate.metrics]
    if missing or not tab.plot_metrics:
        raise ValueError(
            f"table1.plot_metrics {tuple(tab.plot_metrics)!r} must be a non-empty "
            f"subset of evaluate.metrics {tuple(config.evaluate.metrics)!r}")


class GDPhase(NamedTuple):
    """One training run of the GD row."""

    name: str  # its run directory under the row's
    conditional: bool  # the conditional network (else the unconditional U-Net)
    objective: str  # "gd" (a halving round) or "finetune" (making the student conditional)
    teacher_steps: int | None  # N of a halving round: the teacher's DDIM steps (student: N / 2)
    num_steps: int  # optimiser steps


def gd_plan(config: ml_collections.ConfigDict) -> list[GDPhase]:
    """The GD row's training runs in order, `table1.gd_order` deciding which model is distilled:

    finetune_first:      round r (r = 1..R) distils the fine-tuned model (round 1) or the
                         previous round's student, N = gd_student_steps * 2**(R - r + 1);
    distillation_first:  the same R rounds on the unconditional U-Net, starting from the
                         teacher; then "conditional": the conditional network built from the last
                         student, trained with the diffusion loss.
    The row's budget (`train.num_steps`) is split evenly over the runs, the remainder to the last.
    """
    tab = config.table1
    first = tab.gd_order == "distillation_first"
    n_runs = tab.gd_rounds + (1 if first else 0)
    total = int(config.train.num_steps)
    steps = [total // n_runs] * n_runs
    steps[-1] += total - sum(steps)
    plan = []
    for r in range(tab.gd_rounds):
        n_teacher = tab.gd_student_steps * 2 ** (tab.gd_rounds - r)
        name = f"{'uncond_' if first else ''}round{r + 1}_N{n_teacher}"
        plan.append(GDPhase(name, not first, "gd", n_teacher, steps[r]))
    if first:
        plan.append(GDPhase("conditional", True, "finetune", None, steps[-1]))
    return plan


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


# Metrics where higher is better (the others, LPIPS and the MSEs, lower is better).
HIGHER_IS_BETTER = ("psnr", "ssim", "lr_psnr")
# The 4-step rows CoDi-4 is compared with, and their names in the claim lines.
_CODI_VERSUS = (
    ("finetune", "ddim", "LDM-SR (fine-tuned, DDIM)"),
    ("finetune", "dpmpp_2m", "DPM-Solver++"),
    ("cm", "consistency", "CM"),
    ("gd", "ddim", "GD"),
    ("pe_codi", "ddim", "PE-CoDi"),
    ("direct_cm", "consistency", "Direct CM"),
)


def _find(rows, method, sampler, steps, metric) -> dict | None:
    for r in rows:
        if (r["method"], r["sampler"], r["steps"], r["metric"]) == (method, sampler, steps, metric):
            return r
    return None


def _order_verdict(diff: Difference, name_a: str, name_b: str, higher_better: bool) -> str:
    """Which of a, b is better by the interval of a - b, or that the interval does not say."""
    if diff.n_seeds < 2:
        return "not resolved (one seed: no interval)"
    if not diff.resolved:
        return "not resolved at this budget (the interval includes 0)"
    a_better = (diff.lo > 0) == higher_better
    return f"{name_a if a_better else name_b} better"


def _paper_order(a: tuple, b: tuple, name_a: str, name_b: str) -> str:
    pa, pb = PAPER_LPIPS.get(a), PAPER_LPIPS.get(b)
    if pa is None or pb is None:
        return "not in the paper's table"
    return f"paper LPIPS {pa:.4f} vs {pb:.4f}, {name_a if pa < pb else name_b} better"


def check_claims(
    rows: list[dict], config: ml_collections.ConfigDict, metric: str = "lpips_alex"
) -> list[str]:
    """The paper's claims on this run's seed means of `metric`, one line each: CoDi-4 close to
    the fine-tuned model at its most DDIM steps (within CLOSE_TOLERANCE), CoDi-4 against every
    other 4-step row, and the Direct CM paper's (its samples are worse than CM's).

    `rows` are aggregated over seeds (`aggregate_seeds`). Each difference is the mean of the
    per-seed differences with its 95% t-interval over seeds (paired by seed); a difference whose
    interval includes 0 (or the tolerance) is reported as not resolved, not as a winner.
    """
    if not any(r["metric"] == metric for r in rows):
        return [f"(claims not checked: no {metric} in this run)"]
    higher = metric in HIGHER_IS_BETTER
    lines = []
    ref_steps = max(config.table1.finetune_ddim_steps)
    ref = _find(rows, "finetune", "ddim", ref_steps, metric)
    codi = _find(rows, "codi", "ddim", 4, metric)
    if ref is not None and codi is not None:
        rel = paired_difference(codi, ref, relative=True)
        tol = CLOSE_TOLERANCE
        if rel.n_seeds < 2:
            verdict = "not resolved (one seed: no interval)"
        elif rel.hi <= tol:
            verdict = f"within {tol:+.0%}"
        elif rel.lo > tol:
            verdict = f"NOT within {tol:+.0%}"
        else:
            verdict = f"not resolved at this budget (the interval includes {tol:+.0%})"
        p_codi, p_ref = PAPER_LPIPS[("codi", "ddim", 4)], PAPER_LPIPS[("finetune", "ddim", 200)]
        lines.append(
            f"CoDi-4 {metric} {codi['value']:.4f} vs fine-tuned DDIM-{ref_steps} "
            f"{ref['value']:.4f}: {rel.text('+.1f', 100.0, '%')}: {verdict} (paper: CoDi-4 "
            f"{p_codi:.4f} vs LDM-SR-200 {p_ref:.4f}, {p_codi / p_ref - 1:+.1%})"
        )
    if codi is not None:
        for m, smp, name in _CODI_VERSUS:
            other = _find(rows, m, smp, 4, metric)
            if other is None:
                continue
            d = paired_difference(codi, other)
            if d is None:
                continue
            lines.append(
                f"CoDi-4 vs {name}-4: {codi['value']:.4f} vs {other['value']:.4f}, difference "
                f"{d.text()}: {_order_verdict(d, 'CoDi', name, higher)} "
                f"({_paper_order(('codi', 'ddim', 4), (m, smp, 4), 'CoDi', name)})"
            )
    cm = _find(rows, "cm", "consistency", 4, metric)
    direct = _find(rows, "direct_cm", "consistency", 4, metric)
    if cm is not None and direct is not None:
        d = paired_difference(direct, cm)
        if d is not None:
            lines.append(
                f"Direct CM-4 vs CM-4: {direct['value']:.4f} vs {cm['value']:.4f}, difference "
                f"{d.text()}: {_order_verdict(d, 'Direct CM', 'CM', higher)} (the Direct CM "
                "paper: lower ODE error but worse samples than CM)"
            )
    return lines or ["(claims not checked: the CoDi-4 or reference rows are missing)"]


_SHORT = {
    ("finetune", "ddim"): "finetune",
    ("finetune", "dpmpp_2m"): "DPM++",
    ("cm", "consistency"): "CM",
    ("gd", "ddim"): "GD",
    ("pe_codi", "ddim"): "PE-CoDi",
    ("codi", "ddim"): "CoDi",
    ("direct_cm", "consistency"): "Direct CM",
}


def _label(method: str, sampler: str, steps: int) -> str:
    """Short column labels for the grid, e.g. "finetune 200", "DPM++ 4", "CoDi 1"."""
    if sampler == "none":
        return method
    return f"{_SHORT.get((method, sampler), f'{method} {sampler}')} {steps}"


def paper_table_markdown() -> str:
    """The paper's Table 1 (PAPER_TABLE1) as a markdown table, with this table's row for each."""
    lines = ["| method (paper) | params | steps | FID | LPIPS | this table's row |",
             "|---|---|---|---|---|---|"]
    for r in PAPER_TABLE1:
        ours = "—" if r.ours is None else " / ".join(str(x) for x in r.ours)
        lines.append(f"| {r.method} | {r.params} | {r.steps} | {r.fid:.2f} | {r.lpips:.4f} | "
                     f"{ours} |")
    return "\n".join(lines)


def _phase_text(ph: GDPhase) -> str:
    n = "" if ph.teacher_steps is None else f"N={ph.teacher_steps} -> {ph.teacher_steps // 2}, "
    kind = "conditional" if ph.conditional else "unconditional"
    return f"{ph.name} ({n}{kind} {ph.objective}, {ph.num_steps} steps)"


def report_notes(config: ml_collections.ConfigDict, rows: list[dict], eval_set: dict) -> str:
    """The markdown notes under the table: rows, seeds and budget, claims, the paper's table."""
    tab = config.table1
    legend = "\n".join(f"- `{r}`: {PAPER_NAMES[r]}" for r in tab.rows)
    claims = "\n".join(f"- {line}" for line in check_claims(rows, config))
    budget = config.train.num_steps * config.data.batch_size
    seeds = tuple(tab.seeds)
    gd = ", ".join(_phase_text(ph) for ph in gd_plan(config))
    direct = (f"; Direct CM targets: {config.distill.direct_cm.num_teacher_steps} DDIM steps of "
              "the fine-tuned model" if "direct_cm" in tab.rows else "")
    return (
        f"Rows:\n{legend}\n\n"
        f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}), each trained row trained and "
        f"evaluated once per seed. Values are the means over seeds; ± is the half-width of the "
        f"{INTERVAL_TEXT} (none with one seed); the per-seed values are in table1.json.\n\n"
        f"Budget per trained row and seed (the same for every row): {config.train.num_steps} "
        f"optimiser steps x batch {config.data.batch_size} = {budget} crops of "
        f"{config.data.crop_size} px. GD order: {tab.gd_order} ({GD_ORDERS[tab.gd_order]}); its "
        f"runs: {gd}{direct}. CM and Direct CM start from and distil the fine-tuned model, "
        f"which is trained for them (and for the finetune row) with the same budget. "
        f"Degradation preset: {config.degradation.preset}; "
        f"{eval_set['image'].shape[0]} evaluation crops; sampling grid: {config.evaluate.grid}. "
        f"Timing device: {timing_device()} (each row timed right after its training).\n\n"
        f"The paper's claims on this run (seed means, differences paired by seed):\n{claims}\n\n"
        "Paper Table 1 (real-world SR x4, Real-ESRGAN degradations, a 1.22B-parameter latent "
        "diffusion model; only the ordering compares with this small table):\n\n"
        f"{paper_table_markdown()}\n"
    )


def write_report(
    config: ml_collections.ConfigDict,
    workdir: str,
    rows: list[dict],
    predictions: Mapping[str, np.ndarray],
    eval_set: dict,
    per_seed: Mapping[int, list[dict]] | None = None,
) -> dict[str, str]:
    """table1.json (rows aggregated over seeds, `aggregate_seeds`) / .md, table1_per_seed.json
    (when `per_seed` is given), the quality-versus-NFE plot (seed means) and the image grid
    (`predictions`: the first seed's); returns their paths."""
    n = min(
        [config.evaluate.num_grid_images, eval_set["image"].shape[0]]
        + [p.shape[0] for p in predictions.values()]
    )
    tab = config.table1
    notes = report_notes(config, rows, eval_set)
    out = {}
    if not is_main_process():
        return out
    out["json"], out["md"] = write_results(
        rows,
        workdir,
        "Table 1 at small scale: 4x real-world super-resolution",
        stem="table1",
        notes=notes,
        spread="ci95",
        spread_text=f"means over seeds (± half-width of the {INTERVAL_TEXT})",
    )
    if per_seed is not None:
        out["per_seed"] = os.path.join(workdir, "table1_per_seed.json")
        with open(out["per_seed"], "w") as f:
            json.dump([{**r, "seed": int(s)} for s, rs in per_seed.items() for r in rs], f,
                      indent=1)
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
