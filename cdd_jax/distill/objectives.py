"""The objectives by name: what each one reads and trains, and one entry point over their losses.

This table is the only place that decodes `distill.objective`: the stage wiring asks it whether
a target EMA or a fine-tuned model is needed and whether the backbone is frozen, and the train
step calls `compute_loss` without branching on the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from cdd_jax.diffusion import Schedule
from cdd_jax.distill.baselines import cm_loss, gd_loss
from cdd_jax.distill.codi import ApplyFn, codi_loss
from cdd_jax.distill.config import OBJECTIVES
from cdd_jax.distill.diffusion_loss import diffusion_loss
from cdd_jax.distill.direct_cm import direct_cm_loss


@dataclasses.dataclass(frozen=True)
class Objective:
    uses_target: bool  # reads the target EMA theta_minus
    uses_finetuned: bool  # reads a frozen fine-tuned conditional model (CM / GD teacher)
    freeze_backbone: bool  # only the control encoder trains (PE-CoDi)


_TABLE = {
    "codi": Objective(uses_target=True, uses_finetuned=False, freeze_backbone=False),
    "pe_codi": Objective(uses_target=True, uses_finetuned=False, freeze_backbone=True),
    "finetune": Objective(uses_target=False, uses_finetuned=False, freeze_backbone=False),
    "cm": Objective(uses_target=True, uses_finetuned=True, freeze_backbone=False),
    "gd": Objective(uses_target=False, uses_finetuned=True, freeze_backbone=False),
    "direct_cm": Objective(uses_target=False, uses_finetuned=True, freeze_backbone=False),
}
assert set(_TABLE) == set(OBJECTIVES)


def objective_spec(name: str) -> Objective:
    """What objective `name` reads and trains; ValueError for an unknown name."""
    if name not in _TABLE:
        raise ValueError(f"unknown objective {name!r}; valid: {OBJECTIVES}")
    return _TABLE[name]


def compute_loss(
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    cfg: ml_collections.ConfigDict,
    target_params: Any = None,
    finetuned_params: Any = None,
    prediction_type: str = "v_prediction",
    decode: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of `cfg.objective` ("pe_codi" is the CoDi loss; the trainer freezes the backbone),
    with the network read in its `prediction_type` (the teacher's, `diffusion.prediction_type`).
    `decode(batch, latents) -> images`: CoDi's pixel-space d_x for a latent teacher."""
    objective = cfg.objective
    spec = objective_spec(objective)
    if spec.uses_target and target_params is None:
        raise ValueError(f"objective {objective!r} needs target_params (the target EMA)")
    if spec.uses_finetuned and finetuned_params is None:
        raise ValueError(f"objective {objective!r} needs finetuned_params")
    if objective in ("codi", "pe_codi"):
        return codi_loss(apply_fn, params, target_params, batch, rng, schedule=schedule, cfg=cfg,
                         prediction_type=prediction_type, decode=decode)
    if objective == "finetune":
        return diffusion_loss(apply_fn, params, batch, rng, schedule=schedule,
                              weighting=cfg.diffusion_weighting, snr_gamma=cfg.snr_gamma,
                              prediction_type=prediction_type)
    kw = dict(schedule=schedule, cfg=cfg, prediction_type=prediction_type)
    if objective == "cm":
        return cm_loss(apply_fn, params, target_params, finetuned_params, batch, rng, **kw)
    if objective == "direct_cm":
        return direct_cm_loss(apply_fn, params, finetuned_params, batch, rng, **kw)
    return gd_loss(apply_fn, params, finetuned_params, batch, rng, **kw)
