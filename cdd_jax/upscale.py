"""Upscale image files with a distilled student.

    python -m cdd_jax.upscale photo.jpg scans/ --output=out/ [--model=runs/sr/student]
        [--steps=4] [--seed=0] [--tile=32] [--overlap=8] [--tile_batch=16]
        [--max_pixels=4000000] [--format=png|same] [--renoise=ddim|fresh]

Inputs are files or folders (their PNG, JPEG, WebP, BMP and TIFF files, not recursively); each
output is `<output>/<input name>.png` (or the input's format with --format=same). Colours are
taken as sRGB (ICC profiles are not applied); greyscale stays greyscale, alpha is upscaled by
bicubic interpolation, 16-bit inputs give 16-bit outputs. A bad input is one error line and the
others go on; the exit code is the number of inputs that failed (at most 100; 100 also when the
student cannot be loaded). Quiet by default:
--verbosity=0 shows the libraries' INFO logs. Compiled networks are kept in XLA's persistent
cache (`cdd_jax.compile_cache`; CDD_JAX_COMPILATION_CACHE=off turns it off).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Output folder (created if needed).")
flags.DEFINE_string("model", None, "Student folder (default: the shipped cdd_jax/assets/student).")
flags.DEFINE_integer("steps", None, "Sampling steps K (default: the student's largest "
                     "evaluated K).")
flags.DEFINE_integer("seed", 0, "Seed of the noise field.")
flags.DEFINE_integer("tile", 0, "Tile side in output pixels (0: the training crop size).")
flags.DEFINE_integer("overlap", -1, "Tile overlap in output pixels (-1: a quarter tile).")
flags.DEFINE_integer("tile_batch", 16, "Tiles per network call (bounds the network's memory).")
flags.DEFINE_integer("max_pixels", 4_000_000, "Largest input accepted, in pixels (0: no limit).")
flags.DEFINE_enum("format", "png", ["png", "same"], "Output format: PNG, or the input's format.")
flags.DEFINE_string("renoise", None, "Sampler between steps: ddim or fresh (default: the "
                    "student's first evaluated one).")
flags.DEFINE_bool("progress", True, "Show a progress bar over images and tiles.")

MAX_EXIT_CODE = 100


@dataclasses.dataclass
class Summary:
    done: list = dataclasses.field(default_factory=list)  # (input, output, in_px, out_px)
    failed: list = dataclasses.field(default_factory=list)  # (input, reason)
    seconds: float = 0.0

    def line(self, upscaler, steps: int) -> str:
        n = len(self.done) + len(self.failed)
        mp_in = sum(d[2] for d in self.done) / 1e6
        mp_out = sum(d[3] for d in self.done) / 1e6
        rate = mp_out / self.seconds if self.seconds > 0 else float("nan")
        text = (f"upscaled {len(self.done)} of {n} images (x{upscaler.scale}, K={steps}, "
                f"{upscaler.renoise}): {mp_in:.2f} MP in -> {mp_out:.2f} MP out in "
                f"{self.seconds:.1f} s ({rate:.3f} MP/s)")
        if self.failed:
            text += f"; {len(self.failed)} failed: " + ", ".join(f for f, _ in self.failed)
        return text


def list_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files, [(path, reason)] for inputs that are neither an image file nor a folder)."""
    from cdd_jax.inference.images import EXTENSIONS

    files, bad = [], []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if os.path.splitext(n)[1].lower() in EXTENSIONS
                           and os.path.isfile(os.path.join(path, n)))
            if found:
                files.extend(found)
            else:
                bad.append((path, "folder holds no PNG/JPEG/WebP/BMP/TIFF files"))
        elif os.path.isfile(path):
            files.append(path)
        else:
            bad.append((path, "no such file or folder"))
    return files, bad


def _upscale_one(path: str, output: str, upscaler, seen: dict, *, steps, seed, max_pixels,
                 keep_format, desc) -> tuple[str, int, int]:
    from cdd_jax.fileio import write_atomic
    from cdd_jax.inference.images import SUFFIX, encode, output_format, read_image

    array, fmt = read_image(path, max_pixels)
    out_fmt = output_format(fmt, array, keep_format)  # The output has the input's layout.
    target = os.path.join(output, os.path.splitext(os.path.basename(path))[0] + SUFFIX[out_fmt])
    real = os.path.realpath(target)
    if real in seen:
        raise ValueError(f"output {target} would overwrite the output of {seen[real]}")
    if os.path.exists(target) and os.path.samefile(target, path):
        raise ValueError(f"output path {target} is this input file; choose another --output")
    out = upscaler(array, steps=steps, seed=seed, desc=desc)
    write_atomic(target, encode(out, out_fmt))
    seen[real] = path
    return target, array.shape[0] * array.shape[1], out.shape[0] * out.shape[1]


def upscale_files(inputs: list[str], output: str, upscaler, *, steps: int | None = None,
                  seed: int = 0, max_pixels: int = 0, keep_format: bool = False,
                  progress: bool = False, err=None) -> Summary:
    """Upscales every input file / folder into `output`; one error line per failure on `err`
    (default stderr), the others go on."""
    import cv2
    from tqdm.auto import tqdm

    err = err or sys.stderr
    files, bad = list_inputs(inputs)
    summary = Summary(failed=list(bad))
    for path, reason in bad:
        print(f"error: {path}: {reason}", file=err)
    seen: dict[str, str] = {}
    start = time.perf_counter()
    for i, path in enumerate(tqdm(files, unit="image", disable=not progress)):
        try:
            target, n_in, n_out = _upscale_one(
                path, output, upscaler, seen, steps=steps, seed=seed, max_pixels=max_pixels,
                keep_format=keep_format, desc=f"[{i + 1}/{len(files)}] {os.path.basename(path)}")
        except (ValueError, TypeError, OSError, cv2.error) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {path}: {reason}", file=err)
            summary.failed.append((path, reason))
            continue
        summary.done.append((path, target, n_in, n_out))
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv: list[str]) -> int:
    inputs = argv[1:]
    if not inputs or not FLAGS.output:
        raise app.UsageError("give input files or folders and --output=DIR")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from cdd_jax.compile_cache import enable_compilation_cache
    from cdd_jax.inference.student import StudentFolderError
    from cdd_jax.inference.upscaler import Upscaler

    enable_compilation_cache()  # $CDD_JAX_COMPILATION_CACHE=off turns it off.

    try:
        upscaler = Upscaler.load(FLAGS.model, tile=FLAGS.tile or None,
                                 overlap=None if FLAGS.overlap < 0 else FLAGS.overlap,
                                 tile_batch=FLAGS.tile_batch, renoise=FLAGS.renoise,
                                 progress=FLAGS.progress)
    except (StudentFolderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return MAX_EXIT_CODE
    steps = FLAGS.steps or upscaler.default_steps
    summary = upscale_files(inputs, FLAGS.output, upscaler, steps=steps, seed=FLAGS.seed,
                            max_pixels=FLAGS.max_pixels, keep_format=FLAGS.format == "same",
                            progress=FLAGS.progress)
    print(summary.line(upscaler, steps))
    return min(len(summary.failed), MAX_EXIT_CODE)


if __name__ == "__main__":
    app.run(main)
