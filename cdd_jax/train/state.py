"""The train state: one pytree with step, parameters, EMA parameters and optimiser state.

Parameters are stored whole (U-Net backbone and control encoder together). Which of them train
is decided by *labels* (`param_labels`): "frozen" leaves get no gradient (they are closed over,
not differentiated) and no optimiser state (optax.multi_transform with set_to_zero keeps none).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # Number of optimiser updates applied.
    params: PyTree  # Online parameters theta.
    ema_params: PyTree  # Evaluation EMA (what samples and checkpoints-for-export use).
    target_params: PyTree  # Target EMA theta^- of CoDi / CM (None when the objective needs none).
    opt_state: PyTree
    nonfinite_steps: jax.Array  # Updates skipped because the loss or gradients were not finite.


def lr_schedule(peak: float, cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    warmup = max(int(cfg.warmup_steps), 0)
    if cfg.decay == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.linear_schedule(0.0, peak, warmup)
    if cfg.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, max(warmup, 1), max(num_steps, warmup + 1), peak * cfg.final_lr_frac
        )
    raise ValueError(f"optim.decay must be 'cosine' or 'constant', got {cfg.decay!r}")


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int, labels: PyTree
                   ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """AdamW with warm-up and clipping, one learning rate per label.

    "frozen" leaves map to `set_to_zero`, which keeps no state; the AdamW states of the other
    labels hold masked placeholders (no arrays) at frozen positions.
    """
    peaks = {"backbone": cfg.lr, "new": cfg.new_lr}
    schedules = {k: lr_schedule(v, cfg, num_steps) for k, v in peaks.items()}

    def adamw(sched):
        return optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

    present = set(jax.tree.leaves(labels))
    transforms = {k: adamw(schedules[k]) for k in peaks if k in present}
    transforms["frozen"] = optax.set_to_zero()
    tx = optax.multi_transform(transforms, labels)
    if cfg.grad_clip and cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedules


# Top-level parts of a parameter tree that never train: the fixed prompt embedding of a
# text-conditioned U-Net (`cdd_jax.models.control`).
ALWAYS_FROZEN = ("text",)


def param_labels(params: PyTree, *, freeze_backbone: bool) -> PyTree:
    """Label each parameter "new" (under `control/`: the control encoder), "backbone" (the
    U-Net), or "frozen" (the U-Net when `freeze_backbone`, as in PE-CoDi; `ALWAYS_FROZEN`)."""

    def label(path, _):
        top = path[0].key if path else ""
        if top in ALWAYS_FROZEN:
            return "frozen"
        if top == "control":
            return "new"
        return "frozen" if freeze_backbone else "backbone"

    return jax.tree_util.tree_map_with_path(label, params)


def split_trainable(params: PyTree, labels: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen) with None in place of the other's leaves; `merge` undoes it."""
    trainable = jax.tree.map(lambda p, lab: None if lab == "frozen" else p, params, labels)
    frozen = jax.tree.map(lambda p, lab: p if lab == "frozen" else None, params, labels)
    return trainable, frozen


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen,
                        is_leaf=lambda x: x is None)


def count_params(tree: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def create_state(params: PyTree, tx: optax.GradientTransformation, *,
                 with_target: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        target_params=params if with_target else None,
        opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )

