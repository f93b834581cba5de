"""The paper's Table 1 at small scale, the training side: every row trained (or reused),
evaluated and reported.

    python -m cdd_jax.main --config=configs/table1.py --workdir=DIR

Rows (all from the same unconditional teacher, each with the same budget per seed:
`train.num_steps` optimiser steps of `data.batch_size` crops), each trained and evaluated once per
seed of `table1.seeds`:

    bicubic    the condition itself (no network)
    finetune   the conditional network trained with the plain diffusion loss (the LDM-SR /
               ControlNet analogue), sampled with DDIM and DPM-Solver++(2M) at several step counts
    cm         consistency distillation of the fine-tuned network (the paper's "conditional
               finetuning-first" CM), multistep consistency sampling
    gd         guided / progressive distillation, `gd_rounds` halving rounds down to
               `gd_student_steps` DDIM steps, the student of each round the next round's teacher
               (and starting from it); `gd_order` "distillation_first" (the paper's): the rounds
               distil the unconditional teacher U-Net, then the last student is made conditional
               (the conditional network built from it, diffusion loss); "finetune_first": the
               rounds distil the fine-tuned network. The budget is split evenly over these runs.
    pe_codi    CoDi with the backbone frozen (parameter-efficient)
    codi       CoDi
    direct_cm  Direct CM of the fine-tuned network: CM's consistency function regressed onto
               the fine-tuned network's ODE solve (`distill.direct_cm.num_teacher_steps` DDIM
               steps) from t to t_min; starts from the fine-tuned network; multistep consistency
               sampling

Layout of DIR (every row of every seed resumable):

    teacher/                         pretrained teacher (only when `teacher.checkpoint` is empty)
    seed<s>/<row>/checkpoints/ ...   training run of the row for seed s (gd: one folder per run
                                     of `gd_plan`, e.g. seed0/gd/uncond_round1_N16/, conditional/)
    seed<s>/<row>/eval.json          the row's result rows (written last: marks it finished) and
                                     its photo results per split of `evaluate.photos.splits`
    seed<s>/<row>/eval_predictions.npz  its predictions on the first grid crops
    table1.json, table1.md           the rows aggregated over seeds (means, 95% t-intervals, the
                                     per-seed values) and the report with the paper's claims
    table1_per_seed.json             every seed's rows
    table1_photos_<split>.json       the photo rows of each split aggregated over seeds (and
                                     per seed), the same way; table1.md shows them too
    table1_quality_vs_nfe.png        LPIPS and PSNR (seed means) against network evaluations
    table1_grid.png                  every method side by side on the same held-out crops (the
                                     first seed's models)

Running the command again skips a seed's rows whose `eval.json` exists (after checking that the
settings that determine the row's result did not change), reuses finished training runs, and
resumes partially trained ones from their newest checkpoint; adding seeds to `table1.seeds` trains
only the new ones. A finished row whose eval.json lacks the photo results of today's
`evaluate.photos` settings (rows of before the photo evaluation, or other photo settings) gets them
evaluated from its final checkpoint, never retrained; without that checkpoint it is an error.
Workdirs of the one-seed layout (DIR/<row>/, before `table1.seeds`) are refused
with a message saying how to continue them.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from cdd_jax.console import note
from cdd_jax.diffusion import get_schedule
from cdd_jax.evaluate.harness import evaluate_methods
from cdd_jax.evaluate.metrics import MetricSuite
from cdd_jax.evaluate.seeds import aggregate_seeds
from cdd_jax.evaluate.table1 import ROWS, gd_plan, row_methods
from cdd_jax.evaluate.table1_report import write_report
from cdd_jax.parallel.distributed import is_main_process
from cdd_jax.stages.distill import conditional_model, distill
from cdd_jax.stages.gd import distill_unconditional
from cdd_jax.stages.sr import make_sr_eval_set
from cdd_jax.stages.table1_rows import (
    load_finished_row,
    load_row_photos,
    missing_photo_splits,
    result_settings,
    row_photos,
    save_row,
)
from cdd_jax.stages.teacher import load_teacher
from cdd_jax.train.checkpoint import load_params

PyTree = Any

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
        note("reusing the finished run in %s", run_dir)
        return done
    note(
        "training %s in %s (%d steps)", cfg.distill.objective, run_dir, cfg.train.num_steps
    )
    teacher_params = None if initial is not None else teacher()
    params, _, _ = distill(
        cfg, run_dir, teacher_params, eval_set, finetuned_params=finetuned, initial_params=initial
    )
    return params


def train_unconditional_round(
    cfg: ml_collections.ConfigDict, run_dir: str, teacher: Callable[[], PyTree]
) -> PyTree:
    """EMA params (U-Net) of one unconditional GD round distilling `teacher()`, reusing a
    finished run (then `teacher` is not called)."""
    done = finished_params(run_dir, cfg.train.num_steps)
    if done is not None:
        note("reusing the finished run in %s", run_dir)
        return done
    note("training unconditional gd (N=%d) in %s (%d steps)",
                 cfg.distill.num_grid_steps, run_dir, cfg.train.num_steps)
    return distill_unconditional(cfg, run_dir, teacher())


def train_gd(
    config: ml_collections.ConfigDict,
    row_dir: str,
    *,
    teacher: Callable[[], PyTree],
    eval_set: dict,
    finetuned: Callable[[], PyTree],
) -> PyTree:
    """GD: the runs of `gd_plan` in order. Each round's student starts from, and distils, the
    previous run's model; round 1 distils the unconditional teacher (distillation-first, the
    paper's order) or the fine-tuned model (finetune-first). Distillation-first ends with the
    last student made conditional: the conditional network built from it (as from a teacher),
    trained with the diffusion loss. `teacher`, `finetuned`: called only if needed."""
    model: Callable[[], PyTree] | None = None
    for phase in gd_plan(config):
        cfg = row_config(config, phase.objective, num_grid_steps=phase.teacher_steps,
                         num_steps=phase.num_steps)
        run_dir = os.path.join(row_dir, phase.name)
        if not phase.conditional:
            params = train_unconditional_round(cfg, run_dir, model or teacher)
        elif phase.objective == "finetune":  # make the unconditional few-step student conditional
            params = train_row(cfg, run_dir, teacher=model, eval_set=eval_set)
        else:
            start = (model or finetuned)()
            params = train_row(cfg, run_dir, teacher=teacher, eval_set=eval_set,
                               finetuned=start, initial=start)
        model = (lambda p=params: p)
    return model()


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
        return train_gd(config, row_dir, teacher=teacher, eval_set=eval_set, finetuned=finetuned)
    if row in ("cm", "direct_cm"):  # the student starts from its teacher, the fine-tuned model
        return train_row(row_config(config, row), row_dir, teacher=teacher, eval_set=eval_set,
                         finetuned=finetuned(), initial=finetuned())
    return train_row(row_config(config, row), row_dir, teacher=teacher, eval_set=eval_set)


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """A copy of `config` whose rows train and evaluate with `seed`."""
    cfg = config.copy_and_resolve_references()
    cfg.seed = int(seed)
    return cfg


def check_layout(workdir: str) -> None:
    """ValueError if `workdir` holds rows in the one-seed layout (DIR/<row>/, before
    `table1.seeds`), which this version would neither read nor overwrite."""
    old = [r for r in ROWS if os.path.isdir(os.path.join(workdir, r))]
    if old:
        raise ValueError(
            f"{workdir} holds Table 1 rows in the one-seed layout of before table1.seeds "
            f"({', '.join(old)}/). Their results stay readable as they are (<row>/eval.json, "
            "table1.json, table1.md). To continue them as one seed of the new layout, move each "
            "<row>/ folder into seed<S>/ (S = the `seed` they ran with; the gd row, whose order "
            "setting is new, will refuse to be reused and must be deleted), or use a new workdir."
        )


def saved_row_params(config: ml_collections.ConfigDict, row: str, seed_dir: str) -> PyTree:
    """The EMA params a finished row was evaluated with, read from its final checkpoint (GD:
    its last run's); never trains. ValueError when the checkpoint is gone: results of a
    retrained model would not be the row's."""
    if row == "bicubic":
        return None
    run_dir, steps = os.path.join(seed_dir, row), config.train.num_steps
    if row == "gd":
        last = gd_plan(config)[-1]
        run_dir, steps = os.path.join(run_dir, last.name), last.num_steps
    params = finished_params(run_dir, steps)
    if params is None:
        raise ValueError(
            f"{seed_dir}/{row}/eval.json lacks photo results of today's evaluate.photos settings "
            f"and the row's final checkpoint ({run_dir}/checkpoints, step {steps}) is gone, so "
            "they cannot be evaluated without retraining: delete the row's directory to retrain "
            "it, or set evaluate.photos.splits=()")
    return params


def _row_results(config, row: str, seed_dir: str, *, teacher, finetuned, eval_set, apply_fn,
                 schedule, suite) -> tuple[list[dict], dict, dict[str, dict]]:
    """(crop rows, predictions, photo results per split) of `row`: read back from its
    eval.json, with missing photo splits evaluated from its checkpoint; else trained (or
    reused) and evaluated."""
    row_dir = os.path.join(seed_dir, row)
    settings = result_settings(config, row)
    finished = load_finished_row(row_dir, settings, row)
    if finished is not None:
        rows, preds = finished
        photos = load_row_photos(row_dir)
        missing = missing_photo_splits(config, photos)
        if not missing:
            note("row %s: already evaluated in %s, skipped", row, row_dir)
        else:
            note("row %s: evaluated in %s; photos %s from its checkpoint", row, row_dir,
                         missing)
            params = saved_row_params(config, row, seed_dir)
            photos.update(row_photos(config, row, params, apply_fn, schedule, missing))
            if is_main_process():
                save_row(row_dir, rows, preds, settings, photos)
        return rows, preds, photos
    params = _trained_params(config, row, row_dir, teacher, finetuned, eval_set)
    methods = row_methods(config, row, params, apply_fn, schedule)
    results = evaluate_methods(methods, eval_set, suite, batch_size=config.evaluate.batch_size,
                               rng_seed=config.seed,
                               keep_predictions=config.evaluate.num_grid_images)
    rows, preds = list(results), dict(results.predictions)
    photos = row_photos(config, row, params, apply_fn, schedule, config.evaluate.photos.splits)
    if is_main_process():
        save_row(row_dir, rows, preds, settings, photos)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    note("row %s finished; peak host memory so far %.2f GiB", row, peak_gb)
    return rows, preds, photos


def run_seed(
    config: ml_collections.ConfigDict,
    seed_dir: str,
    *,
    teacher: Callable[[], PyTree],
    eval_set: dict,
    apply_fn,
    schedule,
    suite: MetricSuite,
) -> tuple[list[dict], dict[str, np.ndarray], dict[str, list[dict]]]:
    """Every row of `config.table1.rows` for the seed `config.seed`, trained or reused, evaluated
    or read back, in `seed_dir`; returns (crop result rows, predictions, photo result rows per
    split of `evaluate.photos.splits`)."""
    finetuned = _lazy(
        lambda: train_row(
            row_config(config, "finetune"),
            os.path.join(seed_dir, "finetune"),
            teacher=teacher,
            eval_set=eval_set,
        )
    )
    all_rows: list[dict] = []
    predictions: dict[str, np.ndarray] = {}
    photo_rows: dict[str, list[dict]] = {s: [] for s in config.evaluate.photos.splits}
    for row in config.table1.rows:
        rows, preds, photos = _row_results(config, row, seed_dir, teacher=teacher,
                                           finetuned=finetuned, eval_set=eval_set,
                                           apply_fn=apply_fn, schedule=schedule, suite=suite)
        all_rows.extend(rows)
        predictions.update(preds)
        for split in photo_rows:
            photo_rows[split].extend(photos[split]["rows"])
    return all_rows, predictions, photo_rows


def run_table1(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains (or reuses) and evaluates every row of `config.table1.rows` for every seed of
    `config.table1.seeds` (seed by seed); writes the report; returns the crop rows aggregated
    over the seeds (`cdd_jax.evaluate.seeds.aggregate_seeds`; the photo rows, aggregated the
    same way per split, are in the report's table1_photos_<split>.json)."""
    check_layout(workdir)
    eval_set = make_sr_eval_set(config)
    _, apply_fn = conditional_model(config)
    schedule = get_schedule(config.diffusion.schedule)
    suite = MetricSuite(config.evaluate.metrics)
    teacher = _lazy(lambda: load_teacher(config, workdir))
    per_seed: dict[int, list[dict]] = {}
    photos_per_seed: dict[str, dict[int, list[dict]]] = {
        s: {} for s in config.evaluate.photos.splits}
    predictions: dict[str, np.ndarray] = {}
    for seed in config.table1.seeds:
        rows, preds, photos = run_seed(
            seed_config(config, seed), os.path.join(workdir, f"seed{seed}"), teacher=teacher,
            eval_set=eval_set, apply_fn=apply_fn, schedule=schedule, suite=suite,
        )
        per_seed[int(seed)] = rows
        for split, split_rows in photos.items():
            photos_per_seed[split][int(seed)] = split_rows
        predictions = predictions or preds  # the grid shows the first seed's models
        note("table 1: seed %d done", seed)
    rows = aggregate_seeds(per_seed)
    paths = write_report(config, workdir, rows, predictions, eval_set, per_seed,
                         photos_per_seed=photos_per_seed)
    note("table 1 written: %s", paths)
    return rows
