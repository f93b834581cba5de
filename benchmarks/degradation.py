"""Throughput of the SR degradation transform: (gt, lq, cond) pairs per second per core.

Runs single-threaded (one OpenCV and one BLAS thread), as each grain worker does, over the photos
bundled with scikit-image and scikit-learn. For each GT size (256, 400, 512), JPEG path (fast
libjpeg / DiffJPEG-faithful NumPy) and with / without USM sharpening it times `--num_examples`
full SRPairTransform calls (realesrgan preset, degradation on the whole GT crop), plus the
reference recipe (degrade a 400 crop, then the 256 paired crop) and a per-op breakdown.

Pairs/s/core is examples / CPU seconds of this process (time.process_time), which does not count
time spent waiting for a core on a shared machine; wall-clock figures are reported beside it.

    python benchmarks/degradation.py [--num_examples=100] [--out_dir=benchmarks/results]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import cv2
import numpy as np
from absl import app, flags

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from cdd_jax.data import degradations as deg  # noqa: E402

_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 100, "Timed examples per configuration.")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON and table go.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the per-example generators.")

SIZES = (256, 400, 512)


def bundled_images() -> list[np.ndarray]:
    """Natural photos that ship inside the scikit-image and scikit-learn wheels (offline)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return photos + list(load_sample_images().images)


def _single_threaded() -> None:
    cv2.setNumThreads(1)
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(1, user_api="blas")
    except ImportError:
        pass


def time_transform(transform, images, num: int, seed: int) -> dict:
    """CPU and wall seconds for `num` random_map calls (after 3 warm-up calls)."""
    for i in range(3):
        transform.random_map({"image": images[i % len(images)]}, np.random.default_rng([seed, i]))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(num):
        element = {"image": images[i % len(images)]}
        transform.random_map(element, np.random.default_rng([seed, 1000 + i]))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "examples": num,
        "cpu_s": cpu,
        "wall_s": wall,
        "pairs_per_s_per_core": num / cpu,
        "pairs_per_s_wall": num / wall,
        "ms_per_pair_cpu": 1e3 * cpu / num,
    }


def _time_op(fn, reps: int = 10) -> float:
    """Median CPU milliseconds of fn() over `reps` calls."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1e3 * float(np.median(times))


def op_breakdown(images, size: int, seed: int) -> dict:
    """CPU ms of the expensive ops at GT side `size` (their cost when they are drawn)."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(images[0], (size, size), interpolation=cv2.INTER_AREA)
    img = img.astype(np.float32) / 255
    k21 = deg.anisotropic_gaussian_kernel(21, 3.0, 1.0, 0.5)
    return {
        "usm_sharpen": _time_op(lambda: deg.usm_sharpen(img)),
        "filter2d_21x21": _time_op(lambda: deg.filter2d(img, k21)),
        "resize_area_x0.7": _time_op(
            lambda: deg.resize(img, deg.scaled_size((size, size), 0.7), "area")
        ),
        "resize_bicubic_x0.7": _time_op(
            lambda: deg.resize(img, deg.scaled_size((size, size), 0.7), "bicubic", scale=0.7)
        ),
        "gaussian_noise": _time_op(lambda: deg.add_gaussian_noise(img, rng, 10.0)),
        "poisson_noise_unique": _time_op(lambda: deg.add_poisson_noise(img, rng, 1.0)),
        "poisson_noise_fixed256": _time_op(
            lambda: deg.add_poisson_noise(img, rng, 1.0, vals="fixed256")
        ),
        "jpeg_fast": _time_op(lambda: deg.jpeg_fast(img, 50.0)),
        "jpeg_diff": _time_op(lambda: deg.jpeg_diff(img, 50.0)),
    }


def run(num: int, seed: int) -> dict:
    _single_threaded()
    images = bundled_images()
    load_before = os.getloadavg()
    rows = []
    for size in SIZES:
        for jpeg_impl in ("fast", "diffjpeg"):
            for use_sharpen in (True, False):
                cfg = deg.degradation_config("realesrgan")
                cfg.degrade_size = 0
                cfg.jpeg_impl = jpeg_impl
                cfg.use_sharpen = use_sharpen
                result = time_transform(deg.SRPairTransform(cfg, size), images, num, seed)
                rows.append(
                    {"gt": size, "degrade": size, "jpeg": jpeg_impl, "usm": use_sharpen, **result}
                )
                print(rows[-1])
    for jpeg_impl in ("fast", "diffjpeg"):  # reference recipe: degrade 400, crop 256
        cfg = deg.degradation_config("realesrgan")
        cfg.jpeg_impl = jpeg_impl
        result = time_transform(deg.SRPairTransform(cfg, 256), images, num, seed)
        rows.append({"gt": 256, "degrade": 400, "jpeg": jpeg_impl, "usm": True, **result})
        print(rows[-1])
    breakdown = {str(size): op_breakdown(images, size, seed) for size in SIZES}
    return {
        "rows": rows,
        "op_cpu_ms": breakdown,
        "machine": {
            "cpu": common.cpu_model(),
            "cores": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
        },
        "threads": {"opencv": cv2.getNumThreads(), "blas": 1},
        "preset": "realesrgan",
        "seed": seed,
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# SR degradation throughput (single thread)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; load average before/after "
        f"{m['loadavg_before'][0]:.1f}/{m['loadavg_after'][0]:.1f}. Preset realesrgan; "
        f"{results['rows'][0]['examples']} examples per row over the bundled photos. "
        "Pairs/s/core = examples / process CPU seconds (waiting for a core excluded); "
        "wall = examples / elapsed seconds.",
        "",
        "| GT | degraded crop | JPEG | USM | pairs/s/core | ms/pair (CPU) | pairs/s (wall) |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['gt']} | {r['degrade']} | {r['jpeg']} | {'yes' if r['usm'] else 'no'} | "
            f"{r['pairs_per_s_per_core']:.1f} | {r['ms_per_pair_cpu']:.1f} | "
            f"{r['pairs_per_s_wall']:.1f} |"
        )
    ops = results["op_cpu_ms"]
    names = list(next(iter(ops.values())))
    lines += [
        "",
        "Per-op CPU ms (median of 10) on a GT-sized image, when the op is drawn:",
        "",
        "| op | " + " | ".join(ops) + " |",
        "|---|" + "---:|" * len(ops),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{ops[s][name]:.2f}" for s in ops) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    results = run(_NUM_EXAMPLES.value, _SEED.value)
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUT_DIR.value, "degradation.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(_OUT_DIR.value, "degradation.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    app.run(main)
