"""cdd_jax: Conditional Diffusion Distillation (CoDi) in JAX/Flax."""

__version__ = "0.1.0"


def train_and_evaluate(config, workdir: str):
    """Runs the job described by `config` (pretraining, distillation, evaluation) in `workdir`.

    `cdd_jax.run` is imported here, not at the top: `import cdd_jax` must not start JAX, so that
    the command line can set up devices and multi-host first.
    """
    from cdd_jax.run import train_and_evaluate as run

    return run(config, workdir)


def __getattr__(name: str):
    # `cdd_jax.Upscaler`, imported on first use for the same reason.
    if name == "Upscaler":
        from cdd_jax.inference.upscaler import Upscaler

        return Upscaler
    raise AttributeError(f"module 'cdd_jax' has no attribute {name!r}")


__all__ = ["Upscaler", "train_and_evaluate", "__version__"]
