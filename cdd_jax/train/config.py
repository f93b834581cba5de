"""The `train` and `optim` config sections (the loop and the optimiser) and their validators."""

from __future__ import annotations

import ml_collections

from cdd_jax import config_checks as checks

NONFINITE = ("skip", "halt")
DECAYS = ("cosine", "constant")


def train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_steps = 6000  # Optimiser steps.
    c.log_every = 50  # Steps between scalar logs.
    c.eval_every = 1000  # Steps between held-out evaluations (0: only at start and end).
    c.sample_every = 2000  # Steps between sample grids (0: only at the end).
    c.ckpt_every = 500  # Steps between checkpoints (a final one is always written).
    c.keep_checkpoints = 3  # Checkpoints kept (older ones deleted after a newer one completes).
    c.async_checkpoints = True  # Orbax async saves (the step loop does not wait for the write).
    c.nonfinite = "skip"  # Non-finite loss/gradients: "skip" the update and count it, or "halt".
    c.num_sample_images = 16  # Images in the periodic sample grid.
    c.sample_steps = 50  # DDIM steps for the pretraining sample grid.
    c.profile = False  # Capture a profiler trace of a few steps (clu periodic_actions.Profile).
    return c


def optim_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lr = 2e-4  # Peak AdamW learning rate of the backbone (the U-Net).
    c.new_lr = 2e-4  # Peak learning rate of the control encoder (parameters under `control/`).
    c.warmup_steps = 200  # Linear warm-up steps.
    c.decay = "cosine"  # "cosine" (to final_lr_frac * lr at num_steps) or "constant".
    c.final_lr_frac = 0.1  # Final learning rate as a fraction of the peak (cosine decay).
    c.b1 = 0.9
    c.b2 = 0.99
    c.eps = 1e-8
    c.weight_decay = 0.0  # Decoupled weight decay (AdamW).
    c.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
    return c


def validate_train_config(cfg: ml_collections.ConfigDict) -> None:
    p = "train."
    checks.check_keys(cfg, train_config(), p)
    for key in ("num_steps", "log_every", "ckpt_every", "keep_checkpoints", "sample_steps",
                "num_sample_images"):
        checks.number(cfg, key, 1, integer=True, prefix=p)
    for key in ("eval_every", "sample_every"):
        checks.number(cfg, key, 0, integer=True, prefix=p)
    checks.choice(cfg, "nonfinite", NONFINITE, prefix=p)
    for key in ("async_checkpoints", "profile"):
        checks.boolean(cfg, key, prefix=p)


def validate_optim_config(cfg: ml_collections.ConfigDict) -> None:
    p = "optim."
    checks.check_keys(cfg, optim_config(), p)
    for key in ("lr", "new_lr", "eps"):
        checks.number(cfg, key, 0, lo_open=True, prefix=p)
    checks.number(cfg, "warmup_steps", 0, integer=True, prefix=p)
    checks.choice(cfg, "decay", DECAYS, prefix=p)
    checks.number(cfg, "final_lr_frac", 0, 1, prefix=p)
    for key in ("b1", "b2"):
        checks.number(cfg, key, 0, 1, hi_open=True, prefix=p)
    for key in ("weight_decay", "grad_clip"):
        checks.number(cfg, key, 0, prefix=p)
