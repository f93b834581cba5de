"""Command-line entry point: parses flags and calls `cdd_jax.train_and_evaluate`.

    python -m cdd_jax.main --config=configs/sr.py --workdir=/tmp/sr
    python -m cdd_jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/t --config.train.num_steps=10
"""

from absl import app, flags
from ml_collections import config_flags

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    from cdd_jax.parallel.distributed import maybe_initialize

    maybe_initialize(
        FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    import cdd_jax

    cdd_jax.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
