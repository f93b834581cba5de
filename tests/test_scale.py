"""Scaling out on the real training code (issue 5): the tiny pretraining and CoDi jobs, run through
`cdd_jax.train_and_evaluate` -> `stages.pretrain` / `stages.distill` -> `loop.train`, on simulated
meshes, across checkpoints moved between meshes, and across two `jax.distributed` processes.

The sharded runs happen in this process (8 simulated devices); they change nothing in the loop,
only record the mesh, the scalars the loop writes and the compiled step it logs, and drop the
evaluation/sample hooks (those read the state but never change it; they only cost compiles). The
one-device references are real command lines (`tests/scale_worker.py`, i.e. `cdd_jax.main`) in a
process that has a single device, compared through what they write: logged losses, compiled-step
memory and the final checkpoint. Every run compiles the real U-Net step, which takes tens of
seconds on two CPU cores, so all but the early-error checks are `slow` (CI runs them all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from clu import metric_writers

import cdd_jax
from cdd_jax.config.presets import pretrain_config, sr_config
from cdd_jax.models.backbone import backbone_from_config
from cdd_jax.models.unet import init_params
from cdd_jax.parallel.sharding import logical_state_shardings, unbox
from cdd_jax.stages import distill as distill_stage
from cdd_jax.stages import pretrain as pretrain_stage
from cdd_jax.train import builder, loop
from cdd_jax.train.checkpoint import ITEMS, export_params

REPO = Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1)]
NUM_STEPS = 3
TOL = 1e-5  # Acceptance: relative error of losses and parameters vs one device.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Wall-clock bound of each launched job (a few compiles of the tiny U-Net; generous for a busy
# two-core machine) and of each slow test (several such jobs).
SUBPROCESS_TIMEOUT = 900
SLOW_TEST_TIMEOUT = 2400


# ----------------------------------------------------------------------------------------------
# Instrumented runs of the real stages
# ----------------------------------------------------------------------------------------------


class _StopAfterTrain(Exception):
    """Ends a stage right after `loop.train` returns (skips export and final evaluation)."""


@dataclasses.dataclass
class Run:
    state: Any  # The TrainState `loop.train` returned (arrays on the run's mesh).
    losses: dict[int, float]  # step -> loss, as the loop wrote it (log_every=1).
    compiled: Any  # The ahead-of-time compiled step the loop ran.
    mesh: jax.sharding.Mesh
    declared: Any  # logical_state_shardings of the job's boxed parameters on `mesh`.
    config: Any


def _config(stage: str, sizes, *, num_steps: int = NUM_STEPS, teacher: str = ""):
    """The tiny config of `stage` on mesh `sizes`, every parameter eligible for sharding.

    min_shard_bytes=0: the tiny U-Net's tensors are all below the 64 KiB default, which would
    replicate everything and make the sharded runs trivially equal to one device.
    """
    config = pretrain_config("tiny") if stage == "pretrain" else sr_config("tiny")
    config.mesh.sizes = tuple(sizes)
    config.mesh.min_shard_bytes = 0
    config.train.num_steps = num_steps
    config.train.log_every = 1
    if stage == "codi":
        config.teacher.checkpoint = teacher
    return config


def run_stage(config, workdir) -> Run:
    """Runs `cdd_jax.train_and_evaluate(config, workdir)` up to the end of `loop.train`."""
    rec: dict[str, Any] = {"scalars": {}}
    real_make_mesh, real_log = builder.make_mesh, loop.log_step_info
    real_writer = metric_writers.create_default_writer

    def make_mesh(mesh_cfg, devices=None):
        rec["mesh"] = real_make_mesh(mesh_cfg, devices)
        return rec["mesh"]

    def log_step_info(step, name):
        rec["compiled"] = step.compiled
        return real_log(step, name)

    def create_writer(*args, **kwargs):
        writer = real_writer(*args, **kwargs)
        write_scalars = writer.write_scalars

        def record(step, scalars):
            rec["scalars"].setdefault(int(step), {}).update(scalars)
            return write_scalars(step, scalars)

        writer.write_scalars = record
        return writer

    def train(job, cfg, wdir):
        boxed = jax.eval_shape(job.init_params, jax.random.key(0))
        rec["state"] = loop.train(dataclasses.replace(job, eval_fn=None, sample_fn=None), cfg, wdir)
        rec["declared"] = logical_state_shardings(
            boxed, rec["mesh"], cfg.mesh.logical_axis_rules, cfg.mesh.min_shard_bytes
        )
        raise _StopAfterTrain

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builder, "make_mesh", make_mesh)
        mp.setattr(loop, "log_step_info", log_step_info)
        mp.setattr(metric_writers, "create_default_writer", create_writer)
        mp.setattr(pretrain_stage, "train", train)
        mp.setattr(distill_stage, "train", train)
        with pytest.raises(_StopAfterTrain):
            cdd_jax.train_and_evaluate(config, str(workdir))
    losses = {s: float(v["loss"]) for s, v in rec["scalars"].items() if "loss" in v}
    return Run(rec["state"], losses, rec["compiled"], rec["mesh"], rec["declared"], config)


@dataclasses.dataclass
class Reference:
    """A one-device run of the same job, as it left its workdir."""

    workdir: Path  # Where the stage's loop wrote (the `distill/` sub-directory for CoDi).
    losses: dict[int, float]
    argument_bytes: int  # memory_analysis().argument_size_in_bytes of its compiled step.

    def state(self, like=None) -> Any:
        """The final checkpoint's train state, laid out like `like` (see `_restore`)."""
        return _restore(self.workdir / "checkpoints", NUM_STEPS, like)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Memoised in-process runs: runs(stage, sizes) -> Run (one compile per combination)."""
    cache: dict[tuple, Run] = {}

    def get(stage: str, sizes) -> Run:
        key = (stage, tuple(sizes))
        if key not in cache:
            teacher = _random_teacher(tmp_path_factory) if stage == "codi" else ""
            config = _config(stage, sizes, teacher=teacher)
            name = f"{stage}_{'x'.join(map(str, sizes))}"
            cache[key] = run_stage(config, tmp_path_factory.mktemp(name))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Memoised one-device references: reference(stage) -> Reference.

    `python tests/scale_worker.py ... --config=configs/<stage>.py:tiny` in a fresh process with
    one CPU device (mesh (1, 1, 1)), the same config overrides as `_config`, stopped when
    `loop.train` returns (its final checkpoint is written by then).
    """
    cache: dict[str, Reference] = {}

    def get(stage: str) -> Reference:
        if stage not in cache:
            workdir = tmp_path_factory.mktemp(f"{stage}_one_device")
            flags = [
                f"--config=configs/{'pretrain' if stage == 'pretrain' else 'sr'}.py:tiny",
                f"--workdir={workdir}",
                "--config.mesh.sizes=(1,1,1)",
                "--config.mesh.min_shard_bytes=0",
                f"--config.train.num_steps={NUM_STEPS}",
                "--config.train.log_every=1",
            ]
            if stage == "codi":
                flags.append(f"--config.teacher.checkpoint={_random_teacher(tmp_path_factory)}")
            env = _subprocess_env(1) | {
                "SCALE_WORKER_NO_EVAL": "1",
                "SCALE_WORKER_STOP_AFTER_TRAIN": "1",
            }
            cmd = [sys.executable, str(REPO / "tests" / "scale_worker.py"), "-", *flags]
            _launch([cmd], env, [workdir.parent / f"{workdir.name}.log"])
            loop_dir = workdir if stage == "pretrain" else workdir / "distill"
            arg_bytes = _logged(loop_dir, "argument_size_in_bytes")
            cache[stage] = Reference(
                loop_dir, _logged(loop_dir, "loss"), int(arg_bytes[min(arg_bytes)])
            )
        return cache[stage]

    return get


