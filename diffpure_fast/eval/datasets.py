"""Data sources for ``evaluate`` and ``purify``: images (N, C, H, W) float32 in [0, 1] with int64 labels, read by
index, each sample with its source name (recorded with its results).

Specs (``load_data``):

* ``digits:test`` / ``digits:train``: the embedded scikit-learn digits split (16x16, 1 channel);
* ``cifar10:ROOT`` (``:test``, the default, or ``:train``): CIFAR-10's python batches (``test_batch``,
  ``data_batch_1..5``), in ``ROOT`` itself or in ``ROOT/cifar-10-batches-py`` (torchvision's ``CIFAR10(root)``
  layout), read with a restricted unpickler that rebuilds only dicts, lists, bytes and numpy arrays;
* a folder of PNG/JPEG images, in one of two layouts:

  - class sub-folders, torchvision's ``ImageFolder`` layout: folders named by integer label (``0/``, ``7/``: the
    label is the number), or by any other name, e.g. ImageNet's synsets (``n01440764/``, ...), which are sorted as
    ``ImageFolder`` sorts them, the label being the position (0..999 for ImageNet's 1000 folders);
    ``class_index=FILE`` maps the names instead, for a folder with some of the classes only: torchvision's
    ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``), a JSON ``{name: index}``, or a text
    file whose k-th non-empty line starts with the name of class k (ImageNet's ``LOC_synset_mapping.txt``). Files
    are listed as ``ImageFolder`` lists them (sorted, sub-folders included), and read when a batch asks for them;
  - a flat folder with a ``labels.txt``: one integer label per line (blank lines ignored), in the order of the image
    files sorted by name (``purify`` needs no labels);
* an ``.npz`` holding ``x`` (N, C, H, W) and ``y`` (N,); an ``.npy`` of images with ``labels=`` an ``.npy`` of labels
  (uint8 images are read as 0..255, float ones must lie in [0, 1]).

Through the API, a ``(x, y)`` pair of tensors or any ``torch.utils.data.Dataset`` whose items are ``(image (C, H, W)
in [0, 1], label)`` is accepted as it is. ``select_indices`` picks the samples of a run: a contiguous range (``start``,
``n_images``) or DiffPure's seeded random subset (``subset``, ``data_seed``: ``--num_sub``, ``--data_seed``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .._validate import OptionError, OptionFileNotFoundError, OptionTypeError, check_int

__all__ = ["DataSource", "load_data", "read_cifar10_batch", "select_indices"]


class DataSource:
    """Indexable images and labels: ``get(indices) -> (x (B, C, H, W) float32 in [0, 1], y (B,) int64)`` (``y``
    None for a source without labels, which only ``purify`` accepts). ``names[i]``: sample i's source (a file
    relative to ``folder`` for image folders, ``test_batch[42]``, ``file.npz[3]``, ...); ``folder``: the image
    folder a file-based source reads, else None."""

    def __init__(self, get, n: int, description: str, *, names=None, folder: Path | None = None,
                 has_labels: bool = True):
        self._get, self.n, self.description = get, n, description
        self.names = list(names) if names is not None else [f"[{i}]" for i in range(n)]
        self.folder, self.has_labels = folder, has_labels

    def __len__(self) -> int:
        return self.n

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = self._get([int(i) for i in indices])
        x = torch.as_tensor(x)
        where = f"({self.description})"
        if x.dim() != 4 or not x.is_floating_point():
            raise OptionError("data", f"expected float images (B, C, H, W), got {x.dtype} {tuple(x.shape)}",
                              where=where)
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            raise OptionError("data", f"images must lie in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}] "
                                      f"(nothing is clipped: rescale them)", where=where)
        if y is None:
            return x.float().contiguous(), None
        y = torch.as_tensor(y)
        if y.shape != (x.shape[0],) or y.dtype.is_floating_point:
            raise OptionError("data", f"expected integer labels of shape ({x.shape[0]},), got {y.dtype} "
                                      f"{tuple(y.shape)}", where=where)
        return x.float().contiguous(), y.to(torch.int64)


def _tensor_source(x, y, description: str, names=None) -> DataSource:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() != 4:
        raise OptionError("data", f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise OptionError("data", f"expected {x.shape[0]} labels (N,), got shape {tuple(y.shape)}")
    return DataSource(lambda idx: (x[idx], y[idx]), x.shape[0], description, names=names)


def select_indices(n: int, *, start: int = 0, n_images: int | None = None, subset: int | None = None,
                   data_seed: int | None = None, description: str = "the data") -> list[int]:
    """The samples of a run, by index into a data set of ``n``: ``start`` .. ``start + n_images - 1`` (None: to the
    end), or with ``subset`` DiffPure's seeded random subset, ``np.random.RandomState(data_seed).choice(n, subset,
    replace=False)`` in that order (``data/datasets.py``'s ``cifar10_dataset_sub`` / ``imagenet_lmdb_dataset_sub``;
    ``data_seed`` defaults to 0, DiffPure's). A range past the end, or a subset larger than the data, is an error
    naming the option and the bound (never capped)."""
    if subset is not None:
        if start != 0 or n_images is not None:
            raise OptionError("subset", lambda s: f"a seeded random subset replaces the range of {s.name('start')} "
                                                  f"and {s.name('n_images')}; give one or the other")
        subset = check_int("subset", subset)
        if subset > n:
            raise OptionError("subset", f"{description} has {n} samples, got a subset of {subset}")
        seed = check_int("data_seed", 0 if data_seed is None else data_seed, low=0, high=2 ** 32 - 1)
        return [int(i) for i in np.random.RandomState(seed).choice(n, subset, replace=False)]
    if data_seed is not None:
        raise OptionError("data_seed", lambda s: f"seeds the random subset; give {s.name('subset')} too")
    start = check_int("start", start, low=0)
    if start >= n:
        raise OptionError("start", f"{description} has {n} samples (indices 0..{n - 1}), got {start}")
    end = n if n_images is None else start + check_int("n_images", n_images)
    if end > n:
        raise OptionError("n_images", lambda s: f"{description} has {n} samples; {s.setting('start', start)} with "
                                                f"{s.setting('n_images', n_images)} asks for indices up to {end - 1}")
    return list(range(start, end))


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


CIFAR10_FOLDER = "cifar-10-batches-py"


def _cifar10(root: Path, split: str) -> DataSource:
    folder = root / CIFAR10_FOLDER if (root / CIFAR10_FOLDER).is_dir() else root
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise OptionFileNotFoundError("data", f"{folder} lacks CIFAR-10's {', '.join(missing)} (the python "
                                              f"version's files, in ROOT or ROOT/{CIFAR10_FOLDER}; nothing is "
                                              f"downloaded)")
    parts = [read_cifar10_batch(folder / n) for n in names]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    sample_names = [f"{n}[{j}]" for n, p in zip(names, parts) for j in range(len(p[1]))]
    return _tensor_source(x, y, f"CIFAR-10 {split} from {folder}", sample_names)


def _class_index(path, names: list[str]) -> dict[str, int]:
    """``{class folder name: label}`` from a class-index file (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise OptionFileNotFoundError("class_index", f"no such file: {str(path)!r}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise OptionError("class_index", f"{path}: not JSON ({e})") from None
        if not isinstance(obj, dict) or not obj:
            raise OptionError("class_index", f"{path}: expected a JSON object")
        if all(isinstance(v, list) and v for v in obj.values()):   # {"0": ["n01440764", "tench"], ...}
            try:
                mapping = {str(v[0]): int(k) for k, v in obj.items()}
            except ValueError:
                raise OptionError("class_index", f"{path}: expected integer keys (class indices)") from None
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in obj.values()):   # {"n01440764": 0, ...}
            mapping = dict(obj)
        else:
            raise OptionError("class_index", f"{path}: expected {{\"0\": [\"n01440764\", \"tench\"], ...}} or "
                                             f"{{\"n01440764\": 0, ...}}")
    else:
        lines = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
        mapping = {name: k for k, name in enumerate(lines)}
    unknown = [n for n in names if n not in mapping]
    if unknown:
        raise OptionError("class_index", f"{path} has no class named {unknown[0]!r} (a class folder of the data; "
                                         f"{len(unknown)} in all)")
    return mapping


def _image_folder(folder: Path, class_index=None, need_labels: bool = True) -> DataSource:
    from ..image_io import IMAGE_SUFFIXES, list_images, read_image_files

    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    top = list_images(folder)
    if subdirs and top:
        raise OptionError("data", f"{folder} holds both images and sub-folders ({subdirs[0]!r}, ...): expected one "
                                  f"layout, class sub-folders or a flat folder with labels.txt")
    if subdirs:
        if class_index is not None:
            mapping, how = _class_index(class_index, subdirs), f"labels from {class_index}"
        elif all(n.isdigit() for n in subdirs):
            mapping, how = {n: int(n) for n in subdirs}, "labels from the folder names"
        else:   # torchvision's ImageFolder: the classes sorted, the label a class's position
            mapping, how = {n: i for i, n in enumerate(subdirs)}, "classes sorted as torchvision's ImageFolder"
        files, labels = [], []
        for name in subdirs:
            found = [Path(root) / f for root, _, fnames in sorted(os.walk(folder / name, followlinks=True))
                     for f in sorted(fnames) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise OptionError("data", f"{folder / name}: a class folder with no {'/'.join(IMAGE_SUFFIXES)} "
                                          f"images")
            files += found
            labels += [mapping[name]] * len(found)
        y = torch.tensor(labels, dtype=torch.int64)
        description = f"image folder {folder} ({len(subdirs)} class folders, {how})"
    else:
        if not top:
            raise OptionError("data", f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images and no class sub-folders")
        files, labels_file = top, folder / "labels.txt"
        if labels_file.is_file():
            try:
                y = torch.tensor([int(s) for s in labels_file.read_text().split()], dtype=torch.int64)
            except ValueError:
                raise OptionError("data", f"{labels_file}: expected one integer label per line") from None
            if len(y) != len(files):
                raise OptionError("data", f"{labels_file} has {len(y)} labels for {len(files)} images")
        elif need_labels:
            raise OptionError("data", f"{folder}: expected class sub-folders, or a labels.txt beside the images "
                                      f"(one integer per line, in the order of the sorted file names)")
        else:
            y = None
        description = f"image folder {folder}" + (" with labels.txt" if y is not None else "")

    def get(idx):
        x = torch.from_numpy(read_image_files([files[i] for i in idx])).float() / 255.0
        return x, None if y is None else y[idx]

    return DataSource(get, len(files), description, names=[f.relative_to(folder).as_posix() for f in files],
                      folder=folder, has_labels=y is not None)


def load_data(data, *, labels=None, class_index=None, need_labels: bool = True) -> DataSource:
    """A ``DataSource`` from a spec string (see the module doc), an ``(x, y)`` pair, or a torch ``Dataset``.
    class_index: a class-index file for a folder of class sub-folders; need_labels: False lets a flat image folder
    without labels.txt through (``purify``)."""
    if isinstance(data, DataSource):
        return data
    if class_index is not None and not (isinstance(data, (str, Path)) and Path(data).is_dir()):
        raise OptionError("class_index", "maps the class sub-folders of an image folder; the data is not a folder")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return _tensor_source(data[0], data[1], "tensors given to evaluate", [f"tensors[{i}]" for i in
                                                                              range(len(data[0]))])
    if isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
        except TypeError:
            raise OptionTypeError("data", "the Dataset must have a length (a map-style Dataset)") from None

        def get(idx):
            items = [data[i] for i in idx]
            return (torch.stack([torch.as_tensor(it[0]) for it in items]),
                    torch.tensor([int(it[1]) for it in items], dtype=torch.int64))
        name = type(data).__name__
        return DataSource(get, n, f"{name} dataset", names=[f"{name}[{i}]" for i in range(n)])
    if not isinstance(data, (str, Path)):
        raise OptionTypeError("data", f"expected a spec string, an (x, y) pair of tensors or a torch Dataset, got "
                                      f"{type(data).__name__}")
    spec = str(data)
    if spec.startswith("digits"):
        split = spec.partition(":")[2] or "test"
        from ..data import load_digits_dataset

        x, y = load_digits_dataset(split)
        return _tensor_source(x, y, f"digits:{split}", [f"digits:{split}[{i}]" for i in range(len(y))])
    if spec.startswith("cifar10:"):
        rest = spec[len("cifar10:"):]
        folder, split = rest, "test"
        if rest.endswith((":test", ":train")):
            folder, _, split = rest.rpartition(":")
        return _cifar10(Path(folder), split)
    path = Path(spec)
    if not path.exists():
        raise OptionFileNotFoundError("data", f"no such file or folder: {spec!r} (or use digits:test, cifar10:ROOT)")
    if path.is_dir():
        return _image_folder(path, class_index, need_labels)
    def rows(n: int) -> list[str]:
        return [f"{path.name}[{i}]" for i in range(n)]

    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            kx = next((k for k in ("x", "images") if k in z), None)
            ky = next((k for k in ("y", "labels") if k in z), None)
            if kx is None or ky is None:
                raise OptionError("data", f"{path}: expected arrays 'x' and 'y' (or 'images' and 'labels'), found "
                                          f"{list(z.keys())}")
            x = torch.from_numpy(z[kx])
            return _tensor_source(x, torch.from_numpy(z[ky]), str(path), rows(len(x)))
    if path.suffix == ".npy":
        if labels is None:
            raise OptionError("labels", f"{path} holds images only; give the labels (an .npy of N integers)")
        x = torch.from_numpy(np.load(path, allow_pickle=False))
        return _tensor_source(x, torch.from_numpy(np.load(labels, allow_pickle=False)), str(path), rows(len(x)))
    raise OptionError("data", f"expected digits:SPLIT, cifar10:ROOT, a folder of images, .npz or .npy, got {spec!r}")
