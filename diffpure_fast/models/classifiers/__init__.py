"""Classifiers an evaluation attacks: images (B, C, H, W) in [0, 1] -> logits (B, K), in eval mode, frozen.

``load_classifier(NAME, checkpoint=PATH, **architecture)`` builds DiffPure's classifiers (its ``classifier_name``,
``utils.get_image_classifier``) from their official files, with no library beyond torch:

==============================  ===========================================  =====================================
name                            network (official file)                      normalisation inside the wrapper
==============================  ===========================================  =====================================
``cifar10-wideresnet-28-10``    RobustBench ``Standard`` WRN (``Standard.pt``) none (it takes [0, 1] pixels)
``cifar10-wideresnet-70-16``    DM WideResNet, Swish (``weights-best.pt``)   CIFAR-10 mean/std (the network's own)
``cifar10-wrn-70-16-dropout``   DiffPure ``WideResNet``, dropout (``weights.pt``)  CIFAR-10 mean/std (the network's own)
``cifar10-resnet-50``           DiffPure ``ResNet50()`` (``weights.pt``)     CIFAR-10 mean/std (the network's own)
``imagenet-resnet18/50/101``    torchvision (``resnet50-0676ba61.pth``, ...) ImageNet mean/std (``_Wrapper_ResNet``)
``imagenet-wideresnet-50-2``    torchvision ``wide_resnet50_2``              ImageNet mean/std
``imagenet-deit-s``             DeiT-S (``deit_small_patch16_224-cd65a155.pth``)  ImageNet mean/std
``celebahq__<Attribute>``       gan-ensembling's ``D`` (``net_best.pth``)    (x - 0.5) / 0.5, logits ``[l, -l]``
==============================  ===========================================  =====================================

Checkpoints are read in their official layouts (wrapping dicts ``state_dict`` / ``model_state_dict`` / ``model``,
``module.`` and ``module.0.`` prefixes, optimizer state ignored) through the one normaliser
(``models.state_dicts``). Sizes come from the state dict's keys and shapes (WideResNet depth and width, ResNet block
type and counts, DeiT width, depth and patch grid, the attribute network's resolution), so the real files and small
ones of the same layout load alike; ``**architecture`` keywords override what is read. Where the official code
normalises inside its network (the CIFAR-10 networks other than ``Standard``), the same constants are applied by the
wrapper, with the same arithmetic, before the network.

Also accepted: ``"digits"`` (the embedded CNN); ``robustbench:NAME``, ``torchvision:NAME``, ``timm:NAME`` through
the library when it is installed (``classifiers.libraries``); a TorchScript file; ``package.module:function``; an
``nn.Module`` in eval mode. ``normalize=(mean, std)`` puts ``(x - mean) / std`` in front of a classifier of one's own
(trained on normalised inputs).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..._validate import OptionError, OptionFileNotFoundError, OptionTypeError, check_bool, check_eval_mode, check_float
from ..state_dicts import load_state_dict_strict, unwrap_state_dict
from .attribute import AttributeClassifier
from .resnet import ResNet
from .vit import VisionTransformer
from .wide_resnet import DMWideResNet, WideResNet

__all__ = ["CIFAR10_NORMALIZATION", "DIFFPURE_CLASSIFIERS", "IMAGENET_NORMALIZATION", "ImageClassifier",
           "check_normalize", "diffpure_classifier", "load_classifier", "load_module"]

CIFAR10_NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_ATTRIBUTE_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class ImageClassifier(nn.Module):
    """``net((x - mean) / std)`` for images x (B, C, H, W) in [0, 1]; logits (B, K).

    normalize: (mean, std), per channel (or one value for all), or None. input_size: (C, H, W) the network computes
    on; None entries: any (e.g. torchvision's ResNets pool adaptively); ``input_multiple``: H and W may be whole
    multiples of it (the attribute network averages larger inputs down). ``name``: what it is (for records).
    The mean and std are buffers, so they are part of ``state_dict()`` and of an evaluation's classifier fingerprint.
    """

    def __init__(self, net: nn.Module, *, normalize=None, input_size=None, input_multiple: bool = False,
                 name: str = ""):
        super().__init__()
        self.net = net
        mean, std = (None, None) if normalize is None else normalize
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))
        self.input_size, self.input_multiple, self.name = input_size, input_multiple, name
        self.eval()

    def check_input(self, shape, what: str = "x") -> None:
        """Refuse an input shape (B, C, H, W) the network cannot take (an error naming ``what``)."""
        if self.input_size is None:
            return
        c, h, w = self.input_size
        shape = tuple(shape)
        ok = len(shape) == 4 and shape[1] == c
        for got, want in ((shape[2:3], h), (shape[3:4], w)):
            if ok and want is not None:
                ok = got[0] == want or (self.input_multiple and got[0] % want == 0)
        if not ok:
            size = "x".join("any" if s is None else str(s) for s in (h, w))
            more = " (or a whole multiple, averaged down)" if self.input_multiple else ""
            raise OptionError(what, f"the classifier {self.name or type(self.net).__name__} takes (B, {c}, "
                                    f"{size}){more} images, got shape {shape}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x.shape)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.net(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}"


def check_normalize(name: str, v) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)``, each a number (for every channel) or a sequence of one per channel, std > 0; None passes
    through."""
    if v is None:
        return None
    if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2:
        raise OptionError(name, f"expected (mean, std), each a number or one per channel, got {v!r}")
    out = []
    for part, low_open in zip(v, (False, True)):
        vals = [part] if not isinstance(part, Sequence) or isinstance(part, str) else list(part)
        if not vals:
            raise OptionError(name, f"expected (mean, std), each a number or one per channel, got {v!r}")
        out.append(tuple(check_float(name, x, low=0.0 if low_open else None, low_open=low_open) for x in vals))
    if len(out[0]) != len(out[1]) and 1 not in (len(out[0]), len(out[1])):
        raise OptionError(name, f"mean and std have {len(out[0])} and {len(out[1])} values; give one per channel "
                                f"(or one value for all channels) for each")
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# DiffPure's classifier names


@dataclass(frozen=True)
class DiffPureClassifier:
    """One of DiffPure's ``classifier_name``s: the network class (with the arguments the name fixes), the
    normalisation the official wrapper or network applies first, the official file and who builds it there."""

    cls: type
    normalize: tuple | None
    filename: str
    official: str
    fixed: Mapping = field(default_factory=dict)


_TV = "torchvision.models.{}(pretrained=True) in DiffPure's _Wrapper_ResNet"
DIFFPURE_CLASSIFIERS = {
    "cifar10-wideresnet-28-10": DiffPureClassifier(
        WideResNet, None, "Standard.pt", "robustbench.load_model('Standard', 'cifar10', 'Linf')"),
    "cifar10-wideresnet-70-16": DiffPureClassifier(
        DMWideResNet, CIFAR10_NORMALIZATION, "weights-best.pt", "robustbench DMWideResNet(depth=70, width=16, "
        "activation_fn=Swish)", {"activation": "swish"}),
    "cifar10-wrn-70-16-dropout": DiffPureClassifier(
        WideResNet, CIFAR10_NORMALIZATION, "weights.pt", "DiffPure classifiers/cifar10_resnet.py "
        "WideResNet_70_16_dropout()", {"dropout": 0.3}),
    "cifar10-resnet-50": DiffPureClassifier(
        ResNet, CIFAR10_NORMALIZATION, "weights.pt", "DiffPure classifiers/cifar10_resnet.py ResNet50()",
        {"stem": "cifar"}),
    "imagenet-resnet18": DiffPureClassifier(ResNet, IMAGENET_NORMALIZATION, "resnet18-f37072fd.pth",
                                            _TV.format("resnet18"), {"stem": "imagenet"}),
    "imagenet-resnet50": DiffPureClassifier(ResNet, IMAGENET_NORMALIZATION, "resnet50-0676ba61.pth",
                                            _TV.format("resnet50"), {"stem": "imagenet"}),
    "imagenet-resnet101": DiffPureClassifier(ResNet, IMAGENET_NORMALIZATION, "resnet101-63fe2227.pth",
                                             _TV.format("resnet101"), {"stem": "imagenet"}),
    "imagenet-wideresnet-50-2": DiffPureClassifier(ResNet, IMAGENET_NORMALIZATION, "wide_resnet50_2-95faca4d.pth",
                                                   _TV.format("wide_resnet50_2"), {"stem": "imagenet"}),
    "imagenet-deit-s": DiffPureClassifier(
        VisionTransformer, IMAGENET_NORMALIZATION, "deit_small_patch16_224-cd65a155.pth",
        "torch.hub.load('facebookresearch/deit:main', 'deit_small_patch16_224') in DiffPure's _Wrapper_ResNet"),
}
_ATTRIBUTE = DiffPureClassifier(AttributeClassifier, _ATTRIBUTE_NORMALIZATION, "net_best.pth",
                                "DiffPure classifiers/attribute_classifier.py ClassifierWrapper")
_ATTRIBUTE_NAME = re.compile(r"celebahq__(\w+)")


def diffpure_classifier(name) -> DiffPureClassifier | None:
    """The entry of a DiffPure classifier name (``celebahq__<Attribute>`` for any attribute), else None."""
    if not isinstance(name, str):
        return None
    if name in DIFFPURE_CLASSIFIERS:
        return DIFFPURE_CLASSIFIERS[name]
    return _ATTRIBUTE if _ATTRIBUTE_NAME.fullmatch(name) else None


def _read(checkpoint, trust_checkpoint: bool, need: str) -> tuple[object, str]:
    """(the object a checkpoint path holds, or the loaded mapping itself; ``where``, the file for errors)."""
    from ..loading import read_checkpoint

    if checkpoint is None:
        raise OptionError("checkpoint", f"{need} needs a checkpoint path (nothing is downloaded)")
    if isinstance(checkpoint, Mapping):
        return checkpoint, ""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise OptionTypeError("checkpoint", f"expected a path or a loaded checkpoint dict, got "
                                            f"{type(checkpoint).__name__}")
    return read_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint), repr(os.fspath(checkpoint))