def _random_teacher(tmp_path_factory) -> str:
    """An exported random tiny teacher without all-zero tensors (CoDi starts its student from it).

    A fresh U-Net has zero-initialised output layers (attention projections, the last conv of
    each residual block); a trained teacher has none. Starting CoDi from such zeros would make
    those student tensors, after three steps, nothing but three Adam updates, so their relative
    error would measure float32 cancellation in their gradients (a sum over the batch whose order
    the batch split changes), not the sharding. Every tensor gets N(0, 0.02^2) added instead.
    The student's own zero-initialised control-encoder tensors (gates, input conv) are still
    compared.
    """
    path = tmp_path_factory.getbasetemp() / "random_teacher"
    if not path.exists():
        model_cfg = sr_config("tiny").model
        model = backbone_from_config(model_cfg, sr_config("tiny").data.crop_size)
        params = unbox(init_params(model, jax.random.key(42), sr_config("tiny").data.crop_size))
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(43), len(leaves))
        leaves = [
            x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
        params = jax.tree.unflatten(treedef, leaves)
        export_params(str(path), jax.device_get(params), {"model": model_cfg.to_dict()})
    return str(path)


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------


def _by_path(tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Attention key biases have no gradient: adding b to every key adds q.b to every logit of a query,
# which the softmax over keys ignores. What reaches them is roundoff of a sum whose order depends on
# the mesh, and Adam rescales that noise into real (tiny) steps, so these leaves cannot agree across
# meshes and are checked for being gradient-free instead of compared.
GRADIENT_FREE = "['to_k']['bias']"


def _norm(leaves) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves)))


