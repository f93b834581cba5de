"""The paper's Table 1 at small scale, the training side: every row trained (or reused),
evaluated and reported.

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
    direct_cm  Direct CM of the fine-tuned network: CM-II's consistency function regressed onto
               the fine-tuned network's ODE solve (`distill.direct_cm.num_teacher_steps` DDIM
               steps) from t to t_min; starts from the fine-tuned network; multistep consistency
               sampling

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

import ml_collections
import numpy as np

from cdd_jax.diffusion import get_schedule
from cdd_jax.evaluate.harness import evaluate_methods
from cdd_jax.evaluate.metrics import MetricSuite
from cdd_jax.evaluate.table1 import ROW_FIELDS, gd_plan, row_methods, write_report
from cdd_jax.parallel.distributed import is_main_process
from cdd_jax.stages.distill import conditional_model, distill
from cdd_jax.stages.sr import make_sr_eval_set
from cdd_jax.stages.teacher import load_teacher
from cdd_jax.train.checkpoint import load_params

PyTree = Any

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
# Config sections that only some rows read: another row is reused even if they differ.
_ROW_ONLY_SECTIONS = {"distill.direct_cm": ("direct_cm",)}


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
# Finished rows: their settings, results and predictions on disk.
# ----------------------------------------------------------------------------------------------


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
    for section, rows in _ROW_ONLY_SECTIONS.items():
        if key.startswith(section + "."):
            return row not in rows
    return any(f".{p}." in f".{key}." for p in _IGNORED_FOR_REUSE)


def result_settings(config: ml_collections.ConfigDict, row: str) -> dict:
    """The flattened settings that determine `row`'s result (what a reused row must match)."""
    flat = {k: v for k, v in _flat(config.to_dict()).items() if not _ignored(k, row)}
    return json.loads(json.dumps(flat, default=str))  # as it reads back from eval.json


def load_finished_row(
    row_dir: str, settings: dict, row: str
) -> tuple[list[dict], dict] | None:
    """(rows, predictions) of an evaluated row, or None; ValueError if its settings differ
    (settings saved by an older version that `row` ignores, e.g. another row's section, pass)."""
    path = os.path.join(row_dir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    old = {k: v for k, v in saved.get("settings", {}).items() if not _ignored(k, row)}
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


def _trained_params(config, row: str, row_dir: str, teacher, finetuned, eval_set) -> PyTree:
    """The EMA params of `row`'s model (None for bicubic), trained or reused."""
    if row == "bicubic":
        return None
    if row == "finetune":
        return finetuned()
    if row == "gd":
        return train_gd(config, row_dir, teacher=teacher, eval_set=eval_set,
                        finetuned=finetuned())
    if row in ("cm", "direct_cm"):  # the student starts from its teacher, the fine-tuned model
        return train_row(row_config(config, row), row_dir, teacher=teacher, eval_set=eval_set,
                         finetuned=finetuned(), initial=finetuned())
    return train_row(row_config(config, row), row_dir, teacher=teacher, eval_set=eval_set)


def run_table1(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains (or reuses) and evaluates every row of `config.table1.rows`; writes the report."""
    rows_wanted = tuple(config.table1.rows)
    eval_set = make_sr_eval_set(config)
    _, apply_fn = conditional_model(config)
    schedule = get_schedule(config.diffusion.schedule)
    suite = MetricSuite(config.evaluate.metrics)
    n_keep = config.evaluate.num_grid_images

    teacher = _lazy(lambda: load_teacher(config, workdir))
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
        finished = load_finished_row(row_dir, settings, row)
        if finished is not None:
            logging.info("row %s: already evaluated in %s, skipped", row, row_dir)
            rows, preds = finished
        else:
            params = _trained_params(config, row, row_dir, teacher, finetuned, eval_set)
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
            if is_main_process():
                save_row(row_dir, rows, preds, settings)
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            logging.info("row %s finished; peak host memory so far %.2f GiB", row, peak_gb)
        all_rows.extend(rows)
        predictions.update(preds)
    paths = write_report(config, workdir, all_rows, predictions, eval_set)
    logging.info("table 1 written: %s", paths)
    return all_rows
