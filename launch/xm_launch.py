r"""XManager launcher: a small sweep of `python -m cdd_jax.main`, locally or on Vertex AI.

    # What would run (no xmanager needed):
    python launch/xm_launch.py --dry_run
    # Run the sweep on this machine, one process per sweep point, one after another:
    xmanager launch launch/xm_launch.py -- --executor=local --workdir=/tmp/sweep \
        --config=configs/sr.py:tiny
    # Vertex AI, one 8xA100 VM per sweep point (needs a GCP project, see launch/README.md):
    xmanager launch launch/xm_launch.py -- --executor=vertex --config=configs/sr.py:large \
        --workdir=gs://BUCKET/sweep --sweep=optim.lr=1e-4,3e-4 --sweep=distill.lambda_x=0.5,1

Each `--sweep=KEY=V1,V2,...` adds a grid axis over `--config.KEY`; the sweep is the product of all
axes. xmanager is an optional extra (`pip install -e '.[launch]'`); it is imported only when
launching, so `--dry_run` works without it.
"""

from __future__ import annotations

import itertools
import os
import shlex
import sys
from collections.abc import Sequence

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = "cdd_jax.main"

_CONFIG = flags.DEFINE_string(
    "config",
    "configs/sr.py",
    "Config file (relative to the repo root), optionally `path.py:variant`.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/cdd_jax_sweep", "Root directory; each sweep point writes to a subdirectory."
)
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where the jobs run.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep",
    ["optim.lr=1e-4,3e-4", "distill.lambda_x=0.5,1.0"],
    "Grid axis `CONFIG_KEY=V1,V2,...` (repeatable); the sweep is the product of the axes.",
)
_ARGS = flags.DEFINE_multi_string(
    "arg", [], "Extra flag passed unchanged to every job, e.g. --arg=--config.train.num_steps=10."
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the commands, one per sweep point; submit nothing."
)
_TITLE = flags.DEFINE_string("experiment_title", "cdd_jax_sweep", "XManager experiment title.")
_ACCELERATOR = flags.DEFINE_string(
    "accelerator", "a100", "Vertex accelerator type (an xm.ResourceType name, e.g. a100, v100, l4)."
)
_ACCELERATOR_COUNT = flags.DEFINE_integer("accelerator_count", 8, "Accelerators per Vertex job.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Docker base image for Vertex jobs.")
_JAX_EXTRA = flags.DEFINE_string(
    "jax_extra", "cuda12", "pip extra of jax installed in the Vertex image (cuda12, tpu, ...)."
)


def parse_sweep(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parses `KEY=V1,V2` grid axes into [(KEY, [V1, V2]), ...]; values stay strings."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("config.")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ValueError(f"--sweep must look like KEY=V1,V2,..., got {spec!r}.")
        if any(key == k for k, _ in axes):
            raise ValueError(f"--sweep names {key!r} twice.")
        axes.append((key, vals))
    return axes


def sweep_points(axes: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
    """The product of the grid axes, as [{KEY: VALUE, ...}, ...] (a single empty point if none)."""
    keys = [k for k, _ in axes]
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))
    ]


def point_name(point: dict[str, str]) -> str:
    """A directory-safe name for one sweep point, e.g. 'lr=1e-4,lambda_x=0.5'."""
    name = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()) or "run"
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in name)


def job_args(
    config: str, workdir: str, point: dict[str, str], extra: Sequence[str] = ()
) -> list[str]:
    """The cdd_jax.main flags of one sweep point."""
    args = [f"--config={config}", f"--workdir={workdir.rstrip('/')}/{point_name(point)}"]
    args += [f"--config.{k}={v}" for k, v in point.items()]
    return args + list(extra)


def build_jobs(
    config: str, workdir: str, sweep: Sequence[str], extra: Sequence[str] = ()
) -> list[list[str]]:
    """Flags of every job of the sweep (one list per sweep point)."""
    return [job_args(config, workdir, p, extra) for p in sweep_points(parse_sweep(sweep))]


def _python(executor: str) -> str:
    # Local jobs run with this interpreter; Vertex jobs with the container's `python`.
    return sys.executable if executor == "local" else "python"


def _launch(jobs: list[list[str]]) -> None:
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise SystemExit(
            "xmanager is not installed: `pip install -e '.[launch]'` (or use --dry_run)."
        ) from e

    with xm_local.create_experiment(experiment_title=_TITLE.value) as experiment:
        if _EXECUTOR.value == "local":
            packageable = xm.binary(
                executor_spec=xm_local.LocalSpec(),
                path=sys.executable,
                args=["-m", ENTRYPOINT],
            )

            def executor():
                return xm_local.Local()

        else:
            name = os.path.basename(REPO_ROOT)
            packageable = xm.python_container(
                executor_spec=xm_local.Vertex.Spec(),
                path=REPO_ROOT,
                base_image=_BASE_IMAGE.value,
                docker_instructions=[
                    f"COPY {name}/ /workdir/{name}",
                    f"WORKDIR /workdir/{name}",
                    "RUN python -m pip install --no-cache-dir -U pip && python -m pip install "
                    f"--no-cache-dir -e . 'jax[{_JAX_EXTRA.value}]'",
                ],
                entrypoint=xm.ModuleName(ENTRYPOINT),
            )

            def executor():
                requirements = xm.JobRequirements(**{_ACCELERATOR.value: _ACCELERATOR_COUNT.value})
                return xm_local.Vertex(requirements=requirements)

        [executable] = experiment.package([packageable])
        for args in jobs:
            experiment.add(xm.Job(executable, executor=executor(), args=args))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    jobs = build_jobs(_CONFIG.value, _WORKDIR.value, _SWEEP.value, _ARGS.value)
    if _DRY_RUN.value:
        print(f"# {len(jobs)} job(s), executor={_EXECUTOR.value}, run from {REPO_ROOT}")
        for args in jobs:
            print(shlex.join([_python(_EXECUTOR.value), "-m", ENTRYPOINT, *args]))
        return
    _launch(jobs)


if __name__ == "__main__":
    app.run(main)
