"""The paper's Table 1 at small scale: every row trained (or reused), evaluated and reported.

    python -m cdd_jax.main --config=configs/table1.py --workdir=DIR

Rows (all from the same unconditional teacher, each with the same budget: `train.num_steps`
optimiser steps of `data.batch_size` crops):

    bicubic    the condition itself (no network)
    finetune   the conditional network trained with the plain diffusion loss (the LDM-SR /
               ControlNet analogue), sampled with DDIM and DPM-Solver++(2M) at several step counts
    cm         consistency distillation of the fine-tuned network (CM-II), multistep consistency
               sampling
    gd         guided / progressive distillation of the fine-tuned network (GD-II): `gd_rounds`
               halving rounds down to `gd_student_steps` DDIM steps; the student of each round is
               the next round's teacher (and starts from it); the budget is split evenly over
               the rounds
    pe_codi    CoDi with the backbone frozen (parameter-efficient)
    codi       CoDi

Layout of DIR (every row resumable):

    teacher/                       pretrained teacher (only when `teacher.checkpoint` is empty)
    <row>/checkpoints/ ...         training run of the row (gd: gd/round<r>_N<teacher steps>/)
    <row>/eval.json                the row's result rows (written last: marks the row finished)
    <row>/eval_predictions.npz     its predictions on the first grid crops (for the image grid)
    table1.json, table1.md         all rows, and the markdown report with the paper's claims
    table1_quality_vs_nfe.png      LPIPS and PSNR against network evaluations
    table1_grid.png                every method side by side on the same held-out crops

Running the command again skips rows whose `eval.json` exists (after checking that the settings
that determine the row's result did not change), reuses finished training runs, and resumes
partially trained ones from their newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import resource
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from cdd_jax.diffusion import get_schedule
from cdd_jax.distill.sampling import consistency_sample, few_step_sample, teacher_sample
from cdd_jax.train.checkpoint import load_params
from cdd_jax.train.run import _cond_apply, distill, get_teacher

PyTree = Any

ROWS = ("bicubic", "finetune", "cm", "gd", "pe_codi", "codi")
# The paper's names of the rows (Table 1 of Mei et al., CVPR 2024).
PAPER_NAMES = {
    "bicubic": "bicubic upsampling (not in the paper's table)",
    "finetune": "LDM (fine-tuned conditional model; DDIM, or DPM-Solver++)",
    "cm": "CM-II (consistency distillation of the fine-tuned model)",
    "gd": "GD-II (guided / progressive distillation of the fine-tuned model)",
    "pe_codi": "PE-CoDi (parameter-efficient CoDi)",
    "codi": "CoDi",
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
}
# Settings that do not change a row's result, at any depth (so "train.log_every" also covers
# "teacher.pretrain.train.log_every"): a finished row is reused even if they differ.
_IGNORED_FOR_REUSE = (
    "distill.objective",
    "train.log_every",
    "train.eval_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.async_checkpoints",
    "train.profile",
    "train.num_sample_images",
    "data.num_workers",
    "data.read_threads",
    "data.prefetch",
    "evaluate.num_grid_images",
    "mesh",
)


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
    c.plot_metrics = ("lpips_alex", "psnr")  # Panels of the quality-versus-NFE plot.
    return c


def _positive_ints(name: str, values) -> None:
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"table1.{name} must be positive integers, got {values!r}")


def validate_table1_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad `table1` field (the rest is checked as for "sr")."""
    t = config.table1
    rows = tuple(t.rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows or len(set(rows)) != len(rows):
        raise ValueError(f"table1.rows must be distinct names from {ROWS}, got {rows!r}")
    for name in (
        "finetune_ddim_steps",
        "finetune_dpm_steps",
        "cm_steps",
        "pe_codi_steps",
        "codi_steps",
        "gd_rounds",
        "gd_student_steps",
    ):
        _positive_ints(name, t[name])
    if "gd" in rows and config.train.num_steps < t.gd_rounds:
        raise ValueError(
            f"train.num_steps {config.train.num_steps} leaves no step for each of "
            f"table1.gd_rounds={t.gd_rounds} GD rounds"
        )
    missing = [m for m in t.plot_metrics if m not in config.evaluate.metrics]
    if missing or not t.plot_metrics:
        raise ValueError(
            f"table1.plot_metrics {tuple(t.plot_metrics)!r} must be a non-empty "
            f"subset of evaluate.metrics {tuple(config.evaluate.metrics)!r}"
        )


# ----------------------------------------------------------------------------------------------
# Training of one row: reuse a finished run, else train (the loop resumes from checkpoints).
# ----------------------------------------------------------------------------------------------


def row_config(
    config: ml_collections.ConfigDict,
    objective: str,
    *,
    num_grid_steps: int | None = None,
    num_steps: int | None = None,
) -> ml_collections.ConfigDict:
    """A copy of `config` training `objective` (and, for GD, one round's N and step budget)."""
    cfg = config.copy_and_resolve_references()
    cfg.stage = "sr"
    cfg.distill.objective = objective
    if num_grid_steps is not None:
        cfg.distill.num_grid_steps = int(num_grid_steps)
    if num_steps is not None:
        cfg.train.num_steps = int(num_steps)
    return cfg


def finished_params(run_dir: str, num_steps: int) -> PyTree | None:
    """The EMA parameters of a training run in `run_dir` that reached `num_steps`, else None."""
    ckdir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckdir):
        return None
    steps = [int(n) for n in os.listdir(ckdir) if n.isdigit()]
    if not steps or max(steps) != num_steps:
        return None
    try:
        params, meta = load_params(ckdir)
    except (ValueError, FileNotFoundError) as e:
        logging.warning("finished run in %s is unreadable (%s); training again", run_dir, e)
        return None
    return params if meta.get("step") == num_steps else None


