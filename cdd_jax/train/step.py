"""The jitted train step: `(state, batch, rng) -> (state, metrics)`, a pure function.

One step = objective -> gradients of the trainable parameters only -> clipped AdamW update ->
EMA updates (evaluation EMA and, for consistency-style objectives, the target EMA). A step whose
loss or gradients are not finite leaves parameters, EMAs and optimiser state untouched; it still
advances `step` (so the data and the per-step randomness move on) and is counted in
`nonfinite_steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cdd_jax.distill.ema import ema_decay, ema_update
from cdd_jax.train.job import LossFn
from cdd_jax.train.state import TrainState, merge, split_trainable

PyTree = Any


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _computed_once(flag: jax.Array) -> jax.Array:
    """`flag` (a boolean scalar), unchanged, as the output of one kernel that its readers share.

    XLA:CPU's instruction fusion copies cheap producers (an AND, a compare) into every consumer
    kernel and drops `jax.lax.optimization_barrier`; it does not copy ops it counts as expensive,
    a float square root among them. `_all_finite` is one AND per gradient leaf and ~1000 per-leaf
    selects read it, so without this the step's program grew with the square of the leaf count
    (minutes and GBs of compile for the default job; BUILD_NOTES.md section 12, acceptance 7).
    sqrt is exact on 0 and 1."""
    return jnp.sqrt(flag.astype(jnp.float32)) > 0.5


def _select(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _decay(cfg: Any, step: jax.Array) -> jax.Array:
    return ema_decay(step, cfg.decay, cfg.warmup, power=cfg.get("power", 2.0 / 3.0),
                     inv_gamma=cfg.get("inv_gamma", 1.0))


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    labels: PyTree,
    *,
    ema: Any,
    target_ema: Any | None = None,
    lr_schedules: dict[str, optax.Schedule] | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Builds the step. `ema` / `target_ema` are config sections with `decay` and `warmup`."""

    def train_step(state: TrainState, batch: dict, rng: jax.Array,
                   finetuned_params: PyTree = None, frozen_inputs: dict | None = None):
        trainable, frozen = split_trainable(state.params, labels)
        if frozen_inputs is not None:  # `Job.frozen_inputs`, read by the loss as batch["frozen"]
            batch = {**batch, "frozen": frozen_inputs}

        def objective(tr):
            return loss_fn(merge(tr, frozen), state.target_params, finetuned_params, batch, rng)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        grads = merge(grads, jax.tree.map(jnp.zeros_like, frozen))
        ok = _computed_once(jnp.isfinite(loss) & _all_finite(grads))
        grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)  # keep the update finite
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        step = state.step + 1
        ema_params = ema_update(state.ema_params, params, _decay(ema, state.step))
        target_params = state.target_params
        if target_params is not None:
            decay = _decay(target_ema, state.step)
            target_params = ema_update(target_params, params, decay)

        new_state = state.replace(
            step=step,
            params=_select(ok, params, state.params),
            ema_params=_select(ok, ema_params, state.ema_params),
            target_params=None if target_params is None else _select(ok, target_params,
                                                                     state.target_params),
            opt_state=_select(ok, opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~ok).astype(jnp.int32),
        )
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), finite=ok.astype(jnp.float32))
        for name, sched in (lr_schedules or {}).items():
            metrics[f"lr_{name}"] = sched(state.step)
        return new_state, metrics

    return train_step
