"""`mesh.num_cpu_devices`: splitting the host CPU into one XLA device per core.

The count arithmetic is checked here; applying it needs JAX's backends not yet started, so those
checks run in fresh processes (this test process already runs 8 simulated devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cdd_jax.parallel.mesh import resolve_num_cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "requested, batch, cores, expected",
    [
        (0, 32, 2, 0),  # leave JAX's default
        (3, 32, 2, 3),  # an explicit count is taken as given
        (-1, 32, 2, 2),
        (-1, 32, 3, 2),  # 3 does not divide 32: the largest divisor below
        (-1, 36, 6, 6),
        (-1, 32, 64, 32),  # never more devices than examples
        (-1, 7, 4, 1),  # a prime batch: one device
        (-1, 8, 1, 1),
    ],
)
def test_resolve_num_cpu_devices(requested, batch, cores, expected):
    assert resolve_num_cpu_devices(requested, batch, cores=cores) == expected
    if expected > 0 and requested == -1:
        assert batch % expected == 0 and expected <= cores


@pytest.mark.parametrize("bad", [-2, "2", 1.5, True])
def test_resolve_num_cpu_devices_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="mesh.num_cpu_devices"):
        resolve_num_cpu_devices(bad, 32, cores=2)


def _fresh(code: str, **env) -> dict:
    """Runs `code` in a fresh interpreter without the test session's device flags; the last
    stdout line is JSON."""
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    clean.update({"JAX_PLATFORMS": "cpu", **env})
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_splits_the_cpu_before_backends_start():
    r = _fresh(
        """
        import json, jax
        from cdd_jax.parallel.mesh import configure_cpu_devices
        n = configure_cpu_devices(3, batch_size=12)
        print(json.dumps({"set": n, "devices": jax.local_device_count()}))
        """
    )
    assert r == {"set": 3, "devices": 3}


def test_configure_leaves_an_explicit_environment_setting_alone():
    r = _fresh(
        """
        import json, jax
        from cdd_jax.parallel.mesh import configure_cpu_devices
        n = configure_cpu_devices(3, batch_size=12)
        print(json.dumps({"set": n, "devices": jax.local_device_count()}))
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert r == {"set": None, "devices": 2}


def test_configure_after_backends_started_changes_nothing():
    r = _fresh(
        """
        import json, jax
        from cdd_jax.parallel.mesh import configure_cpu_devices
        before = jax.local_device_count()
        n = configure_cpu_devices(2, batch_size=8)
        print(json.dumps({"set": n, "before": before, "devices": jax.local_device_count()}))
        """
    )
    assert r == {"set": None, "before": 1, "devices": 1}


def test_train_and_evaluate_applies_it_before_validation():
    """The count is applied first: validate_config's mesh check would start the backends."""
    r = _fresh(
        """
        import json, jax, tempfile
        import cdd_jax
        from cdd_jax.config import presets
        c = presets.pretrain_config("tiny")
        c.mesh.num_cpu_devices = 2
        c.train.nonfinite = "sometimes"  # invalid: stops before anything compiles
        try:
            cdd_jax.train_and_evaluate(c, tempfile.mkdtemp())
            err = None
        except ValueError as e:
            err = str(e)
        print(json.dumps({"devices": jax.local_device_count(), "error": err}))
        """
    )
    assert r["devices"] == 2
    assert "train.nonfinite" in r["error"]


def test_the_default_presets_use_one_device_per_core():
    from cdd_jax.config import presets

    assert presets.sr_config("default").mesh.num_cpu_devices == -1
    assert presets.pretrain_config("default").mesh.num_cpu_devices == -1
    # The published Table 1 was made on one device and keeps it; tests and accelerators: 0.
    assert presets.table1_config("default").mesh.num_cpu_devices == 0
    assert presets.sr_config("tiny").mesh.num_cpu_devices == 0
    assert presets.sr_config("large").mesh.num_cpu_devices == 0


def test_a_checkpoint_written_on_two_devices_loads_on_one(tmp_path):
    """What the default CPU presets now write (a 2-device mesh) must load anywhere: teacher
    loading and the benchmarks restore it with `load_params` in other processes."""
    code = """
        import json, sys, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from cdd_jax.parallel.mesh import make_mesh
        from cdd_jax.parallel.config import mesh_config
        from cdd_jax.train.checkpoint import Checkpointer, export_params, load_params
        d = sys.argv[1]
        if sys.argv[2] == "write":
            mesh = make_mesh(mesh_config())  # (-1, 1, 1): all devices on "data"
            rep = NamedSharding(mesh, P())
            rows = NamedSharding(mesh, P("data"))
            w = jnp.arange(12.0).reshape(4, 3)
            state = {"ema_params": {"w": jax.device_put(w, rep), "b": jax.device_put(w[0], rep)},
                     "params": {"w": jax.device_put(w + 1, rows)}}
            ck = Checkpointer(d + "/run/checkpoints", async_save=False)
            ck.save(7, state, {}, {"note": "two devices"})
            ck.close()
            export_params(d + "/exported", state["ema_params"], {"k": 1})
            print(json.dumps({"devices": jax.device_count()}))
        else:
            p1, meta1 = load_params(d + "/run")
            p2, meta2 = load_params(d + "/exported")
            print(json.dumps({"devices": jax.device_count(), "step": meta1["step"],
                              "w": np.asarray(p1["w"]).tolist(), "b": np.asarray(p1["b"]).tolist(),
                              "w2": np.asarray(p2["w"]).tolist(), "meta": meta2}))
        """
    body = textwrap.dedent(code)
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    results = []
    for mode, n in (("write", "2"), ("read", "1")):
        out = subprocess.run(
            [sys.executable, "-c", body, str(tmp_path), mode],
            cwd=REPO,
            env={**clean, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": n},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    wrote, read = results
    assert wrote == {"devices": 2} and read["devices"] == 1
    w = [[3.0 * i + j for j in range(3)] for i in range(4)]
    assert read["step"] == 7 and read["w"] == w and read["b"] == w[0]
    assert read["w2"] == w and read["meta"] == {"k": 1}
