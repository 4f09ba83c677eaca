"""Load the official DiffPure score networks (score_sde NCSN++, guided-diffusion ADM, SDEdit's CelebA-HQ DDPM UNet)
from their checkpoint files.

    model = load_score_model("score_sde", "pretrained/score_sde/checkpoint_8.pth")            # CIFAR-10
    model = load_score_model("guided_diffusion", "pretrained/guided_diffusion/256x256_diffusion_uncond.pt")
    model = load_score_model("celebahq_ddpm", "celeba_hq.ckpt")                              # CelebA-HQ 256

Each returns an :class:`~diffpure_fast.models.base.EpsModel` in eval mode whose ``eps``/``score`` reproduce DiffPure's:

* ``score_sde``: labels ``999 t`` (float), ``score = -net(x, 999 t) / std(t)``. The weights are those DiffPure
  evaluates with: the checkpoint's ``model`` state dict (buffers included), then the EMA ``shadow_params`` copied
  over the parameters by position, exactly as ``ema.copy_to(model.parameters())`` does.
  ``config['data']['centered']`` is honoured inside the network as in score_sde (``centered: False`` makes the
  network map its input with ``2 x - 1``; DiffPure's config has ``True``).
* ``guided_diffusion``: integer steps ``(1000 t).long()``, six output channels, the first three are epsilon.
  Precision: DiffPure's ImageNet config has ``use_fp16: True`` and runs the UNet torso in float16 on its GPU. Here
  that conversion is applied only on CUDA (``device`` a CUDA device and ``dtype=None``): on CPU the network stays in
  float32 (float16 convolutions are slow or unsupported on CPU and float32 is the more accurate reference). Pass
  ``dtype=torch.float16`` (or ``torch.bfloat16``) to force the torso conversion, ``dtype=torch.float32`` to keep
  everything float32 on CUDA.

State dicts of every family go through one normaliser (``models.state_dicts``): ``module.`` (``nn.DataParallel``),
``_orig_mod.`` (``torch.compile``) and ``model.`` prefixes, and ``state_dict`` / ``model_state_dict`` / ``model`` /
``ema`` wrapping dicts, are accepted alike; a key still missing is an error naming the file and the key.

The schedule: the returned model carries the ``VPSchedule`` of its config (``model.schedule``), and purification
runs on it. score_sde: ``model.beta_min``, ``model.beta_max``, ``model.num_scales`` (DiffPure's 0.1, 20, 1000 when
absent; DiffPure's own ``RevVPSDE`` always used 0.1..20, which is wrong for a model trained with another range).
A config whose ``training.sde`` is not ``vpsde`` (VE, sub-VP) or whose ``training.continuous`` is False is refused:
the engine implements the continuous VP model only, and running another one as VP would be silently wrong.
guided-diffusion: the ``linear`` noise schedule of ``diffusion_steps`` T (``VPSchedule(0.1, 20, T)``); a
``cosine`` schedule, ``predict_xstart``, and ``rescale_timesteps`` with T other than 1000 are refused, naming the
field (``_guided_schedule`` says why the other fields do not change the network's output).

``celebahq_ddpm``: SDEdit's DDPM UNet (``models.ddpm_unet``; DiffPure's ``ddpm/unet_ddpm.py``) from a plain state
dict such as SDEdit's ``celeba_hq.ckpt``, the config in the layout of DiffPure's ``configs/celeba.yml`` (default:
that file). Integer steps ``(1000 t).long()`` (or the sampler's levels), epsilon output. The config's ``diffusion``
section must be DiffPure's linear betas 1e-4..0.02 over 1000 steps (anything else is an error naming the field);
``model.var_type`` belongs to the sampler and is kept on the model (``model.var_type``), where
``diffusion_type="celebahq-ddpm"`` checks it against its own ``var_type``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from .._validate import OptionError, OptionFileNotFoundError, OptionTypeError, Spelling, check_bool, check_int
from ..schedule import DIFFPURE_SCHEDULE, VPSchedule
from .adm import ADM_IMAGENET256_UNCOND_CONFIG, UNetModel, create_adm_model
from .base import EpsModel, ScoreModel
from .ddpm_unet import DDPMUNet
from .fast import fast_score_model
from .ncsnpp import NCSNPP_CIFAR10_CONFIG, NCSNpp, _section
from .state_dicts import is_state_dict, load_state_dict_strict, strip_wrapper_prefixes, unwrap_state_dict

__all__ = ["FAMILIES", "build_network", "config_image_size", "load_score_model", "official_safe_globals",
           "read_checkpoint", "refused_object", "safe_torch_load"]

FAMILIES = ("score_sde", "guided_diffusion", "celebahq_ddpm", "digits")
_ALIASES = {"score_sde": "score_sde", "ncsnpp": "score_sde", "ddpmpp": "score_sde",
            "guided_diffusion": "guided_diffusion", "guided-diffusion": "guided_diffusion", "adm": "guided_diffusion",
            "celebahq_ddpm": "celebahq_ddpm", "celebahq-ddpm": "celebahq_ddpm", "ddpm_celebahq": "celebahq_ddpm",
            "sdedit": "celebahq_ddpm", "digits": "digits"}


def official_safe_globals() -> list:
    """The non-tensor objects the official checkpoints hold that torch's ``weights_only`` unpickler refuses.

    score_sde's ``checkpoint_*.pth`` stores its Adam ``optimizer.state_dict()``, and score_sde's warm-up sets
    ``g['lr'] = lr * np.minimum(step / warmup, 1.0)`` (``losses.optimization_manager``): the learning rate in
    ``param_groups`` is a NumPy float64 scalar, pickled as ``numpy.core.multiarray.scalar(numpy.dtype('float64'),
    bytes)`` (``numpy._core...`` when written with NumPy 2). Rebuilding one needs exactly these: the ``scalar``
    function under both module names, ``numpy.dtype``, and the float64 dtype class (the unpickler's BUILD checks the
    dtype object's type). None of them can call arbitrary code: ``scalar`` only reinterprets bytes as a number of a
    given dtype. Everything else in the official files (tensors, dicts, lists, ints, floats, strings, ``step`` an
    int, the EMA's ``decay``/``num_updates``/``shadow_params``, guided-diffusion's plain state dict, the conformance
    vectors) is read by the restricted unpickler as it is.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import scalar
    safe: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25: each dtype has its own class
    if dtypes is not None:
        safe.append(dtypes.Float64DType)
    return safe


def _opt_in(s: Spelling) -> str:
    return (f"pass {s.setting('trust_checkpoint', True)} only if you trust the file's source, since unpickling it "
            f"can run arbitrary code")


def safe_torch_load(path: str, *, what: str = "checkpoint", trust_checkpoint: bool = False) -> Any:
    """``torch.load`` on the CPU with the restricted (``weights_only``) unpickler and :func:`official_safe_globals`.

    Any other object in the pickle is refused with a ``ValueError`` (``OptionError`` on the argument ``what``)
    naming the opt-in: a pickle can run code, and people download checkpoints from links.
    ``trust_checkpoint=True`` uses the full unpickler (as DiffPure's own ``torch.load`` does).
    """
    if trust_checkpoint:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise OptionError(what, f"cannot read {path!r} as a torch file: {_first_line(exc)}") from None
    try:
        with torch.serialization.safe_globals(official_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        obj = refused_object(exc)
        if obj is None:  # not a refusal: a corrupt, truncated or foreign file
            raise OptionError(what, f"cannot read {path!r} as a torch file: {_wo_detail(exc)}") from None
        raise OptionError(what, lambda s: f"refused to unpickle {path!r}: it holds {obj}, outside the tensors, "
                                          f"numbers and containers a checkpoint needs; {_opt_in(s)}") from None
    except Exception as exc:
        raise OptionError(what, f"cannot read {path!r} as a torch file: {_first_line(exc)}") from None


# What torch's weights_only unpickler says when it refuses an object (torch/_weights_only_unpickler.py), as opposed
# to a file it cannot parse at all.
_REFUSAL = re.compile(r"GLOBAL ([\w.]+)|allowlisted\s+via `add_safe_globals`,? but got (<[^>]+>|\S+)")


def refused_object(exc: BaseException) -> str | None:
    """The object torch's restricted unpickler refused in ``exc`` (e.g. ``'posix.system'``), or None when the
    error is not a refusal (a corrupt or truncated file)."""
    m = _REFUSAL.search(str(exc))
    return None if m is None else next(g for g in m.groups() if g)


def _wo_detail(exc: BaseException) -> str:
    # torch wraps the unpickler's message in several lines of advice about weights_only; keep the cause only
    msg = str(exc)
    cause = msg.split("WeightsUnpickler error:", 1)[-1].strip()
    return cause.splitlines()[0] if cause else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"


def read_checkpoint(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> Any:
    """Read a ``.pt``/``.pth`` (torch pickle) or ``.safetensors`` file on the CPU.

    Pickles are read with the restricted unpickler (see :func:`safe_torch_load`); ``trust_checkpoint=True`` is the
    explicit opt-in to the full one for files that hold other objects.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise OptionTypeError("checkpoint", f"expected a path, got {type(path).__name__}")
    check_bool("trust_checkpoint", trust_checkpoint)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OptionFileNotFoundError("checkpoint", f"file not found: {path!r}")
    if os.path.isdir(path):
        raise OptionError("checkpoint", f"{path!r} is a directory, expected a checkpoint file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        except Exception as exc:
            raise OptionError("checkpoint", f"cannot read safetensors file {path!r}: {_first_line(exc)}") from None
    return safe_torch_load(path, what="checkpoint", trust_checkpoint=trust_checkpoint)


def _looks_guided(keys) -> bool:
    return any(k.startswith(("input_blocks.", "time_embed.", "middle_block.", "output_blocks.")) for k in keys)


def _looks_score_sde(keys) -> bool:
    return any(k.startswith("all_modules.") for k in keys)


_CONFIG_HINT = "is the config the one this checkpoint was trained with?"


# ---------------------------------------------------------------------------------------------------------------
def build_network(family: str, config: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The bare network (random weights) for a family and an official-format config."""
    family = _family(family)
    if family == "digits":
        from .digits import build_digits_score_net

        return build_digits_score_net(None if config is None else dict(config))
    if family == "score_sde":
        return NCSNpp.from_config(NCSNPP_CIFAR10_CONFIG if config is None else config)
    if family == "celebahq_ddpm":
        return DDPMUNet.from_config(_celebahq_config(config))
    return create_adm_model(ADM_IMAGENET256_UNCOND_CONFIG if config is None else config)


def config_image_size(family: str, config=None) -> int | None:
    """The image size a family's config builds its network for (None when the config does not say), read without
    building the network or reading a checkpoint: inputs can be checked against it before a large file is loaded.
    score_sde and celebahq_ddpm: ``data.image_size``; guided_diffusion: ``image_size``; digits: 16."""
    fam = _family(family)
    if fam == "digits":
        from .digits import DIGITS_SCORE_CONFIG

        return DIGITS_SCORE_CONFIG["image_size"]
    from .ddpm_unet import CELEBAHQ_DDPM_CONFIG

    default = {"score_sde": NCSNPP_CIFAR10_CONFIG, "celebahq_ddpm": CELEBAHQ_DDPM_CONFIG,
               "guided_diffusion": ADM_IMAGENET256_UNCOND_CONFIG}[fam]
    cfg = _plain_dict(default if config is None else config)
    if not isinstance(cfg, Mapping):
        return None
    size = cfg.get("image_size") if fam == "guided_diffusion" else (cfg.get("data") or {}).get("image_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _family(family: str) -> str:
    key = str(family).lower()
    if key not in _ALIASES:
        raise OptionError("family", f"expected one of {FAMILIES}, got {family!r}")
    return _ALIASES[key]


class _Fields(Spelling):
    """Spells the schedule's arguments as the config fields that set them."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields

    def name(self, key: str) -> str:
        return self.fields.get(key, key)


def _score_sde_schedule(config) -> VPSchedule:
    """The VP schedule of a score_sde config (``model.beta_min``, ``model.beta_max``, ``model.num_scales``), after
    refusing what the engine does not implement: ``training.sde`` other than ``vpsde`` (VE and sub-VP SDEs give the
    network's output another meaning) and ``training.continuous: False`` (discrete-time labels ``(N - 1) t`` and a
    discrete std). Absent fields take DiffPure's values (configs/cifar10.yml)."""
    if config is None:
        return DIFFPURE_SCHEDULE
    model = _section(config, "model")
    try:
        training = _section(config, "training")
    except ValueError:
        training = {}
    sde = str(training.get("sde", "vpsde")).lower()
    if sde != "vpsde":
        raise OptionError("config", f"training.sde is {training.get('sde')!r}: only 'vpsde' (DiffPure's "
                                    f"continuous VP SDE) is implemented; VE and sub-VP models give the network's "
                                    f"output another meaning, so they are refused rather than run as VP")
    if training.get("continuous", True) is not True:
        raise OptionError("config", f"training.continuous is {training.get('continuous')!r}: only "
                                    f"continuous-time VP models (labels 999 t, continuous std) are implemented")
    defaults = NCSNPP_CIFAR10_CONFIG["model"]
    beta_min, beta_max, num_scales = (model.get(k, defaults[k]) for k in ("beta_min", "beta_max", "num_scales"))
    try:
        return VPSchedule(beta_min, beta_max, num_scales)
    except OptionError as exc:  # named by the config's fields
        raise OptionError("config", exc.render(_Fields({"beta_min": "model.beta_min", "beta_max": "model.beta_max",
                                                         "num_levels": "model.num_scales"}))) from None


def _guided_schedule(cfg: Mapping[str, Any]) -> VPSchedule:
    """The schedule of a guided-diffusion config, after refusing the diffusion settings the engine does not
    implement: ``noise_schedule`` other than ``linear`` (guided-diffusion's linear betas for T steps are
    ``linspace(0.1 / T, 20 / T, T)``, i.e. ``VPSchedule(0.1, 20, T)``), ``predict_xstart`` (the network would
    output x0, not epsilon), and ``rescale_timesteps`` with ``diffusion_steps`` other than 1000 (float labels
    ``1000 t / T``). ``learn_sigma`` (the variance channels are dropped, as DiffPure does), ``use_kl``,
    ``rescale_learned_sigmas`` (training losses) and ``timestep_respacing`` (a sampler setting: the network still
    sees the original timesteps) do not change what the network's epsilon means."""
    schedule = str(cfg.get("noise_schedule", "linear")).lower()
    if schedule != "linear":
        raise OptionError("config", f"noise_schedule is {cfg.get('noise_schedule')!r}: only guided-"
                                    f"diffusion's 'linear' schedule is implemented (the VP schedule DiffPure uses)")
    if cfg.get("predict_xstart", False):
        raise OptionError("config", "predict_xstart is True: the network would predict x0, and the engine "
                                    "needs an epsilon-prediction network")
    try:
        steps = check_int("diffusion_steps", cfg.get("diffusion_steps", 1000))
    except OptionError as exc:
        raise OptionError("config", str(exc)) from None
    if cfg.get("rescale_timesteps", False) and steps != 1000:
        raise OptionError("config", f"rescale_timesteps with diffusion_steps = {steps}: the "
                                    f"network takes float labels 1000 t / {steps}, which are not implemented "
                                    f"(diffusion_steps 1000, or rescale_timesteps False, are)")
    return VPSchedule(0.1, 20.0, steps)


def _load_score_sde(ckpt: Any, config, use_ema: bool, where: str) -> NCSNpp:
    def bad(detail: str, at: str = "") -> OptionError:
        return OptionError("checkpoint", detail, where=where + at)

    if not isinstance(ckpt, Mapping):
        raise bad(f"expected a score_sde checkpoint dict {{'model', 'ema', ...}}, got {type(ckpt).__name__}")
    if "model" in ckpt and "ema" in ckpt:    # score_sde's own checkpoint_*.pth
        state, ema, at = ckpt["model"], ckpt.get("ema"), "['model']"
        if not is_state_dict(state):
            raise bad(f"expected a state dict, got {type(state).__name__}", at)
        state = strip_wrapper_prefixes(state)
    else:
        if "kind" in ckpt and ("checkpoint" in ckpt or "state_dict" in ckpt):
            raise bad("this is a conformance vector, not a checkpoint; pass vec['checkpoint'] (or run python -m "
                      "diffpure_fast.conformance on the file)")
        try:
            state = unwrap_state_dict(ckpt, where=where)   # a bare NCSN++ state dict (no EMA), possibly wrapped
        except OptionError:
            raise bad(f"not a score_sde checkpoint (expected keys 'model', 'ema', 'optimizer', 'step', or an NCSN++ "
                      f"state dict), got keys {list(ckpt.keys())[:12]}") from None
        ema, at = None, ""
    if _looks_guided(state.keys()):
        raise OptionError("checkpoint", lambda sp: "this is a guided-diffusion (ADM UNet) state dict, not a score_sde "
                                                   f"NCSN++ one; use {sp.setting('family', 'guided_diffusion')}",
                          where=where + at)

    net = NCSNpp.from_config(NCSNPP_CIFAR10_CONFIG if config is None else config)
    load_state_dict_strict(net, state, where=where + at, hint=_CONFIG_HINT)

    if use_ema and ema is not None:
        if not isinstance(ema, Mapping) or "shadow_params" not in ema:
            raise bad("expected the state dict of score_sde's ExponentialMovingAverage with a 'shadow_params' list",
                      "['ema']")
        shadow = list(ema["shadow_params"])
        params = net.ema_parameters()
        if len(shadow) != len(params):
            raise bad(f"expected {len(params)} tensors (the trainable parameters in model.parameters() order), got "
                      f"{len(shadow)}", "['ema']['shadow_params']")
        for i, ((name, p), s) in enumerate(zip(params, shadow)):
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(p.shape):
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise bad(f"shape mismatch for parameter {name!r}: EMA has {got}, the network expects "
                          f"{tuple(p.shape)}", f"['ema']['shadow_params'][{i}]")
        with torch.no_grad():
            for (_, p), s in zip(params, shadow):
                p.copy_(s)
    return net


def _load_guided(ckpt: Any, cfg: Mapping[str, Any], where: str) -> UNetModel:
    score_sde = OptionError("checkpoint", lambda sp: "this is a score_sde (NCSN++) checkpoint, not a guided-diffusion "
                                                     f"state dict; use {sp.setting('family', 'score_sde')}",
                            where=where)
    if not isinstance(ckpt, Mapping):
        raise OptionError("checkpoint", f"expected a guided-diffusion state dict, got {type(ckpt).__name__}",
                          where=where)
    if "model" in ckpt and "ema" in ckpt and isinstance(ckpt["ema"], Mapping) and "shadow_params" in ckpt["ema"]:
        raise score_sde
    state = unwrap_state_dict(ckpt, where=where)
    if _looks_score_sde(state.keys()):
        raise score_sde
    if cfg.get("class_cond"):
        raise OptionError("config", "class_cond is True: class-conditional ADM models need class labels, which the "
                                    "purification interface does not provide; use an unconditional model")
    net = create_adm_model(cfg)
    load_state_dict_strict(net, state, where=where, hint=_CONFIG_HINT)
    return net


def _plain_dict(obj: Any) -> Any:
    """A config as nested dicts: DiffPure builds its yaml configs as nested ``argparse.Namespace`` objects."""
    if isinstance(obj, Mapping):
        return {k: _plain_dict(v) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return {k: _plain_dict(v) for k, v in vars(obj).items()}
    return obj


# The schedule the celebahq-ddpm runner and the engine use (DiffPure's discrete betas = celeba.yml's diffusion).
_CELEBAHQ_DIFFUSION = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                       "num_diffusion_timesteps": 1000}


def _celebahq_config(config) -> dict:
    """A celeba.yml-style config as a dict (default: DiffPure's celeba.yml), its diffusion section checked."""
    from ..solvers.ddpm import VAR_TYPES
    from .ddpm_unet import CELEBAHQ_DDPM_CONFIG

    cfg = _plain_dict(CELEBAHQ_DDPM_CONFIG if config is None else config)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"config: expected a dict in the layout of DiffPure's configs/celeba.yml, got "
                         f"{type(config).__name__}")
    diffusion = cfg.get("diffusion", {})
    for key, want in _CELEBAHQ_DIFFUSION.items():
        got = diffusion.get(key, want) if isinstance(diffusion, Mapping) else None
        if got != want and not (isinstance(want, float) and isinstance(got, (int, float))
                                and abs(got - want) <= 1e-12):
            raise ValueError(f"config['diffusion']['{key}']: the engine runs DiffPure's schedule ({key} {want!r}); "
                             f"got {got!r}")
    var_type = cfg.get("model", {}).get("var_type", "fixedsmall") if isinstance(cfg.get("model"), Mapping) else None
    if var_type not in VAR_TYPES:
        raise ValueError(f"config['model']['var_type']: expected one of {VAR_TYPES}, got {var_type!r}")
    return cfg


def _load_celebahq(ckpt: Any, config, where: str) -> tuple[DDPMUNet, str]:
    if not isinstance(ckpt, Mapping):
        raise OptionError("checkpoint", f"expected a plain state dict of SDEdit's DDPM UNet (celeba_hq.ckpt), got "
                                        f"{type(ckpt).__name__}", where=where)
    if "kind" in ckpt and "state_dict" in ckpt:
        raise OptionError("checkpoint", "this is a conformance vector, not a checkpoint; pass vec['state_dict'] (or "
                                        "run python -m diffpure_fast.conformance on the file)", where=where)
    if "model" in ckpt and "ema" in ckpt:
        raise OptionError("checkpoint", lambda sp: "this is a score_sde (NCSN++) checkpoint, not SDEdit's DDPM UNet; "
                                                   f"use {sp.setting('family', 'score_sde')}", where=where)
    state = unwrap_state_dict(ckpt, where=where)
    keys = list(state.keys())
    if _looks_guided(keys):
        raise OptionError("checkpoint", lambda sp: "this is a guided-diffusion (ADM UNet) state dict, not SDEdit's "
                                                   f"DDPM UNet; use {sp.setting('family', 'guided_diffusion')}",
                          where=where)
    if _looks_score_sde(keys):
        raise OptionError("checkpoint", lambda sp: "this is a score_sde (NCSN++) state dict, not SDEdit's DDPM UNet; "
                                                   f"use {sp.setting('family', 'score_sde')}", where=where)
    cfg = _celebahq_config(config)
    net = DDPMUNet.from_config(cfg)
    load_state_dict_strict(net, state, where=where, hint="is the config the one this checkpoint was trained with?")
    return net, cfg["model"].get("var_type", "fixedsmall")


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise OptionTypeError("device", f"expected a str or torch.device such as 'cpu' or 'cuda', got "
                                        f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError("device", f"expected a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):  # meta (no weights), or backends the networks were never run on
        raise OptionError("device", f"expected a cpu or cuda device, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{device!r} requested but no CUDA device is available")
    return dev


# DiffPure's t* per family, from its run scripts: CIFAR-10 (score_sde) --t 100, ImageNet (guided_diffusion) --t 150.
# celebahq_ddpm runs with the celebahq-ddpm runner, whose own default (--t 500) holds; digits: the method's (0.1).
_DEFAULT_T_STAR = {"score_sde": 0.1, "guided_diffusion": 0.15}


def load_score_model(family: str, checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
                     config: Mapping[str, Any] | None = None, *, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, use_ema: bool = True, trust_checkpoint: bool = False,
                     compile: bool = False, channels_last: bool = False) -> ScoreModel:
    """Load an official DiffPure score network, or the embedded digits model.

    Args:
        family: ``"score_sde"`` (NCSN++/DDPM++, CIFAR-10), ``"guided_diffusion"`` (ADM UNet, ImageNet),
            ``"celebahq_ddpm"`` (SDEdit's DDPM UNet, CelebA-HQ), or ``"digits"`` (the small NCSN++ shipped inside
            the package for 1x16x16 digits; no checkpoint needed).
        checkpoint: a path (``.pt``/``.pth``/``.ckpt``; ``.safetensors`` for plain state dicts) or the already-loaded
            object: score_sde: ``{"model": state_dict, "ema": {"shadow_params": [...], ...}, "optimizer", "step"}``
            (or a bare NCSN++ state dict); guided_diffusion and celebahq_ddpm: a plain state dict.
        config: the official configuration. score_sde: the yaml as a dict (``config['model']``,
            ``config['data']``); ``None`` is DiffPure's ``configs/cifar10.yml``. guided_diffusion: the keyword
            arguments of ``create_model_and_diffusion``; ``None`` is DiffPure's ImageNet 256x256 unconditional model.
            celebahq_ddpm: the yaml as a dict (or DiffPure's nested namespace of it); ``None`` is DiffPure's
            ``configs/celeba.yml``.
        device: where to put the model (default: CPU).
        dtype: ``None``: float32, except a guided-diffusion ``use_fp16`` config on CUDA gets the official float16
            torso. guided_diffusion: ``torch.float16``/``torch.bfloat16`` converts the torso (convolutions of the
            input/middle/output blocks) as ``convert_to_fp16`` does; score_sde, celebahq_ddpm: casts the whole
            network (score_sde's forward casts inputs and outputs). Autocast is the other way to run in reduced
            precision.
        use_ema: score_sde only: apply the EMA weights (DiffPure does); ``False`` keeps the raw weights.
        trust_checkpoint: a checkpoint path is read with torch's restricted (``weights_only``) unpickler plus the
            few NumPy scalar types the official score_sde checkpoints hold (:func:`official_safe_globals`); a file
            with any other object is refused, since unpickling it could run code. ``True`` opts in to the full
            unpickler for a file you trust. The digits family reads safetensors (no pickle) and ignores it.
        compile, channels_last: the CPU fast path (:func:`~diffpure_fast.models.fast.fast_score_model`): the
            network compiled with inductor on its first calls (about a minute per graph for a 2.5M-parameter
            NCSN++ on 2 cores, then cached on disk) and run channels-last; outputs within float32 rounding of the
            eager network, gradients through it for every ``grad_mode``.

    Returns:
        an ``EpsModel`` in eval mode (``time_input="continuous"`` for score_sde, ``"discrete"`` with
        ``learned_sigma`` for guided-diffusion, ``"discrete"`` for celebahq_ddpm); with ``compile`` or
        ``channels_last``, a ``FastScoreModel`` around it (its ``.model``).
    """
    fam = _family(family)
    for name, v in (("trust_checkpoint", trust_checkpoint), ("compile", compile), ("channels_last", channels_last),
                    ("use_ema", use_ema)):
        check_bool(name, v)
    if fam == "digits":
        from .digits import load_digits_score_model

        if checkpoint is not None:
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise OptionTypeError("checkpoint", f"the digits family takes a .safetensors path or None (the "
                                                    f"shipped weights), got {type(checkpoint).__name__}")
            if not os.path.isfile(checkpoint):
                raise OptionFileNotFoundError("checkpoint", f"file not found: {os.fspath(checkpoint)!r}")
        dev = _check_device(device)
        model = load_digits_score_model(dev, path=checkpoint)
        model.family = fam
        return _fast(model, compile, channels_last)
    if checkpoint is None:
        raise OptionError("checkpoint", lambda sp: f"{sp.setting('family', fam)} needs a checkpoint path (or "
                                                   f"loaded dict); nothing is downloaded")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise OptionError("dtype", f"expected None, torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if config is not None and not isinstance(config, Mapping):
        if fam == "guided_diffusion" and hasattr(config, "__dict__") and not isinstance(config, type):
            config = vars(config)          # argparse.Namespace, as DiffPure builds from its yaml
        elif not ((fam == "score_sde" and (hasattr(config, "to_dict") or hasattr(config, "model")))
                  or (fam == "celebahq_ddpm" and hasattr(config, "__dict__") and not isinstance(config, type))):
            raise OptionError("config", f"expected a dict in the official format, got {type(config).__name__}")
    if not isinstance(checkpoint, (str, os.PathLike, Mapping)):
        raise OptionTypeError("checkpoint", f"expected a path or a loaded checkpoint dict, got "
                                            f"{type(checkpoint).__name__}")
    dev = _check_device(device)
    # Refuse what the config's diffusion settings make unsupported before reading a (large) file.
    cfg = dict(ADM_IMAGENET256_UNCOND_CONFIG if config is None else config) if fam == "guided_diffusion" else config
    schedule = (_score_sde_schedule(config) if fam == "score_sde" else _guided_schedule(cfg)
                if fam == "guided_diffusion" else DIFFPURE_SCHEDULE)  # celebahq_ddpm: _celebahq_config checks it
    if isinstance(checkpoint, (str, os.PathLike)):
        ckpt, where = read_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint), repr(os.fspath(checkpoint))
    else:
        ckpt, where = checkpoint, ""

    if fam == "score_sde":
        net: torch.nn.Module = _load_score_sde(ckpt, config, use_ema, where)
        net.eval().to(dev)
        if dtype is not None and dtype != torch.float32:
            net.to(dtype)
        model = EpsModel(net, time_input="continuous", schedule=schedule)
    elif fam == "celebahq_ddpm":
        net, var_type = _load_celebahq(ckpt, config, where)
        net.eval().to(dev)
        if dtype is not None and dtype != torch.float32:
            net.to(dtype)
        model = EpsModel(net, time_input="discrete", schedule=schedule)
        model.var_type = var_type
    else:
        unet = _load_guided(ckpt, cfg, where)
        unet.eval().to(dev)
        if dtype in (torch.float16, torch.bfloat16):
            unet.convert_to_fp16(dtype)
        elif dtype is None and unet.use_fp16 and dev.type == "cuda":
            unet.convert_to_fp16(torch.float16)
        model = EpsModel(unet, time_input="discrete", learned_sigma=unet.out_channels == 2 * unet.in_channels,
                         schedule=schedule)
    model.family = fam
    model.default_t_star = _DEFAULT_T_STAR.get(fam)
    return _fast(model.eval(), compile, channels_last)


def _fast(model: EpsModel, compile: bool, channels_last: bool) -> ScoreModel:
    if not (compile or channels_last):
        return model
    fast = fast_score_model(model, compile=compile, channels_last=channels_last)
    fast.family = model.family
    fast.default_t_star = model.default_t_star
    if hasattr(model, "var_type"):
        fast.var_type = model.var_type
    return fast.eval()
