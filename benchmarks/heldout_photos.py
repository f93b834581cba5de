"""Writes the held-out photos of the full-image evaluation (issue 19, acceptance 6) as PNG
folders for `python -m cdd_jax.evaluate --hr=DIR`:

    python benchmarks/heldout_photos.py --out=/tmp/heldout      # -> /tmp/heldout/{val,test}

None of them is a training photo of the bundled dataset (`cdd_jax.data.bundled.TRAIN_IMAGES`):
- val:  the bundled evaluation split (skimage coffee, sklearn flower), the photos whose crops the
        default job evaluated on; inference-side choices (sampler, tile size) are made on these.
- test: other photos in the scikit-image wheel, never looked at while choosing anything:
        camera, coins, moon (greyscale, written as grey PNGs), hubble_deep_field (colour),
        brick, gravel (greyscale textures). Left out for time: retina (1411x1411), grass.
"""

from __future__ import annotations

import argparse
import os

VAL = ("coffee", "flower")
TEST = ("camera", "coins", "moon", "hubble_deep_field", "brick", "gravel")


def load(name: str):
    import numpy as np

    if name == "flower":
        from sklearn.datasets import load_sample_image

        return load_sample_image("flower.jpg")
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from PIL import Image

    from cdd_jax.data.bundled import TRAIN_IMAGES

    for split, names in (("val", VAL), ("test", TEST)):
        folder = os.path.join(args.out, split)
        os.makedirs(folder, exist_ok=True)
        for name in names:
            assert name not in TRAIN_IMAGES, name
            image = load(name)
            Image.fromarray(image).save(os.path.join(folder, f"{name}.png"))
            print(f"{split}/{name}.png {image.shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
