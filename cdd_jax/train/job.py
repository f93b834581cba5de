"""`Job`: what one training stage trains. Everything else (optimiser, mesh, loop) comes from
the config, the same way for pretraining, distillation and the baselines."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

PyTree = Any
# loss_fn(params, target_params, finetuned_params, batch, rng) -> (loss, metrics)
LossFn = Callable[[PyTree, PyTree, PyTree, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass
class Job:
    name: str  # Sub-directory of the workdir and prefix of the logs ("pretrain", "codi", ...).
    init_params: Callable[[jax.Array], PyTree]  # rng -> boxed (logically annotated) params.
    loss_fn: LossFn
    ema: ml_collections.ConfigDict  # Evaluation EMA: decay, warmup.
    target_ema: ml_collections.ConfigDict | None = None  # Target EMA (None: no target).
    freeze_backbone: bool = False  # Only parameters under `control/` train (PE-CoDi).
    initial_params: PyTree = None  # Unboxed params replacing the random init (e.g. teacher).
    finetuned_params: PyTree = None  # Frozen fine-tuned model passed to the loss (CM / GD).
    eval_fn: Callable[[Any], dict[str, float]] | None = None  # state -> held-out scalars.
    sample_fn: Callable[[Any], np.ndarray] | None = None  # state -> uint8 image grid (H, W, 3).
    make_dataset: Callable[[int, int], Any] | None = None  # (process_index, count) -> dataset.
    # Device batch -> the batch the step trains on, applied by the loop before every step (e.g.
    # images encoded into a frozen autoencoder's latent space); deterministic, so a resumed run
    # sees the same batches. None: the batch as the data pipeline made it.
    prepare_batch: Callable[[dict], dict] | None = None
    # Frozen arrays the loss reads besides the networks, by name (e.g. {"vae": VAE params} for a
    # pixel-space d_x): arguments of the step (replicated), not constants of its program, and
    # out of the train state; the loss finds them in `batch["frozen"]`. None: no such inputs.
    frozen_inputs: dict | None = None
