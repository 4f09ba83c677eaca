"""Classifiers from an installed library, with local weights only (nothing is downloaded):

* ``robustbench:NAME``: ``robustbench.utils.load_model(NAME, model_dir, dataset, threat_model)`` on a model folder
  that already holds ``<model_dir>/<dataset>/<threat_model>/NAME.pt`` (checked first: RobustBench would download a
  missing file). ``checkpoint``: that folder, or the file itself (its folders then give the dataset and threat
  model). RobustBench models take [0, 1] pixels (their normalisation is inside).
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **architecture)``, the weights file loaded
  strictly (through ``models.state_dicts``); normalised with ImageNet's mean and std (the statistics of torchvision's
  ImageNet weights) unless ``normalize`` says otherwise.
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **architecture)``, the weights file loaded strictly;
  normalised with the model's ``pretrained_cfg`` mean and std (ImageNet's when it has none) unless ``normalize``.

Each library is an optional extra (``pip install 'diffpure_fast[robustbench]'``, ``[torchvision]``, ``[timm]``),
imported here only; a missing one is a ``MissingDependency`` naming the extra.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..._optional import require
from ..._validate import OptionError, OptionFileNotFoundError
from ..state_dicts import load_state_dict_strict, unwrap_state_dict

__all__ = ["LIBRARIES", "load_library_classifier"]

LIBRARIES = ("robustbench", "torchvision", "timm")


def load_library_classifier(library: str, model_name: str, *, checkpoint, normalize, trust_checkpoint: bool,
                            architecture: dict, what: str) -> nn.Module:
    """The ``ImageClassifier`` of ``library:model_name`` (module doc), in eval mode."""
    from . import IMAGENET_NORMALIZATION, ImageClassifier, _read

    spec = f"{library}:{model_name}"
    if not model_name:
        raise OptionError(what, f"expected {library}:NAME with a model name, got {spec!r}")
    if library == "robustbench":
        net = _robustbench(model_name, checkpoint, architecture)
        return ImageClassifier(net.eval(), normalize=normalize, name=spec)
    if checkpoint is None:  # checked before the import: the error a user can fix first
        raise OptionError("checkpoint", f"{spec} needs a checkpoint path: its weights file (nothing is downloaded)")
    if library == "torchvision":
        models = require("torchvision.models", f"the classifier {spec}")
        net = models.get_model(model_name, weights=None, **architecture)
        default = IMAGENET_NORMALIZATION
    else:
        timm = require("timm", f"the classifier {spec}")
        net = timm.create_model(model_name, pretrained=False, **architecture)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        default = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else IMAGENET_NORMALIZATION
    obj, where = _read(checkpoint, trust_checkpoint, spec)
    load_state_dict_strict(net, unwrap_state_dict(obj, where=where), where=where,
                           hint=f"{spec} built with {architecture or 'its defaults'}")
    return ImageClassifier(net.eval(), normalize=default if normalize is None else normalize, name=spec)


def _robustbench(model_name: str, checkpoint, architecture: dict) -> nn.Module:
    arch = dict(architecture)
    dataset, threat = arch.pop("dataset", None), arch.pop("threat_model", None)
    if arch:
        raise OptionError(next(iter(arch)), "robustbench: models take dataset= and threat_model= only")
    if checkpoint is None or not isinstance(checkpoint, (str, os.PathLike)):
        raise OptionError("checkpoint", f"robustbench:{model_name} needs checkpoint: the RobustBench model folder "
                                        f"holding <dataset>/<threat_model>/{model_name}.pt, or that file (nothing "
                                        f"is downloaded)")
    path = Path(checkpoint)
    if path.is_file():  # <model_dir>/<dataset>/<threat_model>/<name>.pt
        if path.name != f"{model_name}.pt" or len(path.parts) < 3:
            raise OptionError("checkpoint", f"RobustBench reads <model_dir>/<dataset>/<threat_model>/{model_name}.pt;"
                                            f" got the file {str(path)!r}; pass the model folder instead")
        found = {"dataset": path.parent.parent.name, "threat_model": path.parent.name}
        for key, given in (("dataset", dataset), ("threat_model", threat)):
            if given is not None and given != found[key]:
                raise OptionError(key, f"{given!r} contradicts the file's folder {found[key]!r} ({str(path)!r})")
        model_dir, dataset, threat = path.parent.parent.parent, found["dataset"], found["threat_model"]
    else:
        model_dir, dataset, threat = path, dataset or "cifar10", threat or "Linf"
        if not (model_dir / dataset / threat / f"{model_name}.pt").is_file():
            raise OptionFileNotFoundError("checkpoint", f"no {model_name}.pt in {str(model_dir / dataset / threat)!r}"
                                                        f" (RobustBench would download it; nothing is downloaded here:"
                                                        f" put the file there)")
    utils = require("robustbench.utils", f"the classifier robustbench:{model_name}")
    return utils.load_model(model_name=model_name, model_dir=str(model_dir), dataset=dataset, threat_model=threat)
