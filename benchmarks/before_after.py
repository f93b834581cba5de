"""The README's before/after picture: a whole held-out photo upscaled 4x by the shipped student.

    python benchmarks/before_after.py [--out=docs/upscale_before_after.png] [--steps=4]

The photo: scikit-image's coffee (a held-out photo: the bundled evaluation split, never trained
on), area-downsampled to 128x84 and degraded by the student's own preset (Real-ESRGAN; seed 0),
as `python -m cdd_jax.evaluate` makes its inputs. Panels, each 512x336: the input (nearest-
neighbour 4x, so its pixels show), bicubic 4x, the student (`cdd_jax.Upscaler.load()`, the
`python -m cdd_jax.upscale` path, K = `steps`, `--renoise` as chosen on the validation photos,
seed 0), and the photo itself at that size.
Also writes the input as `<out stem>_input.png` (try `python -m cdd_jax.upscale` on it).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

LR_SIZE = (128, 84)  # (width, height) of the input.


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/upscale_before_after.png")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--renoise", default="fresh", help="the sampler chosen on the validation "
                    "photos (docs/UPSCALE.md)")
    args = ap.parse_args(argv)
    import cv2
    import skimage.data
    from PIL import Image, ImageDraw

    from cdd_jax.data.degradations import degrade
    from cdd_jax.inference.upscaler import Upscaler

    up = Upscaler.load()
    s = up.scale
    w, h = LR_SIZE
    hr = cv2.resize(skimage.data.coffee(), (w * s, h * s), interpolation=cv2.INTER_AREA)
    lq = degrade(hr.astype(np.float32) / np.float32(255.0), np.random.default_rng([0, 0]),
                 up.student.config.degradation)
    lr = np.round(np.clip(lq, 0, 1) * 255).astype(np.uint8)
    bicubic = np.clip(cv2.resize(lr.astype(np.float32), (w * s, h * s),
                                 interpolation=cv2.INTER_CUBIC), 0, 255).round().astype(np.uint8)
    student = up(lr, steps=args.steps, seed=0, renoise=args.renoise)
    panels = [(np.repeat(np.repeat(lr, s, 0), s, 1), f"input {w}x{h}"),
              (bicubic, "bicubic x4"),
              (student, f"shipped student x4, K={args.steps}, {args.renoise}"),
              (hr, "original")]
    canvas = Image.fromarray(np.concatenate([p for p, _ in panels], axis=1))
    draw = ImageDraw.Draw(canvas)
    for i, (_, label) in enumerate(panels):
        x = i * w * s + 6
        draw.rectangle([x - 3, 3, x + 7 * len(label) + 3, 17], fill=(0, 0, 0))
        draw.text((x, 5), label, fill=(255, 255, 255))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    canvas.save(args.out, optimize=True)
    Image.fromarray(lr).save(os.path.splitext(args.out)[0] + "_input.png")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
