"""A toy logically-sharded model and train step, plus a worker for the multi-process test.

Imported by tests/test_parallel.py for the toy model; run as a script it is one process of a
`jax.distributed` job on 127.0.0.1 (see test_multiprocess_matches_single_process).
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

CONV_NAMES = ("conv_h", "conv_w", "channels_in", "channels_out")
WIDTH = 64
GLOBAL_BATCH = 8
IMAGE = 8
NUM_STEPS = 3
LEARNING_RATE = 1e-2


def _part(init, names):
    return nn.with_logical_partitioning(init, names)


class ToyNet(nn.Module):
    """Conv -> GroupNorm -> 2 convs -> dense channel mix -> gated conv out; all params annotated."""

    width: int = WIDTH

    @nn.compact
    def __call__(self, x):
        def conv(features, name):
            return nn.Conv(
                features,
                (3, 3),
                kernel_init=_part(nn.initializers.lecun_normal(), CONV_NAMES),
                bias_init=_part(nn.initializers.normal(0.1), ("channels_out",)),
                name=name,
            )

        h = conv(self.width, "conv_in")(x)
        h = nn.GroupNorm(
            num_groups=8,
            scale_init=_part(nn.initializers.ones, ("norm",)),
            bias_init=_part(nn.initializers.zeros, ("norm",)),
        )(h)
        h = nn.with_logical_constraint(nn.silu(h), ("batch", "height", "width", "channels"))
        h = nn.silu(conv(self.width, "conv_mid1")(h))
        h = nn.with_logical_constraint(h, ("batch", "height", "width", "channels"))
        h = nn.silu(conv(self.width, "conv_mid2")(h))
        h = nn.Dense(
            self.width,
            kernel_init=_part(nn.initializers.lecun_normal(), ("channels_in", "channels_out")),
            bias_init=_part(nn.initializers.zeros, ("channels_out",)),
            name="mix",
        )(h)
        gate = self.param("gate", _part(nn.initializers.constant(0.5), ()), ())
        return gate * conv(x.shape[-1], "conv_out")(h)


MODEL = ToyNet()
TX = optax.adamw(LEARNING_RATE, weight_decay=1e-2)


def init_state(rng):
    """Boxed train state: run under jax.eval_shape for the abstract state."""
    params = MODEL.init(rng, jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
    return {"params": params, "opt": TX.init(params), "step": jnp.zeros((), jnp.int32)}


def loss_fn(params, batch):
    pred = MODEL.apply({"params": params}, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)


def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt = TX.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt": opt, "step": state["step"] + 1}, loss


def make_data(step: int) -> dict[str, np.ndarray]:
    """The global batch for `step` (deterministic, the same in every process)."""
    rs = np.random.RandomState(100 + step)
    x = rs.uniform(-1, 1, (GLOBAL_BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    return {"x": x, "y": np.tanh(2.0 * x[..., ::-1]).astype(np.float32)}


def _worker(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_num_cpu_devices", 2)
    from jax.experimental import multihost_utils
    from ml_collections import ConfigDict

    from cdd_jax.parallel import (
        assert_same_config_across_processes,
        global_batch,
        logical_state_shardings,
        make_mesh,
        maybe_initialize,
        mesh_config,
        sharding_context,
        unbox,
    )

    coordinator = f"127.0.0.1:{port}"
    assert maybe_initialize("auto", coordinator, num_processes, process_id)
    assert maybe_initialize("auto", coordinator, num_processes, process_id)  # second call: no-op
    assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes

    cfg = mesh_config()
    cfg.sizes = (2, -1, 1)
    mesh = make_mesh(cfg)
    rules = cfg.logical_axis_rules
    with sharding_context(mesh, rules):
        abstract = jax.eval_shape(init_state, jax.random.key(0))
        shardings = logical_state_shardings(abstract, mesh, rules, min_shard_bytes=2**12)
        state = jax.jit(lambda r: unbox(init_state(r)), out_shardings=shardings)(jax.random.key(0))
        step = jax.jit(train_step, in_shardings=(shardings, None), out_shardings=(shardings, None))
        losses, rows_ok = [], True
        per_process = GLOBAL_BATCH // num_processes
        for i in range(NUM_STEPS):
            data = make_data(i)
            mine = {
                k: v[process_id * per_process : (process_id + 1) * per_process]
                for k, v in data.items()
            }
            batch = global_batch(mine, mesh)
            full = multihost_utils.process_allgather(batch["x"], tiled=True)
            rows_ok &= bool(np.array_equal(np.asarray(full), data["x"]))
            state, loss = step(state, batch)
            losses.append(float(loss))
        params = multihost_utils.process_allgather(state["params"], tiled=True)

    config = ConfigDict({"model": {"width": 8}, "lr": 1e-3, "mesh": cfg})
    assert_same_config_across_processes(config)
    if process_id == 1:
        config.lr = 2e-3
    try:
        assert_same_config_across_processes(config)
        mismatch = "no error"
    except ValueError as e:
        mismatch = str(e)

    flat = {
        "/".join(str(k.key) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(params)
    }
    np.savez(
        f"{out_dir}/p{process_id}.npz",
        losses=np.asarray(losses),
        rows_ok=rows_ok,
        mismatch=mismatch,
        **flat,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
