"""The unconditional teacher of a distillation job: the `teacher` config section and its loading.

The teacher is the pretrained *unconditional* U-Net that CoDi starts from (the fine-tuned
conditional model that CM-II / GD-II distil is called `finetuned` everywhere).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.stages.pretrain import pretrain
from cdd_jax.train.checkpoint import load_params

PyTree = Any
SHIPPED_TEACHER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "teacher")
# Model settings that do not change the parameters a checkpoint holds.
_RUNTIME_MODEL_KEYS = ("dropout", "remat", "dtype")


def teacher_config(pretrain: ml_collections.ConfigDict, *,
                   shipped: bool) -> ml_collections.ConfigDict:
    """The `teacher` section; `pretrain`: the pretraining job used when no checkpoint is given."""
    c = ml_collections.ConfigDict()
    # Teacher checkpoint: an exported params dir, a pretraining workdir or its checkpoints/ dir.
    # Empty: pretrain one with `teacher.pretrain` in <workdir>/teacher (reused if already there).
    c.checkpoint = SHIPPED_TEACHER if shipped else ""
    c.pretrain = pretrain
    return c


def validate_teacher_config(cfg: ml_collections.ConfigDict) -> None:
    if not isinstance(cfg.checkpoint, str):
        raise TypeError(f"teacher.checkpoint must be a path (str), got {cfg.checkpoint!r}")
    if cfg.checkpoint and not os.path.exists(cfg.checkpoint):
        raise FileNotFoundError(f"teacher.checkpoint {cfg.checkpoint!r} does not exist")
    checks.choice(cfg.pretrain, "stage", ("pretrain",), prefix="teacher.pretrain.")


def check_teacher_matches(path: str, meta: dict, model_cfg: ml_collections.ConfigDict) -> None:
    """ValueError listing every model setting where a checkpoint's metadata and the config
    differ (settings that do not change the parameters are ignored)."""
    if "model" not in meta:
        return

    def plain(d):
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}

    saved, wanted = plain(meta["model"]), plain(model_cfg.to_dict())
    diff = {k: (saved.get(k), wanted.get(k)) for k in set(saved) | set(wanted)
            if k not in _RUNTIME_MODEL_KEYS and saved.get(k) != wanted.get(k)}
    if diff:
        raise ValueError(
            f"teacher checkpoint {path!r} does not match config.model: "
            + ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}"
                        for k, (a, b) in sorted(diff.items())))


def load_teacher(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
    """The teacher's params: from `teacher.checkpoint`, or pretrained (or reused) in
    <workdir>/teacher."""
    path = config.teacher.checkpoint
    if not path:
        tdir = os.path.join(workdir, "teacher")
        if os.path.isdir(os.path.join(tdir, "export", "params")):
            logging.info("reusing the teacher pretrained in %s", tdir)
            path = os.path.join(tdir, "export")
        else:
            logging.info("no teacher checkpoint given: pretraining one in %s", tdir)
            return pretrain(config.teacher.pretrain, tdir)[0]
    params, meta = load_params(path)
    check_teacher_matches(path, meta, config.model)
    return params
