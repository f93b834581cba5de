"""The bundled default dataset: colour photos that ship inside the scikit-image and scikit-learn
wheels, so training and evaluation work offline with nothing downloaded.

Split (fixed, by image):
- eval:  "flower" (sklearn, 640x427) and "coffee" (skimage, 600x400);
- train: "astronaut" (512x512), "chelsea" (451x300), "rocket" (640x427), the left and right views
  of "stereo_motorcycle" (741x500 each), "immunohistochemistry" (512x512) and "china" (640x427).
The two stereo views are near-duplicates of each other, so both stay in train; no eval image has a
twin or near-duplicate in train. Loaders that fetch from the network (e.g. skimage's eagle, lily)
are not used.
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
}

EVAL_IMAGES: tuple[str, ...] = ("flower", "coffee")
TRAIN_IMAGES: tuple[str, ...] = tuple(name for name in _LOADERS if name not in EVAL_IMAGES)
SPLITS: dict[str, tuple[str, ...]] = {"train": TRAIN_IMAGES, "eval": EVAL_IMAGES}


@functools.cache
def load_bundled_image(name: str) -> np.ndarray:
    """Loads (once per process) one bundled photo as read-only uint8 RGB (H, W, 3)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown bundled image {name!r}; available: {sorted(_LOADERS)}")
    image = to_rgb_uint8(_LOADERS[name]())
    image.setflags(write=False)
    return image


class BundledImages:
    """Random-access source of the bundled photos of one split ("train" or "eval").

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
