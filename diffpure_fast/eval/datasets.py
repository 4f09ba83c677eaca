"""Data sources for an evaluation: images (N, C, H, W) float32 in [0, 1] with int64 labels, read by index.

Specs (``load_data``):

* ``digits:test`` / ``digits:train``: the embedded scikit-learn digits split (16x16, 1 channel);
* ``cifar10:FOLDER`` (``:test``, the default, or ``:train``): CIFAR-10's own python batches (``test_batch``,
  ``data_batch_1..5``) read with a restricted unpickler that rebuilds only dicts, lists, bytes and numpy arrays;
* a folder of PNG/JPEG images in one sub-folder per integer class (``0/``, ``1/``, ...), or a flat folder with a
  ``labels.txt`` (one integer per line, in the sorted order of the file names);
* an ``.npz`` holding ``x`` (N, C, H, W) and ``y`` (N,); an ``.npy`` of images with ``labels=`` an ``.npy`` of labels
  (uint8 images are read as 0..255, float ones must lie in [0, 1]).

Through the API, a ``(x, y)`` pair of tensors or any ``torch.utils.data.Dataset`` whose items are ``(image (C, H, W)
in [0, 1], label)`` is accepted as it is.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from .._validate import OptionError, OptionFileNotFoundError, OptionTypeError

__all__ = ["DataSource", "load_data", "read_cifar10_batch"]


class DataSource:
    """Indexable images and labels: ``get(indices) -> (x (B, C, H, W) float32 in [0, 1], y (B,) int64)``."""

    def __init__(self, get, n: int, description: str):
        self._get, self.n, self.description = get, n, description

    def __len__(self) -> int:
        return self.n

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._get([int(i) for i in indices])
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        where = f"({self.description})"
        if x.dim() != 4 or not x.is_floating_point():
            raise OptionError("data", f"expected float images (B, C, H, W), got {x.dtype} {tuple(x.shape)}",
                              where=where)
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            raise OptionError("data", f"images must lie in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}] "
                                      f"(nothing is clipped: rescale them)", where=where)
        if y.shape != (x.shape[0],) or y.dtype.is_floating_point:
            raise OptionError("data", f"expected integer labels of shape ({x.shape[0]},), got {y.dtype} "
                                      f"{tuple(y.shape)}", where=where)
        return x.float().contiguous(), y.to(torch.int64)


def _tensor_source(x, y, description: str) -> DataSource:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() != 4:
        raise OptionError("data", f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise OptionError("data", f"expected {x.shape[0]} labels (N,), got shape {tuple(y.shape)}")
    return DataSource(lambda idx: (x[idx], y[idx]), x.shape[0], description)


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and numpy arrays only; any other global (a class, a function) is refused, so a
    crafted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain containers")


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images uint8 (N, 3, 32, 32) and labels int64 (N,)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels'")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10(folder: Path, split: str) -> DataSource:
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise OptionFileNotFoundError("data", f"{folder} lacks CIFAR-10's {', '.join(missing)} (the python "
                                              f"version's files; nothing is downloaded)")
    parts = [read_cifar10_batch(folder / n) for n in names]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return _tensor_source(x, y, f"CIFAR-10 {split} from {folder}")


def _image_folder(folder: Path) -> DataSource:
    from ..image_io import read_images

    subdirs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)
    if subdirs:
        bad = [p.name for p in subdirs if not p.name.isdigit()]
        if bad:
            raise OptionError("data", f"{folder}: class sub-folders must be named by integer label, got {bad[:5]}")
        xs, ys = [], []
        for p in subdirs:
            b = read_images(p)
            xs.append(b.x)
            ys.append(torch.full((len(b.x),), int(p.name), dtype=torch.int64))
        if len({tuple(x.shape[1:]) for x in xs}) > 1:
            raise OptionError("data", f"{folder}: the class folders hold images of different shapes")
        return _tensor_source(torch.cat(xs), torch.cat(ys), f"image folder {folder}")
    labels_file = folder / "labels.txt"
    if not labels_file.is_file():
        raise OptionError("data", f"{folder}: expected one sub-folder per integer class, or a labels.txt beside the "
                                  f"images")
    b = read_images(folder)
    try:
        y = torch.tensor([int(s) for s in labels_file.read_text().split()], dtype=torch.int64)
    except ValueError:
        raise OptionError("data", f"{labels_file}: expected one integer label per line") from None
    if len(y) != len(b.x):
        raise OptionError("data", f"{labels_file} has {len(y)} labels for {len(b.x)} images")
    return _tensor_source(b.x, y, f"image folder {folder}")


def load_data(data, *, labels=None) -> DataSource:
    """A ``DataSource`` from a spec string (see the module doc), an ``(x, y)`` pair, or a torch ``Dataset``."""
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return _tensor_source(data[0], data[1], "tensors given to evaluate")
    if isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
        except TypeError:
            raise OptionTypeError("data", "the Dataset must have a length (a map-style Dataset)") from None

        def get(idx):
            items = [data[i] for i in idx]
            return (torch.stack([torch.as_tensor(it[0]) for it in items]),
                    torch.tensor([int(it[1]) for it in items], dtype=torch.int64))
        return DataSource(get, n, f"{type(data).__name__} dataset")
    if not isinstance(data, (str, Path)):
        raise OptionTypeError("data", f"expected a spec string, an (x, y) pair of tensors or a torch Dataset, got "
                                      f"{type(data).__name__}")
    spec = str(data)
    if spec.startswith("digits"):
        split = spec.partition(":")[2] or "test"
        from ..data import load_digits_dataset

        x, y = load_digits_dataset(split)
        return _tensor_source(x, y, f"digits:{split}")
    if spec.startswith("cifar10:"):
        rest = spec[len("cifar10:"):]
        folder, split = rest, "test"
        if rest.endswith((":test", ":train")):
            folder, _, split = rest.rpartition(":")
        return _cifar10(Path(folder), split)
    path = Path(spec)
    if not path.exists():
        raise OptionFileNotFoundError("data", f"no such file or folder: {spec!r} (or use digits:test, cifar10:FOLDER)")
    if path.is_dir():
        return _image_folder(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            kx = next((k for k in ("x", "images") if k in z), None)
            ky = next((k for k in ("y", "labels") if k in z), None)
            if kx is None or ky is None:
                raise OptionError("data", f"{path}: expected arrays 'x' and 'y' (or 'images' and 'labels'), found "
                                          f"{list(z.keys())}")
            return _tensor_source(torch.from_numpy(z[kx]), torch.from_numpy(z[ky]), str(path))
    if path.suffix == ".npy":
        if labels is None:
            raise OptionError("labels", f"{path} holds images only; give the labels (an .npy of N integers)")
        return _tensor_source(torch.from_numpy(np.load(path, allow_pickle=False)),
                              torch.from_numpy(np.load(labels, allow_pickle=False)), str(path))
    raise OptionError("data", f"expected digits:SPLIT, cifar10:FOLDER, a folder of images, .npz or .npy, got {spec!r}")
