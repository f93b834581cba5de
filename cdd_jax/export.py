"""Export a pretraining run's EMA parameters as a standalone teacher checkpoint.

    python -m cdd_jax.export --workdir=runs/teacher --out=cdd_jax/assets/teacher

Takes the newest complete checkpoint of the run (it need not have finished), writes
`<out>/params` (Orbax) and `<out>/metadata.json` (model config, step, source), which is what
`config.teacher.checkpoint` accepts and checks against `config.model`.
"""

import json
import os

from absl import app, flags

from cdd_jax.train.checkpoint import export_params, load_params

flags.DEFINE_string("workdir", None, "Workdir of a pretraining run (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output directory of the exported teacher.")
flags.DEFINE_string("note", "", "Free text stored in metadata.json (e.g. how it was trained).")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def export_run(workdir: str, out: str, note: str = "") -> dict:
    params, meta = load_params(workdir)
    config = meta["config"]
    metadata = {
        "model": config["model"],
        "diffusion": config["diffusion"],
        "crop_size": config["data"]["crop_size"],
        "steps": meta["step"],
        "num_steps_configured": config["train"]["num_steps"],
        "source_workdir": os.path.abspath(workdir),
        "note": note,
    }
    export_params(out, params, metadata)
    return metadata


def main(argv):
    del argv
    print(json.dumps(export_run(FLAGS.workdir, FLAGS.out, FLAGS.note), indent=2))


if __name__ == "__main__":
    app.run(main)
