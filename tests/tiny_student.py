"""A tiny student for the upscaling tests: the configs/sr.py:tiny conditional network with
random parameters, made without compiling anything."""

import jax
import jax.numpy as jnp
import numpy as np

from cdd_jax.config.presets import sr_config
from cdd_jax.parallel.sharding import unbox
from cdd_jax.stages.distill import conditional_model


def random_params(abstract, seed: int = 1):
    """Random parameters of the shapes in `abstract` (numpy, nothing to compile): kernels
    N(0, 1 / fan_in), norm scales near 1, everything else (biases, the zero-initialised gates)
    small and non-zero, so the condition reaches every level."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("['kernel']"):
            return x / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        return (1.0 if name.endswith("['scale']") else 0.0) + np.float32(0.05) * x

    return jax.tree_util.tree_map_with_path(draw, abstract)


def tiny_student_params():
    """The configs/sr.py:tiny config and random parameters of its network (deterministic)."""
    config = sr_config("tiny")
    model, _ = conditional_model(config)
    c0 = jnp.zeros((1, 16, 16, 3))
    abstract = unbox(jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, c0, jnp.zeros((1,)), c0)))["params"]
    return config, random_params(abstract)
