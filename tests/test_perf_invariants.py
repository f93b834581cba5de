"""Performance invariants that a test can check without timing anything.

- The train step compiles once: the jitted step's cache holds one entry after several steps fed
  with the state it returns (no retrace from weak types, dtypes or shardings drifting between the
  initial state and the step's output), and the training loop compiles `step_fn` exactly once.
- Donation works: donating the state produces no "donated buffers were not usable" warning, and
  the donated input buffers are really consumed (deleted) by the call.
"""

from __future__ import annotations

import warnings

import jax
import jax.monitoring
import numpy as np
import pytest

from cdd_jax.config import presets
from cdd_jax.data.pipeline import build_train_dataset
from cdd_jax.parallel.sharding import sharding_context
from cdd_jax.stages.pretrain import pretrain_job
from cdd_jax.train.builder import build_train_step, compiled_info
from cdd_jax.train.loop import train


def _jitted_step(config):
    """The step as `loop.train` builds it (in/out shardings, donated state), plus its inputs."""
    built = build_train_step(pretrain_job(config)[0], config)
    ds = build_train_dataset(config.data, task="pretrain")
    batches = [built.global_batch(ds[i]) for i in range(3)]
    return built.jitted, built.state, batches, built.mesh


def test_step_jit_cache_stays_at_one_entry_and_donation_is_used():
    config = presets.pretrain_config("tiny")
    jitted, state, batches, mesh = _jitted_step(config)
    rng = jax.random.key(1)
    with (
        warnings.catch_warnings(record=True) as caught,
        sharding_context(mesh, config.mesh.logical_axis_rules),
    ):
        warnings.simplefilter("always")
        for i in range(5):
            old_leaf = jax.tree.leaves(state.params)[0]
            state, metrics = jitted(state, batches[i % len(batches)], rng, None, None)
            jax.block_until_ready(state)
            # The donated input was consumed: its buffer is gone, the output lives on.
            assert old_leaf.is_deleted(), f"step {i}: the donated state was not consumed"
            assert jitted._cache_size() == 1, (
                f"step {i}: the step was traced {jitted._cache_size()} times (retrace: the "
                "state returned by the step differs in type/sharding from its input)"
            )
    assert int(state.step) == 5
    assert np.isfinite(float(metrics["loss"]))
    donation = [str(w.message) for w in caught if "donat" in str(w.message).lower()]
    assert not donation, f"donation warnings: {donation}"


@pytest.fixture
def compile_events():
    """backend compilations of the step function, counted through jax.monitoring."""
    events: list[str] = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(kw.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def test_training_loop_compiles_the_step_once(tmp_path, compile_events):
    config = presets.pretrain_config("tiny")
    config.train.num_steps = 5
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.ckpt_every = 100
    state = train(pretrain_job(config)[0], config, str(tmp_path))
    assert int(state.step) == 5
    step_compiles = [name for name in compile_events if "step_fn" in name]
    assert step_compiles == ["jit(step_fn)"], compile_events


def test_logged_flops_count_every_device():
    """XLA's cost analysis describes the per-device SPMD program: on a data-parallel mesh the
    logged FLOPs per step must be the whole step's, i.e. equal to the one-device program's."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x = np.ones((64, 256), np.float32)
    w = np.ones((256, 128), np.float32)

    def f(x, w):
        return jax.numpy.tanh(x @ w).sum()

    one = jax.jit(f).lower(x, w).compile()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    rep = NamedSharding(mesh, PartitionSpec())
    many = jax.jit(f, in_shardings=(rows, rep), out_shardings=rep).lower(x, w).compile()
    assert jax.device_count() == 8
    a, b = compiled_info(one), compiled_info(many, mesh.size)
    assert b["flops_per_step_per_device"] < 0.2 * a["flops_per_step"]  # really split
    assert b["flops_per_step"] == pytest.approx(a["flops_per_step"], rel=0.02)
