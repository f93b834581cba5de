"""GD's unconditional rounds (the paper's "distillation-first" order, Table 1's `gd` row): one
round of progressive / guided distillation of the *unconditional* U-Net, trained on clean crops
with the project's GD objective (`cdd_jax.distill.baselines.gd_loss`, no condition).

The teacher of round 1 is the unconditional teacher; the student of each round starts from its
teacher and teaches the next round. `cdd_jax.stages.table1` then makes the last student
conditional (the conditional network built from it, trained with the diffusion loss).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from cdd_jax.data.pipeline import build_train_dataset
from cdd_jax.diffusion import get_schedule
from cdd_jax.distill.objectives import compute_loss
from cdd_jax.models.apply import unet_apply_fn
from cdd_jax.models.backbone import backbone_from_config, timestep_scale
from cdd_jax.models.unet import init_params
from cdd_jax.parallel.distributed import to_host
from cdd_jax.train.job import Job
from cdd_jax.train.loop import train

PyTree = Any


def unconditional_gd_job(config: ml_collections.ConfigDict, teacher_params: PyTree) -> Job:
    """The Job of one unconditional GD round: the U-Net of `config.model` starts from, and
    distils, `teacher_params` (unboxed U-Net params) with N = `distill.num_grid_steps`."""
    if config.distill.objective != "gd":
        raise ValueError(f"an unconditional GD round trains objective 'gd', got "
                         f"{config.distill.objective!r}")
    if config.model.family == "unet2d_condition":
        raise ValueError("unconditional GD rounds are for pixel-space U-Nets, not latent ones")
    size = config.data.crop_size
    model = backbone_from_config(config.model, size)
    apply_fn = unet_apply_fn(model, timestep_scale(config.model))
    schedule = get_schedule(config.diffusion.schedule)

    def loss_fn(params, target_params, finetuned, batch, rng):
        return compute_loss(apply_fn, params, batch, rng, schedule=schedule, cfg=config.distill,
                            finetuned_params=finetuned,
                            prediction_type=config.diffusion.prediction_type)

    return Job(
        name="gd_unconditional",
        init_params=lambda rng: init_params(model, rng, size),
        loss_fn=loss_fn,
        ema=config.distill.eval_ema,
        initial_params=teacher_params,
        finetuned_params=teacher_params,
        make_dataset=lambda pi, pc: build_train_dataset(config.data, task="pretrain",
                                                        process_index=pi, process_count=pc),
    )


def distill_unconditional(config: ml_collections.ConfigDict, workdir: str,
                          teacher_params: PyTree) -> PyTree:
    """Trains one unconditional GD round in `workdir` (resuming from its checkpoints); returns
    the student's EMA params (U-Net params, the next round's teacher)."""
    state = train(unconditional_gd_job(config, teacher_params), config, workdir)
    return to_host(state.ema_params)