def assert_states_close(got, want, tol: float = TOL) -> None:
    """Every leaf (params, EMA, target, Adam moments, counters) within `tol` relative error.

    Except the gradient-free key biases: there both runs' Adam first moments must be roundoff
    (<= 1e-6 of the first moments' overall norm), which is what makes them incomparable.
    """
    g, w = _by_path(got), _by_path(want)
    assert g.keys() == w.keys()
    free = {k for k in w if k.endswith(GRADIENT_FREE)}
    for run in (g, w):
        mu = [k for k in run if ".mu[" in k]
        free_mu = [k for k in mu if k in free]
        if free_mu:
            ratio = _norm(run[k] for k in free_mu) / _norm(run[k] for k in mu)
            assert ratio <= 1e-6, ("key-bias gradient is not roundoff", ratio)
    errors = {k: _rel_err(g[k], w[k]) for k in w if k not in free}
    worst = sorted(errors, key=errors.get, reverse=True)[:5]
    report = [(k, errors[k], float(np.linalg.norm(np.asarray(w[k], np.float64)))) for k in worst]
    assert errors[worst[0]] <= tol, report  # (leaf, relative error, norm); step counter included


def assert_losses_close(got: dict[int, float], want: dict[int, float]) -> None:
    """The loss of every step (steps 1..NUM_STEPS, each logged on its own) within TOL."""
    assert sorted(got) == sorted(want) == list(range(1, NUM_STEPS + 1))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= TOL * abs(loss), (step, got[step], loss)


def assert_declared_shardings_used(r: Run) -> None:
    """Params, EMA, target and Adam moments carry the shardings declared from logical names.

    And the compiled step takes exactly these layouts, so nothing is resharded on the way in.
    """
    declared = _by_path(r.declared)
    assert declared, "no parameters"
    for name in ("params", "ema_params", "target_params"):
        tree = getattr(r.state, name)
        if tree is None:
            continue
        leaves = _by_path(tree)
        assert leaves.keys() == declared.keys(), name
        for path, x in leaves.items():
            assert x.sharding.is_equivalent_to(declared[path], x.ndim), (name, path)
    params = _by_path(r.state.params)
    n_moments = 0
    for path, x in _by_path(r.state.opt_state).items():
        if x.ndim == 0:  # step counts
            assert x.sharding.is_fully_replicated, path
            continue
        owner = max((p for p in declared if path.endswith(p)), key=len)  # longest suffix
        assert x.shape == params[owner].shape, (path, owner)
        assert x.sharding.is_equivalent_to(declared[owner], x.ndim), (path, owner)
        n_moments += 1
    assert n_moments == 2 * len(declared)  # Adam's mu and nu; every parameter trains here
    in_state = r.compiled.input_shardings[0][0]
    for s, x in zip(jax.tree.leaves(in_state), jax.tree.leaves(r.state), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)


