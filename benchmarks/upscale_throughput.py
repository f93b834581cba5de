"""Upscaling throughput and peak memory of the shipped student on the tiled path (issue 19,
acceptance 1), beside bicubic and a 50-step sampler of the same network.

    python benchmarks/upscale_throughput.py [--sizes=1024x768,2048x1536] [--steps=1,4]
        [--teacher_size=176x176] [--teacher_steps=50] [--tile_batch=16] [--model=DIR]

The photo: four bundled photos (astronaut, chelsea, rocket, china) resized to 1024x768 each and
put 2x2 into a 2048x1536 high-resolution image, area-downsampled by the scale to the input
(512x384). Smaller output sizes are the top-left crop of that input. Every size runs bicubic
(cv2) and the student at each K through `Upscaler.upscale_rgb` (the `python -m cdd_jax.upscale`
path), sizes in increasing order, in ONE process; each K is compiled first on a one-tile image,
so the timed runs hold no compilation. Throughput = output megapixels / wall seconds.

"Teacher at 50 steps": the student's own conditional network (the teacher U-Net's architecture
plus the adapter) sampled with 50 DDIM steps through the same tiled path: what a 50-step
conditional teacher costs per tile, not its quality. It runs on a small output (`teacher_size`,
a whole number of tile batches) because 50 steps over 2048x1536 would take over an hour here;
the student at each K runs on that size too, so the ratio is measured at one size.

Memory: a thread samples this process's resident set size (/proc/self/statm) every 20 ms; each
phase reports the RSS before it and the peak during it. The network sees `tile_batch` tiles per
call at every size; the condition and the blend are made one row of tiles at a time, so the
only whole-image array of `upscale_rgb` is its float32 output (12 bytes per output pixel,
`Upscaler` docstring; 28 before session 11, when the condition canvas and the blend
accumulators were whole-image too), and the table gives that prediction beside the measured
growth.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MOSAIC = ("astronaut", "chelsea", "rocket", "china")
BYTES_PER_OUTPUT_PIXEL = 12  # The float32 output; the condition and blend are per row.


def size_arg(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH") from e
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return w, h


def make_input(scale: int, width: int = 2048, height: int = 1536) -> np.ndarray:
    """The benchmark's low-resolution input (float32 RGB in [0, 1], (height/scale, width/scale))
    made from four bundled photos (module docstring)."""
    import cv2

    from cdd_jax.data.bundled import load_bundled_image

    qw, qh = width // 2, height // 2
    quads = [cv2.resize(load_bundled_image(n), (qw, qh), interpolation=cv2.INTER_AREA)
             for n in MOSAIC]
    hr = np.concatenate([np.concatenate(quads[:2], axis=1), np.concatenate(quads[2:], axis=1)])
    lr = cv2.resize(hr, (width // scale, height // scale), interpolation=cv2.INTER_AREA)
    return lr.astype(np.float32) / np.float32(255.0)


class RssMonitor:
    """Peak resident set size of this process, sampled every `period` s by a thread."""

    def __init__(self, period: float = 0.02):
        self.period = period
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __enter__(self) -> RssMonitor:
        self.before = self.rss()
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> dict:
    """Runs fn() under an RssMonitor: wall and CPU seconds, RSS before and peak (MiB)."""
    c0 = cpu_seconds()
    with RssMonitor() as mon:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": cpu_seconds() - c0, "rss_before_mib": mon.before / 2**20,
            "rss_peak_mib": mon.peak / 2**20, "load_average": common.load_average(),
            "output_shape": list(np.shape(out))}


def bicubic(lr: np.ndarray, scale: int) -> np.ndarray:
    import cv2

    h, w = lr.shape[:2]
    return np.clip(cv2.resize(lr, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC), 0, 1)


def run(args) -> dict:
    from cdd_jax.inference.upscaler import Upscaler

    up = Upscaler.load(args.model, tile_batch=args.tile_batch)
    s = up.scale
    full = make_input(s)
    rows = []

    def record(method, steps, size, result):
        w, h = size
        mp = w * h / 1e6
        result.update(method=method, steps=steps, width=w, height=h, output_mp=mp,
                      mp_per_s=mp / result["wall_s"], mp_per_cpu_s=mp / result["cpu_s"],
                      tiles=len(_grid(up, w, h)))
        rows.append(result)
        print(f"{method:8s} K={steps:<3d} {w}x{h}: {result['wall_s']:.1f} s "
              f"({result['mp_per_s']:.4f} MP/s), RSS {result['rss_before_mib']:.0f} -> "
              f"{result['rss_peak_mib']:.0f} MiB, load {result['load_average']}", flush=True)

    compile_s = {}
    tiny = full[:8, :8]
    # The teacher samples with DDIM (a scan over its steps); the student's re-noising (its
    # folder's default, "fresh" for the shipped one) is unrolled over K, fine for K <= 4 but not
    # what a 50-step teacher would run.
    renoise = {k: up.renoise for k in args.steps}
    renoise[args.teacher_steps] = "ddim"
    for k in [*args.steps, args.teacher_steps]:  # One compilation per K (the tile shape is fixed).
        t0 = time.perf_counter()
        up.upscale_rgb(tiny, steps=k, renoise=renoise[k])
        compile_s[k] = time.perf_counter() - t0
        print(f"compiled K={k} (with one batch of tiles) in {compile_s[k]:.1f} s", flush=True)

    tw, th = args.teacher_size
    small = full[:th // s, :tw // s]
    for k in args.steps:
        record("student", k, args.teacher_size, timed(lambda k=k: up.upscale_rgb(small, steps=k)))
    record("teacher", args.teacher_steps, args.teacher_size,
           timed(lambda: up.upscale_rgb(small, steps=args.teacher_steps, renoise="ddim")))
    for w, h in sorted(args.sizes, key=lambda wh: wh[0] * wh[1]):
        lr = full[:h // s, :w // s]
        record("bicubic", 0, (w, h), timed(lambda lr=lr: bicubic(lr, s)))
        for k in args.steps:
            record("student", k, (w, h), timed(lambda lr=lr, k=k: up.upscale_rgb(lr, steps=k)))
    return {"rows": rows, "compile_s": compile_s, "tile": up.tile, "overlap": up.overlap,
            "tile_batch": up.tile_batch, "renoise": up.renoise, "scale": s,
            "student": up.student.path, "ru_maxrss_mib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024}


def _grid(up, w, h):
    from cdd_jax.evaluate.tiling import make_grid

    return make_grid(h, w, up.tile, up.overlap, align=up.scale)


def markdown(payload: dict, machine: dict) -> str:
    rows = payload["rows"]
    table = common.md_table(
        ["method", "K", "output", "tiles", "wall s", "MP/s (wall)", "MP/CPU-s", "RSS before MiB",
         "peak RSS MiB", "load (1 min)"],
        [[r["method"], r["steps"] or "-", f"{r['width']}x{r['height']}", r["tiles"],
          r["wall_s"], r["mp_per_s"], r["mp_per_cpu_s"], r["rss_before_mib"], r["rss_peak_mib"],
          r["load_average"][0]] for r in rows])
    students = {}
    for r in rows:
        if r["method"] == "student":
            students.setdefault(r["steps"], []).append(r)
    growth = []
    for k, rs in students.items():
        rs = sorted(rs, key=lambda r: r["output_mp"])
        a, b = rs[-2], rs[-1]
        predicted = BYTES_PER_OUTPUT_PIXEL * (b["output_mp"] - a["output_mp"]) * 1e6 / 2**20
        growth.append([k, f"{a['width']}x{a['height']} -> {b['width']}x{b['height']}",
                       b["rss_peak_mib"] - a["rss_peak_mib"], predicted])
    return "\n\n".join([
        "# Upscaling throughput and memory (shipped student, tiled path)",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"shared with other jobs (load {machine['load_average']} at the start; per row below); "
        f"{machine['date_utc']} UTC. Tiles {payload['tile']} px, overlap {payload['overlap']}, "
        f"{payload['tile_batch']} tiles per call, renoise {payload['renoise']}; compile (first "
        f"call, one tile batch) in s: {payload['compile_s']}; process ru_maxrss "
        f"{payload['ru_maxrss_mib']:.0f} MiB.",
        table,
        "Peak RSS growth between the two largest sizes vs the whole-image arrays' prediction "
        f"({BYTES_PER_OUTPUT_PIXEL} B per output pixel):",
        common.md_table(["K", "sizes", "measured MiB", "predicted MiB"], growth),
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=lambda t: [size_arg(v) for v in t.split(",")],
                    default=[(1024, 768), (2048, 1536)], help="output sizes WxH, comma-separated")
    ap.add_argument("--steps", type=lambda t: [int(v) for v in t.split(",")], default=[1, 4])
    ap.add_argument("--teacher_size", type=size_arg, default=(176, 176))
    ap.add_argument("--teacher_steps", type=int, default=50)
    ap.add_argument("--tile_batch", type=int, default=16)
    ap.add_argument("--model", default=None)
    ap.add_argument("--name", default="upscale_throughput")
    args = ap.parse_args(argv)
    for w, h in [*args.sizes, args.teacher_size]:
        if w > 2048 or h > 1536:
            ap.error(f"size {w}x{h} is larger than the 2048x1536 benchmark photo")
    machine = common.machine_info()
    payload = run(args)
    payload["machine"] = machine
    payload["machine_after"] = {"uptime": common.uptime()}
    try:
        text = markdown(payload, machine)
    except Exception as e:  # noqa: BLE001 - keep the measurements whatever the table does
        text = f"markdown table failed: {type(e).__name__}: {e}"
    common.write_results(args.name, payload, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