def _architecture_options(cls: type, fixed: Mapping) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *fixed))


def _load_diffpure(name: str, entry: DiffPureClassifier, checkpoint, trust_checkpoint: bool,
                   architecture: dict) -> ImageClassifier:
    allowed = _architecture_options(entry.cls, entry.fixed)
    for key in architecture:
        if key not in allowed:
            raise OptionError(key, f"not an architecture option of {name} (its options: {', '.join(allowed)}; "
                                   f"{', '.join(f'{k}={v!r}' for k, v in entry.fixed.items()) or 'nothing'} fixed by "
                                   f"the name)")
    obj, where = _read(checkpoint, trust_checkpoint, name)
    state = unwrap_state_dict(obj, where=where)
    infer = entry.cls.architecture_from_state_dict
    inferred = infer(state, where, stem=entry.fixed["stem"]) if entry.cls is ResNet else infer(state, where)
    arch = {**inferred, **architecture, **entry.fixed}
    net = entry.cls(**arch)
    given = f", {', '.join(f'{k}={v!r}' for k, v in architecture.items())} given" if architecture else ""
    load_state_dict_strict(net, state, where=where,
                           hint=f"{name} built as {entry.cls.__name__}({net.architecture}) from the file's keys"
                                f"{given}; official: {entry.official}, file {entry.filename}")
    return ImageClassifier(net, normalize=entry.normalize, input_size=net.input_size,
                           input_multiple=getattr(net, "input_multiple", False), name=name)


