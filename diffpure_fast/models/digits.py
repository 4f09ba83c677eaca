"""The embedded default model: a small NCSN++ score model and a CNN classifier for scikit-learn's digits.

Both are trained by ``scripts/train_digits.py`` on ``diffpure_fast.data.load_digits_dataset`` (16x16, [0, 1]) and
shipped as safetensors files under ``diffpure_fast/weights/``; the architecture config travels in each file's
metadata (JSON under the key ``"config"``), so the loaders rebuild the network without any other file.

* ``load_digits_score_model()``: a ``ScoreModel`` (continuous VP-SDE epsilon model, beta in [0.1, 20], labels
  ``999 t``) over images in [-1, 1];
* ``load_digits_classifier()``: a ``DigitsClassifier`` taking images in [0, 1], in eval mode, frozen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._validate import OptionError, OptionFileNotFoundError
from ..schedule import DIFFPURE_SCHEDULE, VPSchedule
from .base import EpsModel, ScoreModel
from .classifier import DigitsClassifier
from .state_dicts import load_state_dict_strict

__all__ = [
    "CLASSIFIER_WEIGHTS",
    "DIGITS_SCORE_CONFIG",
    "SCORE_WEIGHTS",
    "WEIGHTS_DIR",
    "build_digits_score_net",
    "digits_dsm_loss",
    "load_digits_classifier",
    "load_digits_score_model",
    "load_weights",
    "read_weights",
    "save_weights",
]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SCORE_WEIGHTS = WEIGHTS_DIR / "digits_score.safetensors"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "digits_classifier.safetensors"

_TRAIN_HINT = ("train it (about 20 minutes on 2 CPU cores, no downloads) with:\n"
               "    python scripts/train_digits.py --out diffpure_fast/weights")

# NCSN++ (score_sde) for 1-channel 16x16 digits: keyword arguments of ``ncsnpp.NCSNpp``.
DIGITS_SCORE_CONFIG: dict[str, Any] = dict(
    image_size=16, num_channels=1, nf=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
    dropout=0.1, resblock_type="biggan", fir=False, skip_rescale=True, embedding_type="positional",
    conditional=True, centered=True,
)


def build_digits_score_net(config: dict[str, Any] | None = None) -> nn.Module:
    """A fresh (untrained) NCSN++ network: ``NCSNpp(**config)`` (default ``DIGITS_SCORE_CONFIG``)."""
    from .ncsnpp import NCSNpp

    return NCSNpp(**dict(DIGITS_SCORE_CONFIG if config is None else config))


def digits_dsm_loss(model: ScoreModel, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """score_sde's continuous DSM loss (epsilon form, per-pixel mean) at given times and noise.

    x0: clean images in [-1, 1]; t: (B,) times in (0, 1]; z: standard normal noise like x0.
    ``x_t = sqrt(alpha_bar(t)) x0 + sigma(t) z`` with the continuous schedule; returns ``mean (eps(x_t, t) - z)^2``.
    """
    schedule = model.schedule
    shape = (-1,) + (1,) * (x0.dim() - 1)
    mean = torch.exp(0.5 * schedule.log_alpha_bar(t)).reshape(shape)
    std = schedule.sigma(t).reshape(shape)
    xt = mean * x0 + std * z
    return (model.eps(xt, t) - z).square().mean()


# ---- safetensors with a JSON architecture config in the metadata ----
def save_weights(module: nn.Module, path: str | Path, config: dict[str, Any], *, kind: str,
                 dtype: torch.dtype = torch.float32, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for name, value in module.state_dict().items():
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.contiguous()
    metadata = {"format": "pt", "kind": kind, "config": json.dumps(config, sort_keys=True)}
    if extra:
        metadata["training"] = json.dumps(extra, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_weights(path: str | Path | None, *, kind: str, default: Path | None = None, hint: str = _TRAIN_HINT,
                 option: str = "path") -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """(state dict in float32, architecture config, raw metadata) of a weight file: ``path``, or the shipped
    ``default`` when None (``hint`` says how to make a missing shipped file). Errors about a given file name the
    argument ``option`` and the file."""
    from safetensors import safe_open

    given = path is not None or default is None
    path = Path(default if path is None else path)
    if not path.is_file():
        if given:
            raise OptionFileNotFoundError(option, f"digits {kind} weights not found at {path}; {hint}")
        raise FileNotFoundError(f"digits {kind} weights not found at {path}; {hint}")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error types for empty, truncated or foreign files
        raise OptionError(option, f"not a readable safetensors file ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})", where=repr(str(path))) from None
    if metadata.get("kind") != kind or "config" not in metadata:
        raise OptionError(option, f"not a digits {kind} weight file (metadata kind={metadata.get('kind')!r})"
                                  + ("" if given else f"; {hint}"), where=repr(str(path)))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    return state, json.loads(metadata["config"]), metadata


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path | None, *,
                 option: str = "path") -> nn.Module:
    """Load a weight file's ``state`` into the network rebuilt from its config, strictly (keys normalised by
    ``state_dicts``; a mismatch names ``option`` and the file), and return the network."""
    load_state_dict_strict(module, state, option=option, where=repr(str(path)) if path is not None else "",
                           hint="the weights do not match the config in the file's own metadata")
    return module


def _freeze(module: nn.Module, device) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if device is not None:
        module.to(device)
    return module


def load_digits_score_model(device: str | torch.device | None = None, *, path: str | Path | None = None,
                            schedule: VPSchedule = DIFFPURE_SCHEDULE) -> ScoreModel:
    """The shipped digits score model: ``EpsModel(NCSN++, time_input="continuous")`` in eval mode, frozen.

    Inputs are 1x16x16 images in [-1, 1] (``2 x - 1`` of ``load_digits_dataset`` images).
    """
    state, config, _ = read_weights(path, kind="score", default=SCORE_WEIGHTS, option="checkpoint")
    net = load_weights(build_digits_score_net(config), state, path, option="checkpoint")
    model = EpsModel(net, time_input="continuous", schedule=schedule)
    return _freeze(model, device)


def load_digits_classifier(device: str | torch.device | None = None, *, path: str | Path | None = None
                           ) -> DigitsClassifier:
    """The shipped digits classifier (inputs (B, 1, 16, 16) in [0, 1], logits (B, 10)), in eval mode, frozen."""
    state, config, _ = read_weights(path, kind="classifier", default=CLASSIFIER_WEIGHTS)
    return _freeze(load_weights(DigitsClassifier.from_config(config), state, path), device)
