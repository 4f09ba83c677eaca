"""Classifier sources: images (B, C, H, W) in [0, 1] -> logits (B, K), in eval mode with frozen parameters.

Specs (``load_classifier_spec``): ``digits`` (the embedded CNN); a TorchScript file (``.pt``/``.ts``/``.pth``
saved by ``torch.jit.save``); ``package.module:function`` (called with no arguments, returning an ``nn.Module``).
An ``nn.Module`` is used as it is, and must be in eval mode. AGDM's auxiliary networks (``load_auxiliary_spec``)
come from the same specs, ``digits`` being the shipped adversarially trained auxiliary network.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from .._validate import OptionError, OptionFileNotFoundError, OptionTypeError, check_eval_mode

__all__ = ["load_auxiliary_spec", "load_classifier_spec"]


def _frozen_params(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _freeze(m: nn.Module) -> nn.Module:
    return _frozen_params(m.eval())


def _load_module_spec(spec, device, what: str, load_digits) -> nn.Module:
    """An nn.Module from ``spec``: a module, ``"digits"`` (``load_digits(device)``), a TorchScript file or
    ``module:function``; frozen. What the package loads from a spec is put in eval mode; a module given as it is
    must already be in eval mode (an error naming ``what`` otherwise: its mode is the caller's). Errors name
    ``what`` (the argument)."""
    if isinstance(spec, nn.Module):
        check_eval_mode(what, spec)
        return _frozen_params(spec.to(device))
    if not isinstance(spec, (str, Path)):
        raise OptionTypeError(what, f"expected an nn.Module or a spec string, got {type(spec).__name__}")
    spec = str(spec)
    if spec == "digits":
        return _freeze(load_digits(torch.device(device)))
    path = Path(spec)
    if path.is_file():
        try:
            m = torch.jit.load(str(path), map_location=device)
        except RuntimeError as e:
            raise OptionError(what, f"{spec} is not a TorchScript file ({str(e).splitlines()[0]}); save one "
                                    f"with torch.jit.save, or pass module:function") from None
        return _freeze(m)
    if ":" in spec and not path.exists():
        mod_name, _, fn_name = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise OptionError(what, f"cannot import module {mod_name!r} ({e})") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise OptionError(what, f"{mod_name!r} has no callable {fn_name!r}")
        m = fn()
        if not isinstance(m, nn.Module):
            raise OptionTypeError(what, f"{spec}() returned a {type(m).__name__}, expected an nn.Module")
        return _freeze(m.to(device))
    raise OptionFileNotFoundError(what, f"{spec!r} is neither 'digits', a TorchScript file nor module:function")


def load_classifier_spec(spec, device="cpu") -> nn.Module:
    """The classifier an evaluation attacks (inputs in [0, 1], logits out)."""
    from ..models.digits import load_digits_classifier

    return _load_module_spec(spec, device, "classifier", load_digits_classifier)


def load_auxiliary_spec(spec, device="cpu") -> nn.Module:
    """AGDM's auxiliary network (``dpf.load_auxiliary`` for ``"digits"``): returns (features, logits)."""
    from ..models.auxiliary import load_auxiliary

    return _load_module_spec(spec, device, "auxiliary", lambda dev: load_auxiliary("digits", dev))
