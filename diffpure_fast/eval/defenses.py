"""Building the defense an evaluation attacks: the one place that turns (method, grad_mode, options) into a module."""

from __future__ import annotations

import hashlib
from dataclasses import fields, is_dataclass

from torch import nn

from ..engine import METHODS, Purifier

__all__ = ["DEFENSES", "build_defense", "describe_defense", "jsonable_option", "module_fingerprint"]

# The purification methods ``--method`` accepts (one list for the CLI and the API).
DEFENSES = tuple(METHODS)


def build_defense(model, *, method: str = "diffpure", grad_mode: str = "full", **options) -> Purifier:
    """A ``Purifier`` for ``method`` whose gradient is ``grad_mode`` ("full": exact adjoint, through the guidance
    as ``guidance_grad`` says; "adjoint": continuous adjoint; "bpda": identity backward; "surrogate": a shorter
    unguided DDPM chain); ``options`` go to ``Purifier`` unchanged (the method's options, guidance_grad, ...)."""
    if method not in DEFENSES:
        raise ValueError(f"method: expected one of {DEFENSES}, got {method!r}")
    return Purifier(model, method=method, grad_mode=grad_mode, **options)


def module_fingerprint(module: nn.Module) -> str:
    """``ClassName@sha256[:12]`` of a module's state (names, shapes, values): a record made with other weights
    is told apart when an evaluation resumes."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(module).__name__}@{h.hexdigest()[:12]}"


def jsonable_option(v):
    """An option value as JSON: modules by their fingerprint, tuples as lists, anything else by its repr."""
    if isinstance(v, nn.Module):
        return module_fingerprint(v)
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return list(v) if isinstance(v, tuple) else repr(v)


def describe_defense(defense) -> dict:
    """JSON-able description of a defense (every option that decides its output)."""
    if defense is None:
        return {"method": "none (undefended classifier)"}
    model = getattr(defense, "model", None)
    # the weights' fingerprint, not the class name: a resumed run with another checkpoint is refused
    out = {"class": type(defense).__name__,
           "score_model": module_fingerprint(model) if isinstance(model, nn.Module) else type(model).__name__}
    config = getattr(defense, "config", None)
    if is_dataclass(config):  # its fields only: private caches are not part of what decides the output
        for k in (f.name for f in fields(config)):
            v = getattr(config, k)
            out[k] = ({f.name: jsonable_option(getattr(v, f.name)) for f in fields(v)} if k == "options"
                      else jsonable_option(v))
    if hasattr(config, "resolved"):  # the values the run uses where options are rounded or derived (the level)
        out["resolved"] = config.resolved()
    if getattr(config, "resize", None) is not None:  # the size the defense resizes its inputs to (and back from)
        out["resize_to"] = getattr(model, "image_size", None)
    out.setdefault("method", "diffpure")
    return out
