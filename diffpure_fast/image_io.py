"""Reading and writing image batches for the CLI: a folder of PNG/JPEG files, an ``.npy``/``.npz`` array, or a
``.pt`` tensor, each written back in the kind it came in. Nothing is resized, converted between channel counts or
clipped on the way in; bad input raises ``ValueError`` naming the file and what was expected."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageBatch", "read_images", "write_images", "IMAGE_SUFFIXES", "kind_of"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MODES = {"L": 1, "RGB": 3}


@dataclass
class ImageBatch:
    """x: (N, C, H, W) float32 in [0, 1]; how to write it back: ``kind``, and per kind its names/key/dtype."""

    x: torch.Tensor
    kind: str
    names: list[str] = field(default_factory=list)
    key: str | None = None
    uint8: bool = False


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


def read_images(path: str | Path) -> ImageBatch:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = kind_of(path)
    if kind == "folder":
        from PIL import Image, UnidentifiedImageError

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    if im.mode not in _MODES:
                        raise ValueError(f"{f}: image mode {im.mode!r} is neither grayscale (L) nor RGB; convert it")
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{f}: not a readable image ({e})") from None
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            if arrays and a.shape != arrays[0].shape:
                raise ValueError(f"{f}: shape (C, H, W) = {a.shape} differs from {files[0].name}'s {arrays[0].shape}")
            arrays.append(a)
        return ImageBatch(torch.from_numpy(np.stack(arrays)).float() / 255.0, kind, names=[f.name for f in files],
                          uint8=True)
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
            return ImageBatch(x, kind, key=key, uint8=u8)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
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


def write_images(path: str | Path, batch: ImageBatch, x: torch.Tensor) -> None:
    """Write x (N, C, H, W) in [0, 1] to ``path`` in the input's kind (folder/npy/npz/pt) and dtype."""
    path = Path(path)
    x = x.detach().cpu().float()
    if batch.kind == "folder":
        from PIL import Image

        path.mkdir(parents=True, exist_ok=True)
        for name, img in zip(batch.names, _to_uint8(x)):
            arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            Image.fromarray(arr).save(path / name)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if batch.kind == "npy":
        np.save(path, _to_uint8(x) if batch.uint8 else x.numpy())
    elif batch.kind == "npz":
        np.savez(path, **{batch.key: _to_uint8(x) if batch.uint8 else x.numpy()})
    else:
        torch.save(torch.from_numpy(_to_uint8(x)) if batch.uint8 else x, path)
