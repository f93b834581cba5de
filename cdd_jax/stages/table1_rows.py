"""Table 1's finished rows on disk: the settings that determine a row's result, its eval.json
(crop rows, predictions, and the photo results per split with the settings they were made with)
and the photo evaluation of a row (`cdd_jax.evaluate.photos`). The driver is
`cdd_jax.stages.table1`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping

import ml_collections
import numpy as np

from cdd_jax.evaluate.photos import evaluate_photos, tile_settings
from cdd_jax.evaluate.table1 import ROW_FIELDS, row_photo_methods
from cdd_jax.fileio import write_atomic

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
    "evaluate.default_renoise",
    # The photo results are stored per split with their own settings (`photo_settings`): other
    # photo settings re-evaluate them from the row's checkpoint, they never retrain the row.
    "evaluate.photos",
    "mesh",
)
# Options added after Table 1 rows were first saved, with the value that is the behaviour of
# before: a row saved without the key is reused while the option keeps that value.
ADDED_OPTIONS = {"data.prompts": "none", "data.prompt_dropout": 0.0, "control.cond_space": "pixel"}
# Config sections that only some rows read: another row is reused even if they differ.
_ROW_ONLY_SECTIONS = {"distill.direct_cm": ("direct_cm",)}




def _added_key_value(key: str):
    """The value meaning "as before" of a setting that an older eval.json lacks (None for a key
    not in ADDED_OPTIONS: then any value is a difference)."""
    return ADDED_OPTIONS.get(key)


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
    for key in settings.keys() - saved.get("settings", {}).keys():
        old[key] = _added_key_value(key)  # an option added since: what it meant then
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


def save_row(
    row_dir: str, rows: list[dict], predictions: Mapping[str, np.ndarray], settings: dict,
    photos: Mapping[str, dict] | None = None,
) -> None:
    """Predictions first, then eval.json (its presence marks the row finished): the crop rows,
    their settings and the photo results per split (`photos.evaluate_photos`'s, each with its
    "settings", `photo_settings`)."""
    npz = io.BytesIO()
    np.savez(npz, **{k.replace("/", "|"): np.asarray(v) for k, v in predictions.items()})
    write_atomic(os.path.join(row_dir, "eval_predictions.npz"), npz.getvalue())
    text = json.dumps({"rows": rows, "settings": settings, "photos": dict(photos or {})},
                      indent=1)
    write_atomic(os.path.join(row_dir, "eval.json"), text.encode())


# ----------------------------------------------------------------------------------------------
# Photo results of a row: stored in its eval.json per split, with the settings they depend on.
# ----------------------------------------------------------------------------------------------


def photo_settings(config: ml_collections.ConfigDict) -> dict:
    """What a row's photo results depend on beyond the row's own settings: `evaluate.photos`
    (less the list of splits), the tiles as resolved, and the metrics."""
    pcfg = config.evaluate.photos
    out = {k: v for k, v in pcfg.to_dict().items() if k != "splits"}
    out["resolved_tiles"] = tile_settings(pcfg, config.data.crop_size,
                                          int(config.degradation.scale))
    out["metrics"] = list(config.evaluate.metrics)
    return json.loads(json.dumps(out, default=str))


def load_row_photos(row_dir: str) -> dict[str, dict]:
    """The photo results per split in a row's eval.json ({} when it has none: older rows)."""
    with open(os.path.join(row_dir, "eval.json")) as f:
        return dict(json.load(f).get("photos", {}))


def missing_photo_splits(config: ml_collections.ConfigDict, saved: Mapping[str, dict]
                         ) -> list[str]:
    """The splits of `evaluate.photos.splits` with no saved result of today's photo settings."""
    now = photo_settings(config)
    return [s for s in config.evaluate.photos.splits
            if s not in saved or saved[s].get("settings") != now]


def row_photos(config: ml_collections.ConfigDict, row: str, params, apply_fn, schedule,
               splits) -> dict[str, dict]:
    """`row`'s methods on the photos of `splits` (`photos.evaluate_photos`), each result with
    its "settings" (`photo_settings`)."""
    if not splits:
        return {}
    cfg = config.copy_and_resolve_references()
    cfg.evaluate.photos.splits = tuple(splits)
    results = evaluate_photos(cfg, row_photo_methods(cfg, row, params, apply_fn, schedule))
    settings = photo_settings(cfg)
    return {split: {**r, "settings": settings} for split, r in results.items()}