def state_bytes(argument_bytes: int, config, data_parallel: int) -> int:
    """Train-state bytes on one device, from the compiled step's argument_size_in_bytes.

    memory_analysis counts every argument of the (pretraining) step on one device: the state, this
    device's shard of the image batch and the rng key; the last two are subtracted.
    """
    size = config.data.crop_size
    batch_bytes = config.data.batch_size // data_parallel * size * size * 3 * 4
    key_bytes = jax.random.key_data(jax.random.key(0)).nbytes
    return int(argument_bytes) - batch_bytes - key_bytes


# ----------------------------------------------------------------------------------------------
# 1. Sharded steps == one device; declared shardings; FSDP memory
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT)
def test_fsdp_pretraining_matches_one_device_and_cuts_memory(runs, reference):
    """Tiny pretraining, FSDP over 8 devices (mesh (1, 8, 1)) vs the one-device run.

    Three steps give the same losses and state (rel. err <= 1e-5); the arrays and the compiled
    step use the shardings declared from the logical axis names; and per device the state
    (parameters, EMA and Adam moments) takes at most 1/6 of the replicated bytes, measured by
    XLA's memory_analysis of the compiled step. min_shard_bytes=0 (see `_config`): with the 64 KiB
    default every tensor of the tiny U-Net stays replicated and the ratio would be 1.
    """
    one, fsdp = reference("pretrain"), runs("pretrain", (1, 8, 1))
    assert dict(fsdp.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert_losses_close(fsdp.losses, one.losses)
    assert_states_close(fsdp.state, one.state(fsdp.state))
    assert_declared_shardings_used(fsdp)
    # XLA's count agrees with the arrays: all of the state on one device, a shard of it with FSDP.
    replicated_bytes = state_bytes(one.argument_bytes, fsdp.config, 1)
    assert replicated_bytes == sum(x.nbytes for x in jax.tree.leaves(fsdp.state))
    fsdp_bytes = state_bytes(fsdp.compiled.memory_analysis().argument_size_in_bytes, fsdp.config, 8)
    assert fsdp_bytes == sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(fsdp.state)
    )
    assert fsdp_bytes <= replicated_bytes / 6, (fsdp_bytes, replicated_bytes)
    # Not trivially true: most parameter bytes really are split 8 ways.
    params = jax.tree.leaves(fsdp.state.params)
    split = sum(x.nbytes for x in params if x.addressable_shards[0].data.size * 8 == x.size)
    assert split >= 0.8 * sum(x.nbytes for x in params)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT)
@pytest.mark.parametrize(
    "stage, sizes",
    [("pretrain", s) for s in MESHES if s != (1, 8, 1)] + [("codi", s) for s in MESHES],
)
def test_sharded_steps_match_one_device(runs, reference, stage, sizes):
    """Three steps of the tiny pretraining / CoDi job on each mesh == on one device."""
    one, sharded = reference(stage), runs(stage, sizes)
    assert dict(sharded.mesh.shape) == dict(zip(("data", "fsdp", "tensor"), sizes, strict=True))
    assert_losses_close(sharded.losses, one.losses)
    assert_states_close(sharded.state, one.state(sharded.state))
    assert_declared_shardings_used(sharded)
    if stage == "codi":  # the target EMA theta^- of CoDi is part of the compared state
        assert sharded.state.target_params is not None


# ----------------------------------------------------------------------------------------------
# 2. A checkpoint written on a (2, 4) mesh resumes on 4 devices as (2, 2)
# ----------------------------------------------------------------------------------------------


