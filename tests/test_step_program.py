"""The compiled train step's program grows linearly with the number of parameter leaves (issue 19,
acceptance 7). XLA:CPU's fusion copies cheap scalar producers into every kernel that reads them;
the step's finiteness flag (one AND per gradient leaf), read by a select per leaf, made the
default job's step quadratic in its ~300 leaves: minutes and GBs of compile."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from cdd_jax.distill.config import ema_config
from cdd_jax.train.config import optim_config
from cdd_jax.train.state import create_state, make_optimizer, param_labels
from cdd_jax.train.step import make_train_step


def _step(n_leaves: int):
    params = {f"w{i}": jnp.full((3,), 0.1 * i) for i in range(n_leaves)}
    labels = param_labels(params, freeze_backbone=False)
    tx, _ = make_optimizer(optim_config(), 10, labels)

    def loss_fn(p, target_params, finetuned, batch, rng):
        return sum(jnp.sum((w - batch["x"]) ** 2) for w in jax.tree.leaves(p)), {}

    step = jax.jit(make_train_step(loss_fn, tx, labels, ema=ema_config(0.999, "power"),
                                   target_ema=ema_config(0.99, "none")))
    return step, create_state(params, tx, with_target=True)


def test_finiteness_flag_is_computed_once_not_copied_into_each_leaf_update():
    n = 40
    step, state = _step(n)
    hlo = step.lower(state, {"x": jnp.ones((3,))}, jax.random.key(0)).compile().as_text()
    ands = len(re.findall(r"= pred\[\] and\(", hlo))
    # One chain of n ANDs (the loss and each leaf); copied into the ~6 selects of each leaf it
    # was ~6 n^2.
    assert n - 1 <= ands <= 2 * n, ands


def test_the_flag_still_gates_the_update():
    step, state = _step(4)
    s1, m1 = step(state, {"x": jnp.ones((3,))}, jax.random.key(0))
    s2, m2 = step(s1, {"x": jnp.full((3,), jnp.nan)}, jax.random.key(1))
    assert float(m1["finite"]) == 1.0 and float(m2["finite"]) == 0.0
    assert float(m2["grad_norm"]) == 0.0 and int(s2.nonfinite_steps) == 1 and int(s2.step) == 2
    for a, b in zip(jax.tree.leaves((s1.params, s1.ema_params, s1.target_params, s1.opt_state)),
                    jax.tree.leaves((s2.params, s2.ema_params, s2.target_params, s2.opt_state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
