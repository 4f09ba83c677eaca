"""The method interface: a method states its options (with defaults), its chain and its surrogate, nothing else.

``PurifyConfig`` (``diffpure_fast.config``) holds what every method shares (value range, gradient mode, schedule);
a method's own options are a frozen dataclass validated in its ``__post_init__`` (errors name the option).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from .._validate import OptionError
from ..chain import Chain, Round
from ..schedule import VPSchedule
from ..solvers import get_solver

__all__ = ["GUIDANCE_GRADS", "Method", "MethodOptions", "ddpm_surrogate_chain", "diffuse_round", "make_options"]

# How the exact adjoint treats a guidance term: "exact" differentiates it (second order where it is a gradient);
# "detached" treats it as a constant (what the released evaluations of guided methods computed);
# "straight_through" (methods whose guidance holds a sign) keeps the forward and gives the sign the derivative of
# a smooth L1 in the backward pass only (a declared surrogate).
GUIDANCE_GRADS = ("exact", "detached", "straight_through")


def make_options(options_class, owner: tuple[tuple[str, object], ...], kwargs: dict):
    """``options_class(**kwargs)``, or an ``OptionError`` naming the first keyword it has no field for. ``owner``:
    who the options belong to, as (API keyword, value) pairs, e.g. (("method", "gdmp"),), for the message."""
    names = options_class.names()
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise OptionError(unknown[0], lambda s: f"not an option of {' with '.join(s.setting(*o) for o in owner)} "
                                                f"(its options: {', '.join(map(s.name, names))})")
    return options_class(**kwargs)


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options dataclass."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def _set(self, name: str, value) -> None:
        """Store a checked value in place of the given one (a NumPy integer becomes the int it equals), so the
        options compare, print and serialise the same whichever numeric type the caller used."""
        object.__setattr__(self, name, value)


class Method:
    """A purification method. Subclasses set ``name``, ``Options`` and ``guidance_grads``, and build chains."""

    name: str = ""
    Options: type[MethodOptions] = MethodOptions
    # The guidance_grad values this method accepts (an unguided method has only "exact").
    guidance_grads: tuple[str, ...] = ("exact",)

    def options(self, **kwargs) -> MethodOptions:
        """The options dataclass from keyword arguments (none: the defaults); an unknown one is an error naming it."""
        return make_options(self.Options, (("method", self.name),), kwargs)

    def check_adjoint(self, opts) -> None:
        """Whether grad_mode="adjoint" (the official code's continuous adjoint) exists for these options: an error
        naming grad_mode if not. None has it by default (DiffPure's sde and ode runners do)."""
        raise OptionError("grad_mode", lambda s: f"'adjoint' is the official DiffPure code's continuous adjoint "
                          f"({s.name('diffusion_type')} 'sde' and 'ode'); {s.setting('method', self.name)} has none: "
                          f"use 'full', the exact gradient")

    def chain(self, opts, schedule: VPSchedule, dtype: torch.dtype, guidance_grad: str) -> Chain:
        """The purification as a chain, for states of ``dtype``."""
        raise NotImplementedError

    def surrogate_t_star(self, opts, schedule: VPSchedule) -> float:
        """The diffusion time the surrogate gradient chain (grad_mode="surrogate") starts from."""
        raise NotImplementedError

    def surrogate_origin(self, opts) -> tuple[str, object] | None:
        """The option that sets ``surrogate_t_star`` and its value (None: a constant of the method), for errors."""
        return None

    def start_level(self, opts, schedule: VPSchedule) -> int:
        """The discrete diffusion level the chain's first round starts from (DiffPure: its rounded round(N t*);
        N for a chain from pure noise): recorded with the options, as the value the run used."""
        raise NotImplementedError

    def check_model(self, opts, model) -> None:
        """Method-specific checks of the score model against the options (e.g. a sampler that needs the network's
        learned variance); errors name ``model`` or the option. Nothing by default."""

    def check_inputs(self, opts, x: torch.Tensor) -> None:
        """Method-specific checks of an input batch x (B, C, H, W) against the options (e.g. an auxiliary network's
        device and input shape); errors name the option. Nothing by default."""

    def describe(self, opts) -> str:
        return ", ".join(f"{k}={getattr(opts, k)!r}" for k in opts.names())


def diffuse_round(plan, schedule: VPSchedule, index: int, first_step: int = 0) -> Round:
    """A round that starts from ``sqrt(abar[index]) y + sqrt(1 - abar[index]) z`` (discrete alpha_bar)."""
    ab = schedule.discrete_alpha_bar()[index].item()
    return Round(plan, math.sqrt(ab), math.sqrt(1.0 - ab), first_step)


def ddpm_surrogate_chain(schedule: VPSchedule, t_star: float, steps: int, dtype: torch.dtype) -> Chain:
    """grad_mode="surrogate"'s chain (Lee & Kim, ICCV 2023): an unguided ``steps``-step ancestral DDPM chain from
    the input diffused to t* (DiffPure's level round(N t*)), with the same noise counters as the defense. Exactly
    ``steps`` steps, at most the level (``PurifyConfig`` checks the bound and names ``surrogate_steps``)."""
    level = schedule.level_of(t_star)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    plan = get_solver("ddpm").plan(schedule, t_star, dt=None, steps=steps, dtype=np_dtype)
    return Chain((diffuse_round(plan, schedule, level - 1),), None)


