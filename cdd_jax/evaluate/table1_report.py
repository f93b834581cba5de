"""The paper's Table 1 at small scale, the report: the check of the paper's claims on the seed
means (with their intervals), the paper's table beside this run's rows, and the files
(table1.json / .md, table1_per_seed.json, quality-versus-NFE plot, image grid).

The rows and the paper's figures are in `cdd_jax.evaluate.table1`; the rows are trained by
`cdd_jax.stages.table1`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from cdd_jax.evaluate.figures import image_grid, plot_quality_vs_nfe
from cdd_jax.evaluate.harness import timing_device
from cdd_jax.evaluate.photos import protocol_text
from cdd_jax.evaluate.report import markdown_table, write_results
from cdd_jax.evaluate.seeds import INTERVAL_TEXT, Difference, aggregate_seeds, paired_difference
from cdd_jax.evaluate.table1 import (
    CLOSE_TOLERANCE,
    GD_ORDERS,
    PAPER_LPIPS,
    PAPER_NAMES,
    PAPER_TABLE1,
    GDPhase,
    gd_plan,
)
from cdd_jax.parallel.distributed import is_main_process

PyTree = Any


HIGHER_IS_BETTER = ("psnr", "ssim", "lr_psnr", "psnr_y", "ssim_y")
# What each evaluation set of the claim checks is for (`table1.claims_split`).
SPLIT_ROLES = {
    "crops": "the 32 px crops of the validation photos (the old protocol: LPIPS-Alex's last "
             "layers see one position)",
    "validation": "the validation photos (for choosing settings, not for reporting)",
    "test": "the test photos (for reporting: never used to choose a setting)",
}
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


def report_notes(config: ml_collections.ConfigDict, rows: list[dict], eval_set: dict,
                 photos: Mapping[str, list[dict]] | None = None) -> str:
    """The markdown notes under the table: rows, seeds and budget, the photo tables, claims (on
    `table1.claims_split`), the paper's table. `photos`: aggregated photo rows per split."""
    tab = config.table1
    photos = dict(photos or {})
    legend = "\n".join(f"- `{r}`: {PAPER_NAMES[r]}" for r in tab.rows)
    split = tab.get("claims_split", "crops")
    claim_rows = rows if split == "crops" else photos.get(split, [])
    claims = "\n".join(f"- {line}" for line in check_claims(claim_rows, config))
    photo_text = "".join(
        f"On the {s} photos ({protocol_text(config, s)}; means over seeds ± the half-width of the "
        f"{INTERVAL_TEXT}; s / image excludes the first image's compilation):\n\n"
        f"{markdown_table(r, 'ci95')}\n\n" for s, r in photos.items() if r)
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
        f"{photo_text}"
        f"The paper's claims on this run (seed means, differences paired by seed), checked on "
        f"{SPLIT_ROLES[split]}:\n{claims}\n\n"
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
    photos_per_seed: Mapping[str, Mapping[int, list[dict]]] | None = None,
) -> dict[str, str]:
    """table1.json (rows aggregated over seeds, `aggregate_seeds`) / .md, table1_per_seed.json
    (when `per_seed` is given), table1_photos_<split>.json (the photo rows of each split of
    `photos_per_seed` aggregated the same way, and per seed), the quality-versus-NFE plot (seed
    means; another of the `table1.claims_split` photos when they were evaluated) and the image
    grid (`predictions`: the first seed's); returns their paths."""
    n = min(
        [config.evaluate.num_grid_images, eval_set["image"].shape[0]]
        + [p.shape[0] for p in predictions.values()]
    )
    tab = config.table1
    photos = {s: aggregate_seeds(p) for s, p in (photos_per_seed or {}).items() if p}
    notes = report_notes(config, rows, eval_set, photos)
    out = {}
    if not is_main_process():
        return out
    for split, split_rows in photos.items():
        out[f"photos_{split}"] = os.path.join(workdir, f"table1_photos_{split}.json")
        with open(out[f"photos_{split}"], "w") as f:
            json.dump({"rows": split_rows, "protocol": protocol_text(config, split),
                       "per_seed": [{**r, "seed": int(s)} for s, rs in
                                    photos_per_seed[split].items() for r in rs]}, f, indent=1)
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
    split = tab.claims_split
    photo_metrics = [m for m in ("lpips_alex", "psnr_y")
                     if any(r["metric"] == m for r in photos.get(split, ()))]
    if photo_metrics:  # the same plot on the photos the claims are checked on
        out[f"plot_{split}"] = plot_quality_vs_nfe(
            photos[split],
            os.path.join(workdir, f"table1_quality_vs_nfe_{split}.png"),
            photo_metrics,
            title=f"Quality against network evaluations: {split} photos "
                  f"({config.evaluate.photos.size} px crops)",
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
