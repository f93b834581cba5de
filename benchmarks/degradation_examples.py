"""Draws ground-truth / degraded pairs for a few bundled photos to docs/degradation_examples.png.

Rows: photos bundled with scikit-image / scikit-learn. Columns: the (USM-sharpened) GT crop, the
x4 LQ of the realesrgan preset (shown with nearest upsampling), its bicubic condition, and the LQ
of the milder stablesr preset and of the clean bicubic preset.

    python benchmarks/degradation_examples.py [--out=docs/degradation_examples.png]
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from cdd_jax.data import degradations as deg  # noqa: E402

_OUT = flags.DEFINE_string("out", "docs/degradation_examples.png", "Output PNG.")
_CROP = flags.DEFINE_integer("crop", 256, "GT crop side.")
_SEED = flags.DEFINE_integer("seed", 3, "Seed of the per-row generators.")


def _photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "china": china,
        "flower": flower,
    }


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round((x + 1) * 127.5).astype(np.uint8)


def main(argv):
    del argv
    crop = _CROP.value
    transforms = {}
    for preset in ("realesrgan", "stablesr", "bicubic"):
        cfg = deg.degradation_config(preset)
        cfg.degrade_size = 0  # degrade the GT crop itself, so every preset shows the same crop
        transforms[preset] = deg.SRPairTransform(cfg, crop)
    photos = _photos()
    columns = ["GT (USM)", "LQ realesrgan", "cond (bicubic)", "LQ stablesr", "LQ bicubic"]
    fig, axes = plt.subplots(
        len(photos), len(columns), figsize=(2.3 * len(columns), 2.3 * len(photos))
    )
    for row, (name, photo) in enumerate(photos.items()):
        # The same seed per row: every preset draws the same flip and crop first.
        pairs = {
            preset: t.random_map({"image": photo}, np.random.default_rng([_SEED.value, row]))
            for preset, t in transforms.items()
        }
        real = pairs["realesrgan"]
        nearest = lambda lq: np.repeat(np.repeat(lq, 4, axis=0), 4, axis=1)  # noqa: E731
        panels = [
            real["image"],
            nearest(real["lq"]),
            real["cond"],
            nearest(pairs["stablesr"]["lq"]),
            nearest(pairs["bicubic"]["lq"]),
        ]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(_to_uint8(panel), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(
        f"Real-ESRGAN second-order degradation, x4: GT {crop}, LQ {crop // 4} "
        "(LQ shown with nearest upsampling)",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    fig.savefig(_OUT.value, dpi=80)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
