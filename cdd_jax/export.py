"""Export a pretraining run's EMA parameters as a standalone teacher.

    python -m cdd_jax.export --workdir=runs/teacher --out=cdd_jax/assets/teacher

Takes the newest complete checkpoint of the run (it need not have finished). A "unet2d" run is
written as a diffusers pipeline folder (`unet/`, `scheduler/`, `model_index.json`, provenance in
`cdd_jax.json`) that diffusers' `DDPMPipeline.from_pretrained` and `teacher.checkpoint` both
read; a "cdd" run as `<out>/params` (Orbax) + `<out>/metadata.json`.

Any ported model (UNet2DModel, UNet2DConditionModel, AutoencoderKL) is written in the diffusers
layout from Python with `cdd_jax.save_diffusers(module, params, out)`.
"""

import json
import os

import ml_collections
from absl import app, flags

from cdd_jax.stages.pretrain import export_teacher
from cdd_jax.train.checkpoint import load_params

flags.DEFINE_string("workdir", None, "Workdir of a pretraining run (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output directory of the exported teacher.")
flags.DEFINE_string("note", "", "Free text stored with the teacher (e.g. how it was trained).")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def export_run(workdir: str, out: str, note: str = "") -> dict:
    params, meta = load_params(workdir)
    config = ml_collections.ConfigDict(meta["config"])
    if "family" not in config.model:  # a run from before the model families
        config.model.family = "cdd"
    metadata = {
        "model": config.model.to_dict(),
        "diffusion": config.diffusion.to_dict(),
        "crop_size": config.data.crop_size,
        "steps": meta["step"],
        "num_steps_configured": config.train.num_steps,
        "source_workdir": os.path.abspath(workdir),
        "note": note,
    }
    export_teacher(out, params, config, metadata)
    return metadata


def main(argv):
    del argv
    print(json.dumps(export_run(FLAGS.workdir, FLAGS.out, FLAGS.note), indent=2))


if __name__ == "__main__":
    app.run(main)
