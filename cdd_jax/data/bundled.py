"""The bundled default dataset: colour photos that ship inside the scikit-image and scikit-learn
wheels, so training and evaluation work offline with nothing downloaded.

The one place that names the photos of each split (fixed, by image; pairwise disjoint, tested):
- train:      "astronaut" (512x512), "chelsea" (451x300), "rocket" (640x427), the left and right
              views of "stereo_motorcycle" (741x500 each), "immunohistochemistry" (512x512) and
              "china" (640x427);
- validation: "flower" (sklearn, 640x427) and "coffee" (skimage, 600x400): every setting is chosen
              on these (they are also the "eval" split whose crops training jobs probe and
              evaluate on);
- test:       "camera", "coins", "moon" (greyscale), "hubble_deep_field" (colour), "brick",
              "gravel" (greyscale textures), all from the scikit-image wheel: reported on, never
              used to choose anything (the full-image evaluation of issue 19 used these two lists,
              `benchmarks/heldout_photos.py`).
The two stereo views are near-duplicates of each other, so both stay in train; no validation or
test photo has a twin or near-duplicate in train. Loaders that fetch from the network (e.g.
skimage's eagle, lily) are not used; retina and grass are left out of test for time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from cdd_jax.data.images import to_rgb_uint8


def _skimage(name: str, view: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[view] if view is not None else image

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle_left": _skimage("stereo_motorcycle", view=0),
    "motorcycle_right": _skimage("stereo_motorcycle", view=1),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "camera": _skimage("camera"),
    "coins": _skimage("coins"),
    "moon": _skimage("moon"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "brick": _skimage("brick"),
    "gravel": _skimage("gravel"),
}

VALIDATION_IMAGES: tuple[str, ...] = ("flower", "coffee")
TEST_IMAGES: tuple[str, ...] = ("camera", "coins", "moon", "hubble_deep_field", "brick", "gravel")
TRAIN_IMAGES: tuple[str, ...] = tuple(
    name for name in _LOADERS if name not in VALIDATION_IMAGES + TEST_IMAGES
)
EVAL_IMAGES = VALIDATION_IMAGES  # The evaluation crops of training jobs come from validation.
SPLITS: dict[str, tuple[str, ...]] = {
    "train": TRAIN_IMAGES,
    "validation": VALIDATION_IMAGES,
    "test": TEST_IMAGES,
    "eval": EVAL_IMAGES,
}


def load_raw_photo(name: str) -> np.ndarray:
    """One bundled photo as its package ships it (uint8; greyscale photos stay (H, W))."""
    if name not in _LOADERS:
        raise ValueError(f"unknown bundled image {name!r}; available: {sorted(_LOADERS)}")
    return np.asarray(_LOADERS[name]())


@functools.cache
def load_bundled_image(name: str) -> np.ndarray:
    """Loads (once per process) one bundled photo as read-only uint8 RGB (H, W, 3)."""
    image = to_rgb_uint8(load_raw_photo(name))
    image.setflags(write=False)
    return image


class BundledImages:
    """Random-access source of the bundled photos of one split ("train", "validation", "test", or
    "eval", the validation photos under the name the data pipeline uses).

    Decoded arrays are cached per process; the object itself holds only names, so it pickles
    cheaply into grain worker processes.
    """

    def __init__(self, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"bundled split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split = split
        self.names: tuple[str, ...] = SPLITS[split]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:
        return load_bundled_image(self.names[index])

    def __repr__(self) -> str:
        return f"BundledImages(split={self.split!r}, names={list(self.names)})"
