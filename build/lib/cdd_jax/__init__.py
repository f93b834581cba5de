"""cdd_jax: Conditional Diffusion Distillation (CoDi) in JAX/Flax."""

__version__ = "0.1.0"


def train_and_evaluate(config, workdir: str):
    """Runs the job described by `config` (pretraining, distillation, evaluation) in `workdir`."""
    from cdd_jax.train.run import train_and_evaluate as _run

    return _run(config, workdir)


__all__ = ["train_and_evaluate", "__version__"]
