"""Full-image evaluation of a student by the SR papers' protocol (`evaluate/protocol.py`):

    python -m cdd_jax.evaluate --hr=DIR [--lr=DIR] [--model=DIR] [--steps=1,4] --out=DIR
    python -m cdd_jax.evaluate --heldout [--model=DIR] --out=DIR

--heldout instead re-runs the job's own evaluation on its held-out crops from the student folder
alone and checks that every recorded number comes out the same (exit code 1 if not).

Every image goes through the same tiled path as `python -m cdd_jax.upscale`. Without --lr the
low-resolution inputs are made from the HR images with the student's degradation preset and a
fixed seed. Writes <out>/per_image.csv, summary.json (rows {method, steps, metric, value,
stderr}) and summary.md. An entry point: the work is in `cdd_jax.inference.evaluate`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("hr", None, "Folder of high-resolution (ground-truth) images.")
flags.DEFINE_string("lr", None, "Folder of matching low-resolution images (same file stems).")
flags.DEFINE_string("model", None, "Student folder (default: the shipped student).")
flags.DEFINE_list("steps", ["1", "4"], "Sampling steps K of the student, comma-separated.")
flags.DEFINE_integer("seed", 0, "Seed of the degradation and of the noise field.")
flags.DEFINE_string("out", None, "Output folder of the report.")
flags.DEFINE_integer("tile", 0, "Tile side in output pixels (0: the training crop size).")
flags.DEFINE_integer("overlap", -1, "Tile overlap in output pixels (-1: a quarter tile).")
flags.DEFINE_integer("tile_batch", 16, "Tiles per network call.")
flags.DEFINE_string("renoise", None, "Sampler between steps: ddim or fresh (default: the "
                    "student's first evaluated one).")
flags.DEFINE_string("lpips", "alex", "LPIPS network (alex or vgg; empty: no LPIPS).")
flags.DEFINE_bool("heldout", False, "Re-run the job's evaluation on its held-out crops and "
                  "compare with the numbers recorded in the student folder.")
flags.mark_flags_as_required(["out"])
flags.register_validator("hr", lambda hr: hr is not None or FLAGS.heldout,
                         message="--hr=DIR (a folder of images) or --heldout is required")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from cdd_jax.compile_cache import enable_compilation_cache
    from cdd_jax.inference.evaluate import evaluate_folder
    from cdd_jax.inference.upscaler import Upscaler

    enable_compilation_cache()  # $CDD_JAX_COMPILATION_CACHE=off turns it off.
    if FLAGS.heldout:
        sys.exit(_heldout())
    upscaler = Upscaler.load(FLAGS.model, tile=FLAGS.tile or None,
                             overlap=None if FLAGS.overlap < 0 else FLAGS.overlap,
                             tile_batch=FLAGS.tile_batch, renoise=FLAGS.renoise)
    evaluate_folder(upscaler, FLAGS.hr, FLAGS.out, lr_dir=FLAGS.lr,
                    steps=[int(k) for k in FLAGS.steps], seed=FLAGS.seed,
                    lpips_net=FLAGS.lpips or None, progress=True)
    with open(f"{FLAGS.out}/summary.md") as f:
        print(f.read())


def _heldout() -> int:
    from cdd_jax.inference.reproduce import reproduce_job_evaluation
    from cdd_jax.inference.student import load_student

    student = load_student(FLAGS.model)
    report = reproduce_job_evaluation(student, FLAGS.out)
    with open(f"{FLAGS.out}/eval/results.md") as f:
        print(f.read())
    if report["identical"]:
        print(f"identical: all {report['rows']} metric rows recorded in {student.path} "
              "came out the same")
        return 0
    recorded, again = report["differences"][0]
    print(f"DIFFERENT: {len(report['differences'])} of {report['rows']} rows differ from "
          f"{student.path}; first: recorded {recorded}, now {again}")
    return 1


if __name__ == "__main__":
    app.run(main)
