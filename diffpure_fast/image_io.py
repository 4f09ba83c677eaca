"""Reading and writing image batches for the CLI: a folder of PNG/JPEG files, an ``.npy``/``.npz`` array, or a
``.pt`` tensor, each written back in the kind it came in. Nothing is resized, converted between channel counts or
clipped on the way in; bad input raises ``ValueError`` naming the file and what was expected.

Reading never runs code: arrays are loaded with ``allow_pickle=False`` and ``.pt`` files with torch's restricted
(``weights_only``) unpickler. Writing is atomic (:func:`atomic_write`): every file is written to a temporary file in
the same folder and renamed into place, so an interrupted run never leaves a half-written output."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._optional import require

__all__ = ["ImageBatch", "read_images", "write_images", "IMAGE_SUFFIXES", "kind_of", "atomic_write", "list_images",
           "read_image_files"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MODES = {"L": 1, "RGB": 3}


@dataclass
class ImageBatch:
    """x: (N, C, H, W) float32 in [0, 1]; how to write it back: ``kind``, and per kind its names (file paths
    relative to the folder, sub-folders included), key, dtype, labels (a folder's labels.txt) and extra arrays."""

    x: torch.Tensor
    kind: str
    names: list[str] = field(default_factory=list)
    key: str | None = None
    uint8: bool = False
    labels: list[int] | None = None      # folder: written as labels.txt, one per name in sorted order
    extra: dict = field(default_factory=dict)   # npz: other arrays written beside the images (y, index)


def kind_of(path: Path) -> str:
    if path.is_dir() or path.suffix == "":
        return "folder"
    kinds = {".npy": "npy", ".npz": "npz", ".pt": "pt", ".pth": "pt"}
    if path.suffix.lower() not in kinds:
        raise ValueError(f"{path}: expected a folder of {'/'.join(IMAGE_SUFFIXES)} images, a .npy/.npz array or "
                         f"a .pt tensor, got a '{path.suffix}' file")
    return kinds[path.suffix.lower()]


def _from_array(a, where: str) -> tuple[torch.Tensor, bool]:
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a.detach().cpu()
    if t.dim() != 4:
        raise ValueError(f"{where}: expected an array of shape (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float() / 255.0, True
    if not t.is_floating_point():
        raise ValueError(f"{where}: expected uint8 (0..255) or float values in [0, 1], got dtype {t.dtype}")
    return t.float(), False


def list_images(folder: str | Path) -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``, any case) directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_files(files) -> np.ndarray:
    """Images (N, C, H, W) uint8 from PNG/JPEG files, grayscale (C = 1) or RGB (C = 3), all of one shape (an error
    naming the file otherwise: nothing is resized or converted)."""
    Image = require("PIL.Image", "reading a folder of images")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                if im.mode not in _MODES:
                    raise ValueError(f"{f}: image mode {im.mode!r} is neither grayscale (L) nor RGB; convert it")
                a = np.asarray(im, dtype=np.uint8)
        except (Image.UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"{f}: shape (C, H, W) = {a.shape} differs from {Path(files[0]).name}'s "
                             f"{arrays[0].shape}")
        arrays.append(a)
    return np.stack(arrays)


def read_images(path: str | Path) -> ImageBatch:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = kind_of(path)
    if kind == "folder":
        files = list_images(path)
        if not files:
            raise ValueError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
        arrays = read_image_files(files)
        return ImageBatch(torch.from_numpy(arrays).float() / 255.0, kind, names=[f.name for f in files], uint8=True)
    try:
        if kind == "npy":
            x, u8 = _from_array(np.load(path, allow_pickle=False), str(path))
            return ImageBatch(x, kind, uint8=u8)
        if kind == "npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(f"{path}: expected one array or one named 'x', found {keys}")
                x, u8 = _from_array(z[key], f"{path}[{key!r}]")
                # every other array (labels, indices, metadata) is written back beside the purified images
                extra = {k: z[k] for k in keys if k != key}
            return ImageBatch(x, kind, key=key, uint8=u8, extra=extra)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        from .models.loading import refused_object

        obj = refused_object(e)
        if obj is None:
            raise ValueError(f"{path}: not a readable pt file (a corrupt, truncated or non-torch file)") from None
        # an image tensor needs no other object: anything else is refused, never unpickled (a pickle can run code)
        raise ValueError(f"{path}: refused to unpickle: a .pt input must hold a plain tensor (torch.save(x, path)), "
                         f"this file holds {obj}, and unpickling other objects could run arbitrary code") from None
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable {kind} file ({e})") from None
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a saved tensor (N, C, H, W), got {type(obj).__name__}")
    x, u8 = _from_array(obj, str(path))
    return ImageBatch(x, kind, uint8=u8)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    # 8-bit outputs cannot hold the reverse SDE's small overshoots past [0, 1]: round and saturate (float outputs
    # keep them).
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restore it at once
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable, *, overwrite: bool = False) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file (binary) in ``path``'s folder, which is then
    flushed, fsync'ed and renamed onto ``path`` (``os.replace``, atomic on POSIX and Windows within one file system).

    Readers see either no file (or the old one) or the complete new one; a crash or Ctrl-C mid-write leaves at most
    nothing behind (the temporary file is removed). An existing ``path`` is replaced only with ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and not overwrite:  # created by someone else while we wrote
            raise FileExistsError(f"{path}: exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


IMAGE_FORMATS = ("png", "keep")


def output_names(names: list[str], image_format: str) -> list[str]:
    """The file names a folder output gets: ``"png"`` (default) renames every image to ``.png`` (lossless: a
    purified image re-encoded as JPEG would carry JPEG's compression artifacts), ``"keep"`` keeps each input's
    name and format. Two inputs that would land on one name (``a.jpg`` and ``a.png``) are an error."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"--image-format: expected one of {IMAGE_FORMATS}, got {image_format!r}")
    out = names if image_format == "keep" else [str(Path(n).with_suffix(".png")) for n in names]
    seen: dict[str, str] = {}
    for n, o in zip(names, out):
        if o in seen:
            raise ValueError(f"--image-format: {seen[o]} and {n} would both be written as {o}; use --image-format "
                             f"keep")
        seen[o] = n
    return out


def _write_folder(path: Path, names: list[str], images: np.ndarray, *, overwrite: bool,
                  labels: list[int] | None = None, jpeg_quality: int = 95) -> None:
    Image = require("PIL.Image", "writing a folder of images")
    order = sorted(range(len(names)), key=lambda i: names[i])
    labels_txt = None if labels is None else "".join(f"{labels[i]}\n" for i in order).encode()

    def save(folder: Path, name: str, arr: np.ndarray, replace: bool) -> None:
        # the name's suffix decides (the temp file has none); JPEG only where the input was JPEG and kept
        if Path(name).suffix.lower() == ".png":
            write = lambda f: Image.fromarray(arr).save(f, format="PNG")  # noqa: E731
        else:
            write = lambda f: Image.fromarray(arr).save(f, format="JPEG", quality=jpeg_quality)  # noqa: E731
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / name, write, overwrite=replace)

    arrays = [img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0) for img in images]
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path}: exists; pass --overwrite to replace it")
        if not path.is_dir():
            raise ValueError(f"{path}: exists and is not a folder; the input is a folder of images")
        # An existing folder is updated in place, each image atomically: replacing the whole folder would delete
        # files the purification did not write (think --output . --overwrite).
        for name, arr in zip(names, arrays):
            save(path, name, arr, True)
        if labels_txt is not None:
            atomic_write(path / "labels.txt", lambda f: f.write(labels_txt), overwrite=True)
        return
    # A new folder is built as a temporary sibling and renamed into place once every image is written.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates it 0700; give it mkdir's permissions
        for name, arr in zip(names, arrays):
            save(tmp, name, arr, False)
        if labels_txt is not None:
            atomic_write(tmp / "labels.txt", lambda f: f.write(labels_txt))
        os.rename(tmp, path)  # fails (rather than merging) if path appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_images(path: str | Path, batch: ImageBatch, x: torch.Tensor, *, overwrite: bool = False,
                 image_format: str = "png", jpeg_quality: int = 95) -> None:
    """Write x (N, C, H, W) in [0, 1] to ``path`` in the input's dtype, atomically (see :func:`atomic_write`); an
    existing output is replaced only with ``overwrite=True``.

    A folder input is written as a folder: PNG files by default (``image_format="png"``: ``a.jpg`` becomes
    ``a.png``), or each input's own name and format (``"keep"``; JPEG at ``jpeg_quality``, 1..95). An array input
    (.npy/.npz/.pt) is written as the kind ``path``'s extension names: an .npz keeps every other array the input
    .npz had (labels, indices); a kind that cannot hold them (.npy, .pt) is refused rather than dropping them."""
    path = Path(path)
    x = x.detach().cpu().float()
    if batch.kind == "folder":
        if not 1 <= jpeg_quality <= 95:   # PIL's documented useful range; above 95 only grows the file
            raise ValueError(f"--jpeg-quality: expected an int in 1..95, got {jpeg_quality}")
        _write_folder(path, output_names(batch.names, image_format), _to_uint8(x), overwrite=overwrite,
                      labels=batch.labels, jpeg_quality=jpeg_quality)
        return
    kind = kind_of(path)
    if kind == "folder":
        raise ValueError(f"--output: {path} has no array extension; an array input is written as .npy, .npz or .pt")
    if batch.extra and kind != "npz":
        raise ValueError(f"--output: the input holds other arrays too ({', '.join(sorted(batch.extra))}), which a "
                         f".{kind} file cannot keep; write an .npz")
    if kind == "npy":
        arr = _to_uint8(x) if batch.uint8 else x.numpy()
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), overwrite=overwrite)
    elif kind == "npz":
        arrays = {batch.key or "x": _to_uint8(x) if batch.uint8 else x.numpy(), **batch.extra}
        atomic_write(path, lambda f: np.savez(f, **arrays), overwrite=overwrite)
    else:
        t = torch.from_numpy(_to_uint8(x)) if batch.uint8 else x
        atomic_write(path, lambda f: torch.save(t, f), overwrite=overwrite)