def train_row(
    cfg: ml_collections.ConfigDict,
    run_dir: str,
    *,
    teacher: Callable[[], PyTree],
    eval_set: dict,
    finetuned: PyTree = None,
    initial: PyTree = None,
) -> PyTree:
    """EMA params of `cfg.distill.objective` trained in `run_dir`, reusing a finished run."""
    done = finished_params(run_dir, cfg.train.num_steps)
    if done is not None:
        logging.info("reusing the finished run in %s", run_dir)
        return done
    logging.info(
        "training %s in %s (%d steps)", cfg.distill.objective, run_dir, cfg.train.num_steps
    )
    teacher_params = None if initial is not None else teacher()
    params, _, _ = distill(
        cfg, run_dir, teacher_params, eval_set, finetuned_params=finetuned, initial_params=initial
    )
    return params


def gd_plan(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """[(teacher steps N, optimiser steps)] of the GD-II rounds; N halves from round to round."""
    t = config.table1
    total = int(config.train.num_steps)
    per_round = [total // t.gd_rounds] * t.gd_rounds
    per_round[-1] += total - sum(per_round)  # the remainder goes to the last round
    return [(t.gd_student_steps * 2 ** (t.gd_rounds - r), per_round[r]) for r in range(t.gd_rounds)]


def train_gd(
    config: ml_collections.ConfigDict,
    row_dir: str,
    *,
    teacher: Callable[[], PyTree],
    eval_set: dict,
    finetuned: PyTree,
) -> PyTree:
    """GD-II: each round's student starts from, and distils, the previous round's model."""
    model = finetuned
    for r, (n_teacher, steps) in enumerate(gd_plan(config)):
        cfg = row_config(config, "gd", num_grid_steps=n_teacher, num_steps=steps)
        run_dir = os.path.join(row_dir, f"round{r + 1}_N{n_teacher}")
        model = train_row(
            cfg, run_dir, teacher=teacher, eval_set=eval_set, finetuned=model, initial=model
        )
    return model


# ----------------------------------------------------------------------------------------------
# Evaluation of one row.
# ----------------------------------------------------------------------------------------------


def row_methods(
    config: ml_collections.ConfigDict, row: str, params: PyTree, apply_fn, schedule
) -> dict:
    """{key: MethodSpec} of the samplers and step counts evaluated for `row`."""
    from cdd_jax.evaluate.harness import MethodSpec, bicubic_method

    t, grid = config.table1, config.evaluate.grid
    if row == "bicubic":
        return {"bicubic/none/0": bicubic_method()}
    params = jax.device_put(params)
    plan: list[tuple[str, int]] = []
    if row == "finetune":
        plan = [("ddim", k) for k in t.finetune_ddim_steps]
        plan += [("dpmpp_2m", k) for k in t.finetune_dpm_steps]
    elif row == "cm":
        plan = [("consistency", k) for k in t.cm_steps]
    elif row == "gd":
        plan = [("ddim", t.gd_student_steps)]
    elif row in ("pe_codi", "codi"):
        plan = [("ddim", k) for k in t[f"{row}_steps"]]
    else:
        raise ValueError(f"unknown table1 row {row!r}; valid: {ROWS}")
    methods = {}
    for sampler, k in plan:
        kw = dict(schedule=schedule, num_steps=k, grid=grid)
        if sampler == "consistency":
            fn = jax.jit(
                lambda p, cond, rng, kw=kw: consistency_sample(
                    apply_fn, p, cond, rng, cm_cfg=config.distill.cm, **kw
                )
            )
        elif row == "finetune":
            fn = jax.jit(
                lambda p, cond, rng, kw=kw, s=sampler: teacher_sample(
                    apply_fn, p, cond, rng, sampler=s, **kw
                )
            )
        else:
            fn = jax.jit(lambda p, cond, rng, kw=kw: few_step_sample(apply_fn, p, cond, rng, **kw))
        methods[f"{row}/{sampler}/{k}"] = MethodSpec(
            row, sampler, int(k), lambda cond, lq, rng, fn=fn: fn(params, cond, rng)
        )
    return methods


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _ignored(key: str, row: str) -> bool:
    if key.startswith("table1."):
        return key.split(".", 1)[1] not in ROW_FIELDS[row]
    return any(f".{p}." in f".{key}." for p in _IGNORED_FOR_REUSE)


def result_settings(config: ml_collections.ConfigDict, row: str) -> dict:
    """The flattened settings that determine `row`'s result (what a reused row must match)."""
    flat = {k: v for k, v in _flat(config.to_dict()).items() if not _ignored(k, row)}
    return json.loads(json.dumps(flat, default=str))  # as it reads back from eval.json


def load_finished_row(row_dir: str, settings: dict) -> tuple[list[dict], dict] | None:
    """(rows, predictions) of an evaluated row, or None; ValueError if its settings differ."""
    path = os.path.join(row_dir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    old = saved.get("settings", {})
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise ValueError(
            f"{path} was produced with different settings ("
            + ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:5])
            + (", ..." if len(diff) > 5 else "")
            + "); use a new workdir or delete that row's directory to recompute it"
        )
    npz = os.path.join(row_dir, "eval_predictions.npz")
    predictions = dict(np.load(npz)) if os.path.exists(npz) else {}
    return saved["rows"], {k.replace("|", "/"): v for k, v in predictions.items()}


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_row(
    row_dir: str, rows: list[dict], predictions: Mapping[str, np.ndarray], settings: dict
) -> None:
    """Predictions first, then eval.json (its presence marks the row finished)."""
    os.makedirs(row_dir, exist_ok=True)

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k.replace("/", "|"): np.asarray(v) for k, v in predictions.items()})

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump({"rows": rows, "settings": settings}, f, indent=1)

    _atomic_write(os.path.join(row_dir, "eval_predictions.npz"), write_npz)
    _atomic_write(os.path.join(row_dir, "eval.json"), write_json)


