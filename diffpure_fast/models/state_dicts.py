"""One normaliser of checkpoint state dicts, for every family the package loads (score_sde, guided-diffusion, the
shipped safetensors weights): the same saved form is accepted everywhere or nowhere.

Training code wraps networks, and the wrappers leave their marks on the saved keys and containers:

* key prefixes: ``module.`` (``nn.DataParallel`` / ``DistributedDataParallel``), ``module.0.`` (``DataParallel`` around
  ``Sequential(net)``: the save format of Gowal et al.'s reimplementation, DiffPure's ``weights-best.pt``),
  ``_orig_mod.`` (``torch.compile``), ``model.`` (a training module holding the network as ``self.model``, e.g.
  PyTorch Lightning), in any nesting;
* wrapping dicts: ``{"state_dict": ...}`` (Lightning), ``{"model_state_dict": ...}``, ``{"model": ...}``,
  ``{"ema": ...}``, ``{"net": ...}`` around the state dict itself.

A prefix is removed only when every key carries it and the network's own keys do not (so a network whose
parameters really live under ``model.`` keeps them); a wrapping dict is opened only when exactly one of its entries
is a state dict (two, e.g. raw and EMA weights side by side, are an error asking which one). A key still missing or
unexpected after that is an error naming the file and the keys, with one exception: BatchNorm's
``num_batches_tracked`` buffers, absent from files saved before torch 0.4.1 (torchvision's ResNet-18/50 weights), are
filled with the network's own value, as torch's ``load_state_dict`` does for such files (the buffer only sets the
running-average momentum when training with ``momentum=None``; it never changes an eval-mode output).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._validate import OptionError

__all__ = ["WRAPPER_KEYS", "WRAPPER_PREFIXES", "is_state_dict", "load_state_dict_strict", "strip_wrapper_prefixes",
           "unwrap_state_dict"]

WRAPPER_PREFIXES = ("module.0.", "module.", "_orig_mod.", "model.")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema", "net")


def _fmt(keys, limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def is_state_dict(d: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def strip_wrapper_prefixes(state: Mapping[str, Any], expected: Iterable[str] | None = None) -> dict[str, Any]:
    """``state`` with the prefixes of ``WRAPPER_PREFIXES`` removed, repeatedly, while every key carries the same
    one; with ``expected`` (the network's own keys), a prefix those keys all carry too is kept (and ``module.0.``
    is read as ``module.`` when the network's own keys all start with ``0.``, i.e. it is a ``Sequential``)."""
    out = dict(state)
    expected = list(expected) if expected is not None else []

    def kept(p: str) -> bool:
        own = p[len("module."):] if p == "module.0." else p
        return bool(expected) and all(k.startswith(own) for k in expected)

    while out:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in out) and not kept(p)), None)
        if prefix is None:
            break
        out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def unwrap_state_dict(obj: Any, *, option: str = "checkpoint", where: str = "") -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: ``obj`` itself, or the one entry of a wrapping dict (``WRAPPER_KEYS``, nested)
    that holds one; its wrapper prefixes are stripped. Errors (``OptionError``) name the argument ``option`` and
    ``where`` in it (the file, e.g. ``"'model.pt'"``)."""
    if is_state_dict(obj):
        return strip_wrapper_prefixes(obj)
    if not isinstance(obj, Mapping):
        raise OptionError(option, f"expected a state dict (a dict of tensors), got {type(obj).__name__}",
                          where=where)
    inner = {k: v for k, v in obj.items() if k in WRAPPER_KEYS and isinstance(v, Mapping)}
    found = {k: v for k, v in inner.items() if is_state_dict(v) or any(isinstance(w, Mapping) for w in v.values())}
    if len(found) == 1:
        (key, value), = found.items()
        return unwrap_state_dict(value, option=option, where=f"{where}[{key!r}]")
    if len(found) > 1:
        raise OptionError(option, f"holds several state dicts ({', '.join(map(repr, found))}); load the file and "
                                  f"pass the one you mean (e.g. torch.load(path)[{next(iter(found))!r}])", where=where)
    raise OptionError(option, f"expected a state dict (a dict of tensors) or a dict wrapping one under one of "
                              f"{list(WRAPPER_KEYS)}, got keys {_fmt(obj.keys())}", where=where)


def load_state_dict_strict(net: nn.Module, state: Mapping[str, Any], *, option: str = "checkpoint", where: str = "",
                           hint: str = "") -> None:
    """Load ``state`` into ``net`` exactly (after ``strip_wrapper_prefixes`` against the network's keys): every key
    present, none extra, every shape equal; otherwise an ``OptionError`` naming the argument ``option``, ``where``
    in it (the file) and the keys. ``hint``: appended to a key mismatch's message (e.g. which config built the
    network)."""
    expected = net.state_dict()
    state = strip_wrapper_prefixes(state, expected.keys())
    for k in expected:  # files saved before torch 0.4.1 lack these buffers (see the module doc)
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = expected[k].clone()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_fmt(unexpected)}")
        raise OptionError(option, "state dict does not match the network: " + "; ".join(parts)
                          + (f" ({hint})" if hint else ""), where=where)
    for k, ref in expected.items():
        got = state[k]
        if not isinstance(got, torch.Tensor):
            # ValueError (not TypeError) throughout: a malformed checkpoint is a bad value of the argument
            raise OptionError(option, f"entry {k!r} is a {type(got).__name__}, expected a tensor", where=where)
        if tuple(got.shape) != tuple(ref.shape):
            raise OptionError(option, f"shape mismatch for {k!r}: checkpoint has {tuple(got.shape)}, the network "
                                      f"built from the config expects {tuple(ref.shape)}", where=where)
    net.load_state_dict(state, strict=True)