# ---------------------------------------------------------------------------------------------------------------


def _frozen(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _import_user_module(name: str):
    """Import the module of a ``module:function`` spec, from the current directory too: ``python -m`` puts it on
    ``sys.path``, the installed ``diffpure-fast`` script does not, and a user's ``my_models.py`` next to their data
    is the common case. The directory is added for this import only."""
    import sys

    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def load_module(spec, *, what: str, device, load_digits=None) -> nn.Module:
    """An ``nn.Module`` from a plain spec: a module (which must be in eval mode: its mode is the caller's),
    ``"digits"`` (``load_digits(device)``), a TorchScript file, or ``package.module:function`` (called with no
    arguments); frozen, and what is loaded here put in eval mode. Errors name ``what`` (the argument)."""
    if isinstance(spec, nn.Module):
        check_eval_mode(what, spec)
        return _frozen(spec.to(device))
    if not isinstance(spec, (str, Path)):
        raise OptionTypeError(what, f"expected an nn.Module or a spec string, got {type(spec).__name__}")
    spec = str(spec)
    if spec == "digits" and load_digits is not None:
        return _frozen(load_digits(torch.device(device)).eval())
    path = Path(spec)
    if path.is_file():
        try:
            m = torch.jit.load(str(path), map_location=device)
        except RuntimeError as e:
            raise OptionError(what, f"{spec} is not a TorchScript file ({str(e).splitlines()[0]}); save one "
                                    f"with torch.jit.save, or pass module:function") from None
        return _frozen(m.eval())
    if ":" in spec and not path.exists():
        mod_name, _, fn_name = spec.partition(":")
        try:
            mod = _import_user_module(mod_name)
        except ImportError as e:
            raise OptionError(what, f"cannot import module {mod_name!r} ({e}); it is looked for in the current "
                                    f"directory ({os.getcwd()}) and on PYTHONPATH") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise OptionError(what, f"{mod_name!r} has no callable {fn_name!r}")
        m = fn()
        if not isinstance(m, nn.Module):
            raise OptionTypeError(what, f"{spec}() returned a {type(m).__name__}, expected an nn.Module")
        return _frozen(m.eval().to(device))
    raise OptionFileNotFoundError(what, f"{spec!r} is not a file, module:function"
                                        + (", a DiffPure classifier name" if what != "auxiliary" else "")
                                        + (" or 'digits'" if load_digits is not None else ""))


def load_classifier(name="digits", *, checkpoint=None, normalize=None, device=None, trust_checkpoint: bool = False,
                    what: str = "name", **architecture) -> nn.Module:
    """A classifier taking images (B, C, H, W) in [0, 1] to logits (B, K), in eval mode with frozen parameters.

    Args:
        name: a DiffPure ``classifier_name`` (module doc's table; e.g. ``"cifar10-wideresnet-28-10"``,
            ``"imagenet-resnet50"``, ``"celebahq__Smiling"``), ``"digits"`` (the embedded 1x16x16 CNN),
            ``"robustbench:NAME"`` / ``"torchvision:NAME"`` / ``"timm:NAME"`` (the optional library, see
            ``classifiers.libraries``), a TorchScript file, ``"package.module:function"``, or an ``nn.Module`` in
            eval mode.
        checkpoint: the weights: a path (read with torch's restricted unpickler, see ``trust_checkpoint``) or a
            loaded dict, in the official layout (DiffPure names: ``Standard.pt``, ``weights-best.pt``,
            ``weights.pt``, torchvision's ``resnet50-0676ba61.pth``, ``deit_small_patch16_224-cd65a155.pth``,
            ``net_best.pth``); ``robustbench:NAME``: the model folder (``<dir>/<dataset>/<threat>/NAME.pt``) or that
            file. Nothing is ever downloaded.
        normalize: ``(mean, std)`` applied first as ``(x - mean) / std`` (one value or one per channel), for a
            classifier trained on normalised inputs. DiffPure names and ``digits`` have their official
            normalisation built in and refuse it; ``torchvision:``/``timm:`` default to the weights' ImageNet
            statistics, which it replaces.
        device: where to put it (default CPU).
        trust_checkpoint: read a pickle with the full unpickler (only for a file whose source you trust).
        what: the argument named in errors about ``name`` (``"classifier"`` in an evaluation).
        **architecture: constructor arguments overriding those read from the checkpoint (e.g. ``depth=28,
            widen_factor=10``; ``robustbench:``: ``dataset``, ``threat_model``; ``torchvision:``/``timm:``: the
            library's model keywords).

    Raises:
        ValueError (``OptionError`` naming the argument): an unknown name, a missing or unreadable checkpoint, a
        state dict whose keys or shapes do not match (naming the file and the keys), an unknown architecture
        keyword; ``MissingDependency`` (an ImportError naming the extra to install) for a library spec whose
        library is missing.
    """
    from ..loading import _check_device

    dev = _check_device(device)
    check_bool("trust_checkpoint", trust_checkpoint)
    norm = check_normalize("normalize", normalize)
    entry = diffpure_classifier(name)
    if entry is not None or name == "digits":
        if norm is not None:
            raise OptionError("normalize", f"{name} applies its official normalisation itself"
                                           + (f" (mean {entry.normalize[0]}, std {entry.normalize[1]})"
                                              if entry is not None and entry.normalize else " (none: [0, 1] pixels)"
                                              if entry is not None else " (x - 0.5)"))
        if entry is None:
            return _load_digits(checkpoint, architecture, dev)
        return _frozen(_load_diffpure(name, entry, checkpoint, trust_checkpoint, architecture).to(dev))
    if isinstance(name, str) and name.partition(":")[0] in ("robustbench", "torchvision", "timm") \
            and not Path(name).exists():
        from .libraries import load_library_classifier

        library, _, model_name = name.partition(":")
        net = load_library_classifier(library, model_name, checkpoint=checkpoint, normalize=norm,
                                      trust_checkpoint=trust_checkpoint, architecture=architecture, what=what)
        return _frozen(net.to(dev))
    kind = "a module" if isinstance(name, nn.Module) else "a TorchScript file or module:function"
    for key, v in (("checkpoint", checkpoint), *architecture.items()):
        if v is not None:
            raise OptionError(key, f"is for DiffPure's classifier names and library specs; {what} {name!r} is "
                                   f"{kind}, which holds its own weights")
    m = load_module(name, what=what, device=dev)
    if not isinstance(name, nn.Module) and not hasattr(m, "name"):
        m.name = str(name)   # what it is, for an evaluation's records
    return m if norm is None else _frozen(ImageClassifier(m, normalize=norm, name=getattr(m, "name", "")).to(dev))


def _load_digits(checkpoint, architecture: dict, dev) -> nn.Module:
    from ..digits import load_digits_classifier

    if architecture:
        raise OptionError(next(iter(architecture)), "the digits classifier's architecture is in its weight file")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise OptionTypeError("checkpoint", f"the digits classifier takes a .safetensors path or None (the shipped "
                                            f"weights), got {type(checkpoint).__name__}")
    clf = load_digits_classifier(dev, path=checkpoint)
    clf.name = "digits"
    return clf