# ----------------------------------------------------------------------------------------------
# The report: table, the paper's claims checked on this run, plot, grid.
# ----------------------------------------------------------------------------------------------


def _value(rows, method, sampler, steps, metric):
    for r in rows:
        if (r["method"], r["sampler"], r["steps"], r["metric"]) == (method, sampler, steps, metric):
            return r["value"]
    return None


def check_claims(
    rows: list[dict], config: ml_collections.ConfigDict, metric: str = "lpips_alex"
) -> list[str]:
    """The paper's two claims on this run's `metric` (lower is better), one line each."""
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
        )
        for m, s in others:
            v = _value(rows, m, s, 4, metric)
            if v is not None:
                verdict = "better" if codi < v else "NOT better"
                lines.append(f"CoDi-4 vs {m} ({s}) at 4 steps: {codi:.4f} vs {v:.4f} ({verdict})")
    return lines or ["(claims not checked: the CoDi-4 or reference rows are missing)"]


_SHORT = {
    ("finetune", "ddim"): "finetune",
    ("finetune", "dpmpp_2m"): "DPM++",
    ("cm", "consistency"): "CM-II",
    ("gd", "ddim"): "GD-II",
    ("pe_codi", "ddim"): "PE-CoDi",
    ("codi", "ddim"): "CoDi",
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
    from cdd_jax.evaluate.figures import image_grid, plot_quality_vs_nfe
    from cdd_jax.evaluate.harness import timing_device
    from cdd_jax.evaluate.report import write_results

    n = min(
        [config.evaluate.num_grid_images, eval_set["image"].shape[0]]
        + [p.shape[0] for p in predictions.values()]
    )
    t = config.table1
    legend = "\n".join(f"- `{r}`: {PAPER_NAMES[r]}" for r in t.rows)
    paper = "\n".join(f"| {m} | {s} | {k} | {v} |" for (m, s, k), v in PAPER_LPIPS.items())
    claims = "\n".join(f"- {line}" for line in check_claims(rows, config))
    budget = config.train.num_steps * config.data.batch_size
    gd = ", ".join(f"N={n_t} -> {n_t // 2} ({s} steps)" for n_t, s in gd_plan(config))
    notes = (
        f"Rows:\n{legend}\n\n"
        f"Budget per trained row: {config.train.num_steps} optimiser steps x batch "
        f"{config.data.batch_size} = {budget} crops of {config.data.crop_size} px (GD-II rounds: "
        f"{gd}). Degradation preset: {config.degradation.preset}; "
        f"{eval_set['image'].shape[0]} held-out crops; sampling grid: {config.evaluate.grid}. "
        f"Timing device: {timing_device()} (each row timed right after its training).\n\n"
        f"The paper's claims on this run:\n{claims}\n\n"
        "Paper Table 1 LPIPS (DF2K, 256 px latents of a large LDM; only the ordering compares):\n\n"
        "| method | sampler | steps | LPIPS |\n|---|---|---|---|\n"
        f"{paper}\n"
    )
    out = {}
    if jax.process_index() != 0:
        return out
    out["json"], out["md"] = write_results(
        rows,
        workdir,
        "Table 1 at small scale: 4x real-world super-resolution",
        stem="table1",
        notes=notes,
    )
    metrics = [m for m in t.plot_metrics if any(r["metric"] == m for r in rows)]
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


# ----------------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------------


def _lazy(fn: Callable[[], PyTree]) -> Callable[[], PyTree]:
    """fn() computed at the first call only (the teacher or fine-tuned model, if needed)."""
    cache = []

    def get():
        if not cache:
            cache.append(fn())
        return cache[0]

    return get


def make_table1_eval_set(config: ml_collections.ConfigDict) -> dict:
    from cdd_jax.data.degradations import SRPairTransform
    from cdd_jax.data.pipeline import make_eval_set

    return make_eval_set(
        config.data,
        task="sr",
        sr_transform=SRPairTransform(config.degradation, config.data.crop_size),
    )


def run_table1(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains (or reuses) and evaluates every row of `config.table1.rows`; writes the report."""
    from cdd_jax.evaluate.harness import evaluate_methods
    from cdd_jax.evaluate.metrics import MetricSuite
    from cdd_jax.models.conditional import ConditionalUNet

    validate_table1_config(config)
    rows_wanted = tuple(config.table1.rows)
    eval_set = make_table1_eval_set(config)
    apply_fn = _cond_apply(ConditionalUNet.from_config(config.model, config.adapter, config.diffusion.schedule))
    schedule = get_schedule(config.diffusion.schedule)
    suite = MetricSuite(config.evaluate.metrics)
    n_keep = config.evaluate.num_grid_images

    teacher = _lazy(lambda: get_teacher(config, workdir))
    finetuned = _lazy(
        lambda: train_row(
            row_config(config, "finetune"),
            os.path.join(workdir, "finetune"),
            teacher=teacher,
            eval_set=eval_set,
        )
    )
    all_rows: list[dict] = []
    predictions: dict[str, np.ndarray] = {}
    for row in rows_wanted:
        row_dir = os.path.join(workdir, row)
        settings = result_settings(config, row)
        finished = load_finished_row(row_dir, settings)
        if finished is not None:
            logging.info("row %s: already evaluated in %s, skipped", row, row_dir)
            rows, preds = finished
        else:
            if row == "bicubic":
                params = None
            elif row == "finetune":
                params = finetuned()
            elif row == "gd":
                params = train_gd(
                    config, row_dir, teacher=teacher, eval_set=eval_set, finetuned=finetuned()
                )
            elif row == "cm":  # the student starts from its teacher, the fine-tuned model
                params = train_row(
                    row_config(config, row),
                    row_dir,
                    teacher=teacher,
                    eval_set=eval_set,
                    finetuned=finetuned(),
                    initial=finetuned(),
                )
            else:
                params = train_row(
                    row_config(config, row), row_dir, teacher=teacher, eval_set=eval_set
                )
            methods = row_methods(config, row, params, apply_fn, schedule)
            results = evaluate_methods(
                methods,
                eval_set,
                suite,
                batch_size=config.evaluate.batch_size,
                rng_seed=config.seed,
                keep_predictions=n_keep,
            )
            rows, preds = list(results), dict(results.predictions)
            if jax.process_index() == 0:
                save_row(row_dir, rows, preds, settings)
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            logging.info("row %s finished; peak host memory so far %.2f GiB", row, peak_gb)
        all_rows.extend(rows)
        predictions.update(preds)
    paths = write_report(config, workdir, all_rows, predictions, eval_set)
    logging.info("table 1 written: %s", paths)
    return all_rows


__all__ = [
    "ROWS",
    "check_claims",
    "finished_params",
    "gd_plan",
    "load_finished_row",
    "result_settings",
    "row_config",
    "row_methods",
    "run_table1",
    "save_row",
    "table1_section",
    "train_gd",
    "train_row",
    "validate_table1_config",
    "write_report",
]
