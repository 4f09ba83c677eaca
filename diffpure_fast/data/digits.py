"""scikit-learn's bundled handwritten digits as a tiny image data set for the embedded default model.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-level images (values 0..16, 10 classes) inside the
scikit-learn wheel, so nothing is downloaded.  We split them once with a fixed seed (stratified 80/20), scale
them to [0, 1] and upsample 8x8 -> ``DIGITS_RESOLUTION`` with bilinear interpolation (``align_corners=False``).

16x16 is the default: it is the smallest size at which a U-Net with two downsamplings (16 -> 8 -> 4) and
attention at 8x8 still makes sense, while keeping the CPU cost of a purification small.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .._validate import check_choice, check_int

__all__ = [
    "DIGITS_NUM_CLASSES",
    "DIGITS_RESOLUTION",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "load_digits_dataset",
]

DIGITS_RESOLUTION = 16       # the one place the image size of the embedded model is chosen
DIGITS_NUM_CLASSES = 10
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
_NATIVE_RESOLUTION = 8
_MAX_VALUE = 16.0


@functools.lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from .._optional import require

    datasets = require("sklearn.datasets", "the digits data set (digits:test, digits:train, the demo)")
    train_test_split = require("sklearn.model_selection", "the digits data set").train_test_split
    bunch = datasets.load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)          # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                           stratify=labels)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def load_digits_dataset(split: str = "train", resolution: int = DIGITS_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits ``split`` ("train": 1,437 images, "test": 360) as ``(images, labels)``.

    images: float32 (N, 1, resolution, resolution) in [0, 1]; labels: int64 (N,) in 0..9.  The split is fixed
    (stratified, seed ``DIGITS_SPLIT_SEED``) and the order is the original data-set order, so every call returns the
    same tensors.
    """
    check_choice("split", split, ("train", "test"))
    resolution = check_int("resolution", resolution)
    images, labels, train_idx, test_idx = _split_indices()
    idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(images[idx].copy()).unsqueeze(1) / _MAX_VALUE
    if resolution != _NATIVE_RESOLUTION:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).contiguous()
    y = torch.from_numpy(labels[idx].copy())
    return x, y