def _restore(checkpoints: Path, step: int, like=None) -> Any:
    """The train state of checkpoint `step`, laid out like the state `like`.

    Without `like`: a dict of arrays on this process's first device (shapes from the metadata).
    """
    if like is None:
        meta = ocp.StandardCheckpointer().metadata(checkpoints / str(step) / "state")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), meta.item_metadata
        )
    else:
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
        )
    manager = ocp.CheckpointManager(
        str(checkpoints),
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    manager.close()
    return restored["state"]


def _steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def _subprocess_env(num_devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    )
    return env


def _launch(commands: list[list[str]], env: dict[str, str], logs: list[Path]) -> list[str]:
    """Runs the commands side by side from the repo root and returns their output.

    Bounded: every process still running after SUBPROCESS_TIMEOUT, or once another one has failed
    (its partner would only wait for it at a barrier), is killed. Each process writes to its own
    log file, so a chatty process can never block on a full pipe.
    """
    procs = []
    try:
        for cmd, log in zip(commands, logs, strict=True):
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
                )
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = [log.read_text() for log in logs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"{commands[i][1:]} exited {p.returncode}:\n{outputs[i][-4000:]}"
    return outputs


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT)
def test_checkpoint_resumes_on_another_mesh(tmp_path, runs):
    """Job A: 8 devices, mesh (2, 4, 1), 5 steps, checkpoints at steps 3 and 5. Job B: a new
    process with 4 devices, mesh (2, 2, 1), whose workdir holds only A's step-3 checkpoint (as
    if A had been preempted and moved to a smaller machine).

    B restores the step-3 state bit for bit, in its own (2, 2) FSDP layout; it trains on from step
    3 (not 0) to 5, and ends where the uninterrupted A ended (rel. err <= 1e-5).
    """
    config = _config("pretrain", (2, 4, 1), num_steps=5)
    config.train.ckpt_every = 3
    a = run_stage(config, tmp_path / "a")
    assert _steps(tmp_path / "a" / "checkpoints") == [3, 5]
    a_ckpt3 = _restore(tmp_path / "a" / "checkpoints", 3, a.state)
    assert int(a_ckpt3.step) == 3

    shutil.copytree(
        tmp_path / "a" / "checkpoints",
        tmp_path / "b" / "checkpoints",
        ignore=lambda d, names: ["5"] if Path(d) == tmp_path / "a" / "checkpoints" else [],
    )
    assert _steps(tmp_path / "b" / "checkpoints") == [3]
    dump = tmp_path / "restored.npz"
    cmd = [
        sys.executable,
        str(REPO / "tests" / "scale_worker.py"),
        str(dump),
        "--config=configs/pretrain.py:tiny",
        f"--workdir={tmp_path / 'b'}",
        "--config.mesh.sizes=(2,2,1)",
        "--config.mesh.min_shard_bytes=0",
        "--config.train.num_steps=5",
        "--config.train.ckpt_every=3",
        "--config.train.log_every=1",
    ]
    env = _subprocess_env(4) | {"SCALE_WORKER_NO_EVAL": "1", "SCALE_WORKER_STOP_AFTER_TRAIN": "1"}
    _launch([cmd], env, [tmp_path / "b.log"])

    restored = np.load(dump)
    meta = json.loads(str(restored["meta"]))
    assert meta["step"] == 3 and meta["devices"] == 4
    assert meta["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert any("fsdp" in spec for spec in meta["specs"])  # really sharded on the new mesh
    want = jax.tree_util.tree_flatten_with_path(a_ckpt3)[0]
    assert meta["paths"] == [jax.tree_util.keystr(p) for p, _ in want]
    for i, (path, x) in enumerate(want):
        np.testing.assert_array_equal(restored[f"leaf{i}"], np.asarray(x), err_msg=str(path))

    assert _steps(tmp_path / "b" / "checkpoints") == [3, 5]
    b_final = _restore(tmp_path / "b" / "checkpoints", 5, a.state)
    assert_states_close(b_final, a.state)


# ----------------------------------------------------------------------------------------------
# 3. Two jax.distributed processes == one process
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logged(workdir: Path, tag: str) -> dict[int, float]:
    """step -> value of a scalar in the workdir's TensorBoard event files."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(str(workdir), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(SLOW_TEST_TIMEOUT)
@pytest.mark.parametrize("mesh", ["data", "fsdp"])
def test_two_processes_match_one_process(tmp_path, reference, mesh):
    """The whole tiny pretraining job (`python -m cdd_jax.main`: training, evaluation, samples,
    export) as two jax.distributed processes on 127.0.0.1 with 4 CPU devices each.

    mesh "data": the tiny config's own mesh, (8, 1, 1) data parallel over both processes with
    replicated parameters. "fsdp": (1, 8, 1) with min_shard_bytes=0, so every parameter tensor is
    split over both processes' devices and each process writes its own shards of the checkpoint.
    Each process feeds only its half of every batch. Three steps give the same logged losses and
    the same final state as the single-process run on one device; both processes exit with 0.
    """
    one = reference("pretrain")
    workdir = tmp_path / "mp"
    port = _free_port()
    mesh_flags = {
        "data": [],
        "fsdp": ["--config.mesh.sizes=(1,8,1)", "--config.mesh.min_shard_bytes=0"],
    }[mesh]
    commands = [
        [
            sys.executable,
            "-m",
            "cdd_jax.main",
            "--config=configs/pretrain.py:tiny",
            f"--workdir={workdir}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            *mesh_flags,
            f"--config.train.num_steps={NUM_STEPS}",
            "--config.train.log_every=1",
        ]
        for i in range(2)
    ]
    _launch(commands, _subprocess_env(4), [tmp_path / f"process{i}.log" for i in range(2)])
    events = list(workdir.glob("events.out.tfevents.*"))
    assert len(events) == 1  # process 0 writes the logs, process 1 only logs to stderr
    losses = _logged(workdir, "loss")
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    assert_losses_close(losses, one.losses)
    assert _steps(workdir / "checkpoints") == [NUM_STEPS]
    assert_states_close(_restore(workdir / "checkpoints", NUM_STEPS), one.state())


# ----------------------------------------------------------------------------------------------
# 5. Bad mesh / batch settings: clear errors before anything compiles
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _count_compiles():
    """Counts XLA backend compilations (every jit, eager op or init) inside the block."""
    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            events.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _bad(stage: str, what: str):
    config = pretrain_config("tiny") if stage == "pretrain" else sr_config("tiny")
    if what == "mesh":
        config.mesh.sizes = (3, 2, 1)  # 6 devices asked for, 8 present
        return config, r"Mesh sizes \(3, 2, 1\) multiply to 6, but there are 8 devices"
    config.data.batch_size = 12
    config.mesh.sizes = (1, 8, 1)  # data-parallel size 1 * 8 = 8
    return config, r"Global batch size 12 is not divisible by the data-parallel size 8"


@pytest.mark.parametrize("what", ["mesh", "batch"])
@pytest.mark.parametrize("stage", ["pretrain", "sr"])
def test_bad_mesh_or_batch_fails_before_compiling(tmp_path, stage, what):
    """Errors name the numbers and come from config validation: no data loaded, nothing compiled
    (for "sr" that includes the teacher, which the tiny config would pretrain first)."""
    config, match = _bad(stage, what)
    t0 = time.monotonic()
    with _count_compiles() as compiles, pytest.raises(ValueError, match=match):
        cdd_jax.train_and_evaluate(config, str(tmp_path))
    assert compiles == [], f"compiled {compiles} before the error"
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "teacher").exists()


def test_bad_teacher_mesh_fails_before_compiling(tmp_path):
    """The teacher-pretraining section of the SR config is checked up front as well."""
    config = sr_config("tiny")
    config.teacher.pretrain.mesh.sizes = (5, -1, 1)
    with _count_compiles() as compiles, pytest.raises(ValueError, match=r"\(5, -1, 1\).*5.*8"):
        cdd_jax.train_and_evaluate(config, str(tmp_path))
    assert compiles == []
