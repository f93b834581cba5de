"""The paper's Table 1 at small scale, the evaluation side: the rows and the paper's figures,
the `table1` config section, GD's training plan, and the samplers and step counts evaluated per
row. The claim checks and the report are in `cdd_jax.evaluate.table1_report`; the rows are
trained by `cdd_jax.stages.table1`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.distill.sampling import consistency_sample, few_step_sample, solver_sample
from cdd_jax.evaluate.harness import MethodSpec, bicubic_method

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
    # Where the report checks the paper's claims: "test" (the bundled test photos: reporting),
    # "validation" (the validation photos: for choosing settings) or "crops" (the 32 px crops of
    # the validation photos, the old protocol); a photo split must be in evaluate.photos.splits.
    c.claims_split = "test"
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
    splits = ("crops", *config.evaluate.photos.splits)
    if tab.claims_split not in splits:
        raise ValueError(f"table1.claims_split {tab.claims_split!r} must be one of {splits} "
                         "(a photo split must be in evaluate.photos.splits)")
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


def row_plan(config: ml_collections.ConfigDict, row: str) -> list[tuple[str, int]]:
    """(sampler, steps) of every method evaluated for `row` (none for bicubic)."""
    tab = config.table1
    if row == "bicubic":
        return []
    if row == "finetune":
        return ([("ddim", k) for k in tab.finetune_ddim_steps]
                + [("dpmpp_2m", k) for k in tab.finetune_dpm_steps])
    if row in ("cm", "direct_cm"):
        return [("consistency", k) for k in tab[f"{row}_steps"]]
    if row == "gd":
        return [("ddim", tab.gd_student_steps)]
    if row in ("pe_codi", "codi"):
        return [("ddim", k) for k in tab[f"{row}_steps"]]
    raise ValueError(f"unknown table1 row {row!r}; valid: {ROWS}")


def row_sample(config: ml_collections.ConfigDict, row: str, sampler: str, k: int, apply_fn,
               schedule):
    """sample(params, cond, rng, noise=None) -> x of one method of `row` (`noise`: the Gaussian
    draws, e.g. one field over tiles; `cdd_jax.distill.sampling.NoiseFn`)."""
    kw = dict(schedule=schedule, num_steps=k, grid=config.evaluate.grid,
              prediction_type=config.diffusion.prediction_type)
    if sampler == "consistency":
        return lambda p, cond, rng, noise=None: consistency_sample(
            apply_fn, p, cond, rng, cm_cfg=config.distill.cm, noise=noise, **kw)
    if row == "finetune":
        return lambda p, cond, rng, noise=None: solver_sample(
            apply_fn, p, cond, rng, sampler=sampler, noise=noise, **kw)
    return lambda p, cond, rng, noise=None: few_step_sample(apply_fn, p, cond, rng, noise=noise,
                                                            **kw)


def row_methods(
    config: ml_collections.ConfigDict, row: str, params: PyTree, apply_fn, schedule
) -> dict:
    """{key: MethodSpec} of the samplers and step counts evaluated for `row`."""
    if row == "bicubic":
        return {"bicubic/none/0": bicubic_method()}
    params = jax.device_put(params)
    methods = {}
    for sampler, k in row_plan(config, row):
        sample = row_sample(config, row, sampler, k, apply_fn, schedule)
        fn = jax.jit(lambda p, cond, rng, sample=sample: sample(p, cond, rng))
        methods[f"{row}/{sampler}/{k}"] = MethodSpec(
            row, sampler, int(k), lambda cond, lq, rng, fn=fn: fn(params, cond, rng)
        )
    return methods


def row_photo_methods(
    config: ml_collections.ConfigDict, row: str, params: PyTree, apply_fn, schedule
) -> dict[tuple, tuple | None]:
    """The methods of `row_methods` for `photos.evaluate_photos`: (row, sampler, steps) ->
    (tile sample function, params), None for bicubic."""
    if row == "bicubic":
        return {("bicubic", "none", 0): None}
    return {(row, sampler, int(k)): (row_sample(config, row, sampler, k, apply_fn, schedule),
                                     params)
            for sampler, k in row_plan(config, row)}


# Metrics where higher is better (the others, LPIPS and the MSEs, lower is better).
