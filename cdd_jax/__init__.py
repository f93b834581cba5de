"""cdd_jax: Conditional Diffusion Distillation (CoDi) in JAX/Flax."""

__version__ = "0.1.0"

# Public names loaded on first use: `import cdd_jax` must not start JAX, so that the command line
# can set up devices and multi-host first.
_LAZY = {
    "load_diffusers": "cdd_jax.convert.diffusers",
    "save_diffusers": "cdd_jax.convert.diffusers",
    "Upscaler": "cdd_jax.inference.upscaler",
}


def train_and_evaluate(config, workdir: str):
    """Runs the job described by `config` (pretraining, distillation, evaluation) in `workdir`."""
    from cdd_jax.run import train_and_evaluate as run

    return run(config, workdir)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdd_jax' has no attribute {name!r}")


__all__ = ["Upscaler", "load_diffusers", "save_diffusers", "train_and_evaluate", "__version__"]
