"""One entry point over the objectives, so the train step does not branch on the method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from cdd_jax.diffusion import Schedule
from cdd_jax.distill.baselines import cm_loss, gd_loss
from cdd_jax.distill.codi import ApplyFn, codi_loss
from cdd_jax.distill.config import OBJECTIVES
from cdd_jax.distill.diffusion_loss import diffusion_loss

# Which extra parameter sets each objective reads (besides the online params).
NEEDS_TARGET = frozenset({"codi", "pe_codi", "cm"})  # theta_minus: the target EMA
NEEDS_TEACHER = frozenset({"cm", "gd"})  # frozen fine-tuned teacher


def needs_target(objective: str) -> bool:
    """Whether `objective` uses a target EMA theta_minus."""
    _check(objective)
    return objective in NEEDS_TARGET


def needs_teacher(objective: str) -> bool:
    """Whether `objective` uses a frozen teacher."""
    _check(objective)
    return objective in NEEDS_TEACHER


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {OBJECTIVES}")


def compute_loss(
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    cfg: ml_collections.ConfigDict,
    target_params: Any = None,
    teacher_params: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of `cfg.objective` ("pe_codi" is the CoDi loss; the trainer freezes the backbone)."""
    objective = cfg.objective
    _check(objective)
    if objective in NEEDS_TARGET and target_params is None:
        raise ValueError(f"objective {objective!r} needs target_params (the target EMA)")
    if objective in NEEDS_TEACHER and teacher_params is None:
        raise ValueError(f"objective {objective!r} needs teacher_params")
    if objective in ("codi", "pe_codi"):
        return codi_loss(apply_fn, params, target_params, batch, rng, schedule=schedule, cfg=cfg)
    if objective == "finetune":
        return diffusion_loss(
            apply_fn,
            params,
            batch,
            rng,
            schedule=schedule,
            weighting=cfg.diffusion_weighting,
            snr_gamma=cfg.snr_gamma,
        )
    if objective == "cm":
        return cm_loss(
            apply_fn, params, target_params, teacher_params, batch, rng, schedule=schedule, cfg=cfg
        )
    return gd_loss(apply_fn, params, teacher_params, batch, rng, schedule=schedule, cfg=cfg)
