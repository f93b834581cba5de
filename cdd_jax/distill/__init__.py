"""Distillation objectives: the CoDi loss (paper Algorithm 1), the diffusion loss, baselines."""

from cdd_jax.distill.baselines import (
    cm_loss,
    cm_scalings,
    consistency_fn,
    gd_loss,
    gd_target,
)
from cdd_jax.distill.codi import (
    as_model_fn,
    codi_loss,
    distance,
    eps_weight,
    prev_predictor,
    sample_codi_times,
    unpack_batch,
)
from cdd_jax.distill.config import diffusion_config, distill_config, validate_distill_config
from cdd_jax.distill.diffusion_loss import diffusion_loss, v_space_weight
from cdd_jax.distill.direct_cm import direct_cm_loss, teacher_ode_solve
from cdd_jax.distill.ema import ema_decay, ema_update
from cdd_jax.distill.objectives import Objective, compute_loss, objective_spec
from cdd_jax.distill.sampling import (
    consistency_sample,
    few_step_sample,
    sampling_grid,
    solver_sample,
)

__all__ = [
    "Objective",
    "as_model_fn",
    "cm_loss",
    "cm_scalings",
    "codi_loss",
    "compute_loss",
    "consistency_fn",
    "consistency_sample",
    "diffusion_loss",
    "direct_cm_loss",
    "distance",
    "diffusion_config",
    "distill_config",
    "ema_decay",
    "ema_update",
    "eps_weight",
    "few_step_sample",
    "gd_loss",
    "gd_target",
    "objective_spec",
    "prev_predictor",
    "sample_codi_times",
    "sampling_grid",
    "solver_sample",
    "teacher_ode_solve",
    "unpack_batch",
    "v_space_weight",
    "validate_distill_config",
]
