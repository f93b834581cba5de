"""Launchers: dry runs print commands that cdd_jax.main's flags accept; shell syntax is valid."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SHELL_SCRIPTS = ["slurm.sbatch", "tpu_pod.sh", "make_teacher.sh", "make_student.sh",
                 "issue21/table1_rerun.sh", "issue21/ablate_default.sh", "issue21/table1_budget.sh"]

# Parses each argv with cdd_jax.main's real flags, in a fresh process whose cwd is the repo root (so
# relative config paths resolve as they would in a launched job). ml_collections reads config
# overrides from sys.argv and defines them as flags while parsing, so they are removed before each
# re-parse. Prints one JSON result per argv: the parsed flags and every overridden config value.
_VALIDATOR = r"""
import json, sys
from absl import flags
import cdd_jax.main  # noqa: F401  (defines the flags)

F = flags.FLAGS
results = []
for argv in json.loads(sys.stdin.read()):
    F.unparse_flags()
    for name in [n for n in F if n.startswith("config.")]:
        delattr(F, name)
    sys.argv = ["cdd_jax.main", *argv]
    try:
        F(sys.argv)
        config = F.config
        overrides = {}
        for arg in argv:
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=", 1)[0]
                value = config
                for part in key.split("."):
                    value = value[part]
                overrides[key] = value
        results.append({"ok": True, "workdir": F.workdir, "distributed": F.distributed,
                        "stage": config.stage, "overrides": overrides})
    except BaseException as e:  # report, do not stop: the test decides
        results.append({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
print(json.dumps(results))
"""


def parse_with_main(argvs: list[list[str]]) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-c", _VALIDATOR],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_args(command: list[str]) -> list[str]:
    """The arguments after `python -m cdd_jax.main` in a tokenised command line."""
    for i in range(len(command) - 2):
        if command[i + 1 : i + 3] == ["-m", "cdd_jax.main"] and "python" in command[i]:
            return command[i + 3 :]
    raise AssertionError(f"no `python -m cdd_jax.main` in {command}")


def run_script(args: list[str], **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    return subprocess.run(
        args, capture_output=True, text=True, cwd=REPO, timeout=60, env={**clean, **env}
    )


def command_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def xm_dry_run(*flags: str) -> subprocess.CompletedProcess:
    """Runs launch/xm_launch.py with xmanager made unimportable (it is an optional extra)."""
    code = (
        "import runpy, sys; sys.modules['xmanager'] = None; "
        f"sys.argv = ['xm_launch.py', *{list(flags)!r}]; "
        "runpy.run_path('launch/xm_launch.py', run_name='__main__')"
    )
    return run_script([sys.executable, "-c", code])


# ---------------------------------------------------------------------------------------------


def test_validator_rejects_bad_commands():
    """Negative controls: the parser used below does fail on broken commands."""
    results = parse_with_main(
        [
            ["--config=configs/sr.py:tiny", "--workdir=/tmp/w", "--config.optim.lr=2e-4"],
            ["--config=configs/sr.py", "--workdir=/tmp/w", "--no_such_flag=1"],
            ["--config=configs/missing.py", "--workdir=/tmp/w"],
            ["--config=configs/sr.py", "--workdir=/tmp/w", "--config.optim.no_such_key=1"],
            ["--config=configs/pretrain.py", "--workdir=/tmp/w", "--config.distill.lambda_x=1"],
            ["--config=configs/sr.py", "--workdir=/tmp/w", "--distributed=sometimes"],
        ]
    )
    assert results[0]["ok"] and results[0]["overrides"] == {"optim.lr": 2e-4}, results[0]
    for bad in results[1:]:
        assert not bad["ok"], bad


def test_xm_dry_run_sweep_commands_parse():
    out = xm_dry_run(
        "--dry_run",
        "--config=configs/sr.py:tiny",
        "--workdir=/tmp/sweep",
        "--arg=--config.train.num_steps=3",
    )
    assert out.returncode == 0, out.stderr
    commands = command_lines(out.stdout)
    assert len(commands) == 4  # default sweep: lr {1e-4, 3e-4} x lambda_x {0.5, 1.0}
    assert all(c[0] == sys.executable for c in commands)  # local executor: this interpreter
    argvs = [main_args(c) for c in commands]
    results = parse_with_main(argvs)
    assert all(r["ok"] for r in results), results
    points = {(r["overrides"]["optim.lr"], r["overrides"]["distill.lambda_x"]) for r in results}
    assert points == {(1e-4, 0.5), (1e-4, 1.0), (3e-4, 0.5), (3e-4, 1.0)}
    assert all(r["overrides"]["train.num_steps"] == 3 and r["stage"] == "sr" for r in results)
    workdirs = [r["workdir"] for r in results]
    assert len(set(workdirs)) == 4 and all(w.startswith("/tmp/sweep/") for w in workdirs)


def test_xm_dry_run_vertex_custom_sweep():
    out = xm_dry_run(
        "--dry_run",
        "--executor=vertex",
        "--config=configs/pretrain.py:large",
        "--workdir=gs://bucket/pre",
        "--sweep=optim.lr=1e-4,2e-4,4e-4",
    )
    assert out.returncode == 0, out.stderr
    commands = command_lines(out.stdout)
    assert len(commands) == 3 and all(c[0] == "python" for c in commands)
    results = parse_with_main([main_args(c) for c in commands])
    assert all(r["ok"] for r in results), results
    assert [r["overrides"]["optim.lr"] for r in results] == [1e-4, 2e-4, 4e-4]
    assert all(r["stage"] == "pretrain" for r in results)


def test_xm_bad_sweep_and_missing_xmanager():
    out = xm_dry_run("--dry_run", "--sweep=optim.lr")
    assert out.returncode != 0 and "KEY=V1,V2" in out.stderr
    out = xm_dry_run("--workdir=/tmp/x")  # a real launch without the optional extra
    assert out.returncode != 0 and "xmanager is not installed" in out.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_syntax(script):
    bash = shutil.which("bash")
    assert bash is not None
    out = subprocess.run([bash, "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("procs_per_node", ["gpu", "node"])
def test_slurm_dry_run(procs_per_node):
    out = run_script(
        ["bash", "launch/slurm.sbatch", "--config.optim.lr=5e-4"],
        DRY_RUN="1",
        PROCS_PER_NODE=procs_per_node,
        CONFIG="configs/sr.py:tiny",
        WORKDIR="/tmp/slurm_wd",
    )
    assert out.returncode == 0, out.stderr
    [command] = command_lines(out.stdout)
    assert command[0] == "srun"
    tasks_per_node = 8 if procs_per_node == "gpu" else 1
    assert f"--ntasks-per-node={tasks_per_node}" in command
    assert f"--ntasks={2 * tasks_per_node}" in command
    if procs_per_node == "node":
        assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out.stdout
    [result] = parse_with_main([main_args(command)])
    assert result["ok"], result
    assert result["distributed"] == "yes" and result["workdir"] == "/tmp/slurm_wd"
    assert result["overrides"] == {"optim.lr": 5e-4}


def test_slurm_refuses_outside_allocation():
    out = run_script(["bash", "launch/slurm.sbatch"])
    assert out.returncode == 2 and "sbatch" in out.stderr
    out = run_script(["bash", "launch/slurm.sbatch"], DRY_RUN="1", PROCS_PER_NODE="rack")
    assert out.returncode == 2 and "'rack'" in out.stderr


def test_tpu_pod_dry_run():
    out = run_script(
        [
            "bash",
            "launch/tpu_pod.sh",
            "--config.train.num_steps=7",
            "--config.mesh.sizes=(1, -1, 1)",
        ],
        DRY_RUN="1",
        TPU_NAME="pod-x",
        ZONE="zone-y",
        CONFIG="configs/sr.py:large",
    )
    assert out.returncode == 0, out.stderr
    [command] = command_lines(out.stdout)
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-x"]
    assert "--worker=all" in command and "--zone=zone-y" in command
    [remote] = [c.removeprefix("--command=") for c in command if c.startswith("--command=")]
    remote_words = shlex.split(remote)  # what each worker's shell runs
    assert remote_words[:3] == ["cd", "cdd_jax", "&&"]
    [result] = parse_with_main([main_args(remote_words)])
    assert result["ok"], result
    assert result["distributed"] == "yes" and result["workdir"].startswith("gs://")
    assert result["overrides"] == {"train.num_steps": 7, "mesh.sizes": [1, -1, 1]}  # JSON list


def test_tpu_pod_setup_dry_run():
    out = run_script(["bash", "launch/tpu_pod.sh"], DRY_RUN="1", MODE="setup", PROJECT="proj")
    assert out.returncode == 0, out.stderr
    scp, ssh = command_lines(out.stdout)
    assert scp[4] == "scp" and "--recurse" in scp and "--worker=all" in scp
    assert ssh[4] == "ssh" and "--project=proj" in ssh
    assert "pip install -e ." in ssh[-1]
