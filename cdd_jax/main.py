"""Command-line entry point: parses flags and calls `cdd_jax.train_and_evaluate`.

    python -m cdd_jax.main --config=configs/sr.py --workdir=/tmp/sr
    python -m cdd_jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/t \
        --config.train.num_steps=10

Quiet by default: one progress line per training run, the milestones (compile time, evaluations,
where the results are) and warnings; `--verbosity=0` brings back every INFO log (absl, orbax,
JAX, the parameter table, a line per logged step).
"""

import os
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cdd_jax.config_checks import unknown_key_message

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally `path.py:variant`.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and results.")
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "yes", "no"],
    "Call jax.distributed.initialize(): 'auto' detects SLURM / Cloud TPU multi-host jobs.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of JAX processes (explicit multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")
flags.mark_flags_as_required(["config", "workdir"])

# What the run leaves for a person to read, per stage (relative to --workdir).
_REPORTS = ("eval/results.md", "eval/photos_validation.md", "eval/photos_test.md", "table1.md")


def _override_hints(argv: list[str]) -> list[str]:
    """Close matches for `--config.a.b=` overrides that name no key of the config file."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return []
    file, _, variant = path.partition(":")
    try:
        config = runpy.run_path(file)["get_config"](variant or None)
    except Exception:  # noqa: BLE001 - the hint is best effort; the error itself is printed
        return []
    hints = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, prefix = config, ""
        for part in arg[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                valid = list(node.keys()) if hasattr(node, "keys") else []
                hints.append(unknown_key_message(part, valid, prefix))
                break
            node, prefix = node[part], prefix + part + "."
    return hints


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error (and close matches) instead of a traceback."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        hints = _override_hints(argv)
        print(f"error: {hints[0] if hints else e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # quiet by default: --verbosity=0 shows INFO logs
        logging.set_verbosity(logging.WARNING)
    # Imported after flag parsing, so that --help and flag errors answer without loading JAX.
    from cdd_jax.compile_cache import enable_compilation_cache
    from cdd_jax.parallel.distributed import maybe_initialize

    cache = enable_compilation_cache()  # $CDD_JAX_COMPILATION_CACHE=off turns it off.
    logging.info("XLA compilation cache: %s", cache or "off")

    maybe_initialize(
        FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    import cdd_jax

    cdd_jax.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    _print_summary(FLAGS.workdir)


def _print_summary(workdir: str) -> None:
    """The run's report (where the stage writes one) and where everything is."""
    import jax

    if jax.process_index() != 0:
        return
    for name in _REPORTS:
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            with open(path) as f:
                print(f.read().rstrip() + "\n")
            print(f"report: {path}")
    print(f"done: everything is in {workdir}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
