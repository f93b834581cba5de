"""Pure diffusion math (jax + numpy only): VP noise schedules, x/eps/v conversions, samplers."""

from cdd_jax.diffusion.parameterization import (
    LOSS_WEIGHTS,
    add_noise,
    bcast,
    eps_from_v,
    eps_from_x,
    loss_weight,
    v_from_eps,
    v_from_x,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
)
from cdd_jax.diffusion.samplers import (
    SAMPLERS,
    ddim_step,
    dpmpp_2m_step,
    released_grid,
    sample,
    time_grid,
)
from cdd_jax.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    ScaledLinearSchedule,
    Schedule,
    get_schedule,
)

__all__ = [
    "LOSS_WEIGHTS",
    "SAMPLERS",
    "SCHEDULES",
    "CosineSchedule",
    "LinearSchedule",
    "ScaledLinearSchedule",
    "Schedule",
    "add_noise",
    "bcast",
    "ddim_step",
    "dpmpp_2m_step",
    "eps_from_v",
    "eps_from_x",
    "get_schedule",
    "loss_weight",
    "released_grid",
    "sample",
    "time_grid",
    "v_from_eps",
    "v_from_x",
    "v_from_x_eps",
    "x_from_eps",
    "x_from_v",
]
