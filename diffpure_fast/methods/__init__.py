"""Purification methods, registered by name: each states its start, plan, guidance and defaults."""

from .agdm import AGDM, AGDMOptions
from .base import GUIDANCE_GRADS, Method, MethodOptions
from .diffpure import (
    DIFFUSION_TYPES,
    CelebAHQOptions,
    DiffPure,
    DiffPureOptions,
    GuidedDDPMOptions,
    LDSDEOptions,
    ODEOptions,
    RunnerOptions,
)
from .gdmp import GDMP, GDMPOptions
from .mimic import Mimic, MimicOptions

METHODS: dict[str, Method] = {m.name: m for m in (DiffPure(), GDMP(), Mimic(), AGDM())}


def get_method(name) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


__all__ = ["AGDM", "DIFFUSION_TYPES", "GDMP", "GUIDANCE_GRADS", "METHODS", "AGDMOptions", "CelebAHQOptions", "DiffPure",
           "DiffPureOptions", "GDMPOptions", "GuidedDDPMOptions", "LDSDEOptions", "Method", "MethodOptions", "Mimic",
           "MimicOptions", "ODEOptions", "RunnerOptions", "get_method"]
