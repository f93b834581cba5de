"""Writes the held-out photos of the full-image evaluation (issue 19, acceptance 6) as PNG
folders for `python -m cdd_jax.evaluate --hr=DIR`:

    python benchmarks/heldout_photos.py --out=/tmp/heldout      # -> /tmp/heldout/{val,test}

The two lists are the bundled dataset's validation and test splits
(`cdd_jax.data.bundled.VALIDATION_IMAGES` / `TEST_IMAGES`, defined there once), neither of them a
training photo:
- val:  skimage coffee, sklearn flower, the photos whose crops the default job evaluated on;
        inference-side choices (sampler, tile size) are made on these.
- test: other photos in the scikit-image wheel, never looked at while choosing anything:
        camera, coins, moon (greyscale, written as grey PNGs), hubble_deep_field (colour),
        brick, gravel (greyscale textures). Left out for time: retina (1411x1411), grass.
"""

from __future__ import annotations

import argparse
import os

from cdd_jax.data.bundled import TEST_IMAGES, TRAIN_IMAGES, VALIDATION_IMAGES, load_raw_photo

VAL = VALIDATION_IMAGES
TEST = TEST_IMAGES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from PIL import Image

    for split, names in (("val", VAL), ("test", TEST)):
        folder = os.path.join(args.out, split)
        os.makedirs(folder, exist_ok=True)
        for name in names:
            assert name not in TRAIN_IMAGES, name
            image = load_raw_photo(name)
            Image.fromarray(image).save(os.path.join(folder, f"{name}.png"))
            print(f"{split}/{name}.png {image.shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
