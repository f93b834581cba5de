"""Loading an exported student folder (`cdd_jax.train.student_folder`) back into a network.

The network is rebuilt from the folder's saved run config, read onto today's defaults
(`cdd_jax.config.saved`), by the same `conditional_model` the distillation stage uses, and its
parameters are checked against that network: nothing about the architecture is assumed here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax.config.saved import saved_config
from cdd_jax.diffusion import Schedule, get_schedule
from cdd_jax.models.apply import ApplyFn
from cdd_jax.models.control import check_same_structure
from cdd_jax.parallel.sharding import unbox
from cdd_jax.stages.distill import conditional_model
from cdd_jax.train.student_folder import (
    StudentFolderError,
    read_student_folder,
    save_student,
)

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                       "student")

__all__ = ["SHIPPED", "Student", "StudentFolderError", "load_student", "save_student"]


@dataclasses.dataclass(frozen=True)
class Student:
    """A loaded student: its run config (on today's defaults), parameters, network, schedule,
    and student.json (`info`: scale, sampler settings, metrics, provenance)."""

    config: ml_collections.ConfigDict
    params: Any
    apply_fn: ApplyFn
    schedule: Schedule
    info: dict
    path: str

    @property
    def scale(self) -> int:
        return int(self.info["scale"])

    @property
    def crop_size(self) -> int:
        return int(self.info["crop_size"])


def _abstract_params(model, crop: int, channels: int) -> Any:
    cond0 = jnp.zeros((1, crop, crop, channels))
    return unbox(jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, cond0, jnp.zeros((1,)), cond0)))[
        "params"]


def load_student(path: str | None = None) -> Student:
    """Loads a student folder (default: the one shipped in `cdd_jax/assets/student`).

    Raises StudentFolderError naming the file when the folder is missing, incomplete or
    corrupted, and ValueError naming the first parameter that does not fit the network rebuilt
    from the saved config.
    """
    if path is None:
        path = SHIPPED
        if not os.path.isdir(path):
            raise StudentFolderError(
                f"no shipped student in this installation ({SHIPPED} does not exist yet); pass "
                "a student folder, e.g. <workdir>/student written by the sr job "
                "(python -m cdd_jax.main --config=configs/sr.py --workdir=runs/sr)")
    path = os.path.abspath(os.path.expanduser(path))
    params, config_dict, info = read_student_folder(path)
    config = saved_config(config_dict)
    if config.model.family == "unet2d_condition":
        raise ValueError(f"{path} holds a latent, text-conditioned student; the Upscaler samples "
                         "pixel-space students only in this version (a latent student needs its "
                         "teacher's VAE, which the student folder does not hold)")
    model, apply_fn = conditional_model(config)
    abstract = _abstract_params(model, int(info.get("crop_size", config.data.crop_size)),
                                int(config.control.get("cond_channels", 3)))
    try:
        check_same_structure(params, abstract, f"{path}/params.safetensors",
                             "the network rebuilt from config.json")
    except ValueError as e:
        raise ValueError(f"{e}. The saved parameters do not fit the network this version builds "
                         "from the saved config (a default that changed since it was saved "
                         "belongs in cdd_jax.config.saved.LEGACY_VALUES)") from e
    params = jax.tree.map(lambda p, a: jnp.asarray(p, a.dtype), params, abstract)
    return Student(config, params, apply_fn, get_schedule(config.diffusion.schedule), info, path)
