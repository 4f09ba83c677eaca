"""Bundled data: scikit-learn's handwritten digits (no downloads)."""

from .digits import DIGITS_NUM_CLASSES, DIGITS_RESOLUTION, load_digits_dataset

__all__ = ["DIGITS_NUM_CLASSES", "DIGITS_RESOLUTION", "load_digits_dataset"]
