"""``PurifyConfig``: everything that defines a purification except the input, the model and the noise.

What every method shares (value range, gradient mode and its options, the schedule) are fields here; a method's own
options (DiffPure's ``t_star``/``dt``/``steps``/``solver``, GDMP's ``purify_step``, ...) are its options dataclass
(``diffpure_fast.methods``). ``PurifyConfig.build(method=..., **options)`` splits keyword arguments between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .chain import Chain
from .methods import GUIDANCE_GRADS, Method, MethodOptions, get_method
from .methods.base import check_int, ddpm_surrogate_chain
from .schedule import DIFFPURE_SCHEDULE, VPSchedule
from .solvers import Plan

__all__ = ["AUTOCAST_MODES", "CUDA_GRAPH_GRAD_MODES", "GRAD_MODES", "GUIDANCE_GRADS", "PurifyConfig"]

GRAD_MODES = ("none", "full", "adjoint", "bpda", "surrogate")
# Reduced-precision autocast of the score network (the solver state stays in the input's dtype): see
# diffpure_fast.models.base.AutocastModel.
AUTOCAST_MODES = (None, "bf16", "fp16")
# The gradient modes a CUDA graph serves (diffpure_fast.cuda_graphs): "none"/"bpda" replay the captured chain,
# "full"/"surrogate" replay a captured forward and one captured per-step VJP. "adjoint" re-solves the state backward
# with Brownian bridges drawn on the host side, step by step: not captured.
CUDA_GRAPH_GRAD_MODES = ("none", "bpda", "full", "surrogate")


@dataclass(frozen=True)
class PurifyConfig:
    method: str = "diffpure"
    options: MethodOptions | None = None   # None: the method's defaults
    value_range: tuple[float, float] = (0.0, 1.0)
    grad_mode: str = "none"
    guidance_grad: str = "exact"
    surrogate_steps: int = 10
    grad_cache_steps: int = 0
    param_grads: bool = False
    schedule: VPSchedule = DIFFPURE_SCHEDULE
    cuda_graph: bool = False
    autocast: str | None = None

    @classmethod
    def build(cls, method: str = "diffpure", **kwargs) -> PurifyConfig:
        """A config from flat keyword arguments: this class's fields, the rest the method's options."""
        own = {f.name for f in fields(cls)} - {"method", "options"}
        m = get_method(method)
        opts = m.options(**{k: v for k, v in kwargs.items() if k not in own})
        return cls(method=method, options=opts, **{k: v for k, v in kwargs.items() if k in own})

    def __post_init__(self):
        m = get_method(self.method)
        if self.options is None:
            object.__setattr__(self, "options", m.options())
        elif not isinstance(self.options, m.Options):
            raise TypeError(f"options: expected {m.Options.__name__} for method={self.method!r}, got "
                            f"{type(self.options).__name__}")
        vr = self.value_range
        # finite too (found by the property tests): an infinite range turned every output into NaN, silently
        if (not isinstance(vr, (tuple, list)) or len(vr) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vr)
                or not all(math.isfinite(v) for v in vr) or not vr[0] < vr[1]):
            raise ValueError(f"value_range: expected a finite pair (low, high) with low < high, got {vr!r}")
        object.__setattr__(self, "value_range", (float(vr[0]), float(vr[1])))
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode: expected one of {GRAD_MODES}, got {self.grad_mode!r}")
        if self.guidance_grad not in m.guidance_grads:
            raise ValueError(f"guidance_grad: method={self.method!r} takes one of {m.guidance_grads}, got "
                             f"{self.guidance_grad!r}")
        check_int("surrogate_steps", self.surrogate_steps)
        check_int("grad_cache_steps", self.grad_cache_steps, low=0)
        if not isinstance(self.param_grads, bool):
            raise TypeError(f"param_grads: expected a bool, got {type(self.param_grads).__name__}")
        if self.param_grads and self.grad_mode != "full":
            raise ValueError(f"param_grads: score-network parameter gradients come with grad_mode='full' only, got "
                             f"grad_mode={self.grad_mode!r}")
        if self.grad_mode == "adjoint":
            m.check_adjoint(self.options)
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast: expected one of {AUTOCAST_MODES} (the score network's reduced precision; "
                             f"the solver state keeps the input's dtype), got {self.autocast!r}")
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph: expected a bool, got {type(self.cuda_graph).__name__}")
        # Chains per state dtype, built once (purify runs every attack step with the same config): not a field,
        # so equality and the repr are those of the options.
        object.__setattr__(self, "_chains", {})
        self.chain(torch.float32)  # builds (and so validates) the step plan once
        if self.cuda_graph:
            self._check_cuda_graph()

    def _check_cuda_graph(self) -> None:
        """What a captured chain can serve (diffpure_fast.cuda_graphs); the tensors' device is checked per call."""
        if self.grad_mode not in CUDA_GRAPH_GRAD_MODES:
            raise ValueError(f"cuda_graph: serves grad_mode in {CUDA_GRAPH_GRAD_MODES}, got {self.grad_mode!r} (the "
                             "continuous adjoint draws Brownian bridges step by step on the host; use 'full', the "
                             "exact gradient, or cuda_graph=False)")
        if self.chain(torch.float32).guidance is not None:
            raise ValueError(f"cuda_graph: captures chains without a per-step term only (method='diffpure' with "
                             f"diffusion_type 'sde', 'ode' or 'celebahq-ddpm'), got {self.describe()}, whose step term "
                             "runs autograd or host-side set-up inside each step; use cuda_graph=False")
        if self.param_grads:
            raise ValueError("cuda_graph: the captured per-step VJP is with respect to the state only; "
                             "param_grads=True needs cuda_graph=False")
        if self.grad_cache_steps:
            raise ValueError(f"cuda_graph: every backward step replays one captured VJP, so there are no eager step "
                             f"graphs to cache; got grad_cache_steps={self.grad_cache_steps}, expected 0")

    @property
    def method_impl(self) -> Method:
        return get_method(self.method)

    def chain(self, dtype: torch.dtype = torch.float32) -> Chain:
        """The method's chain for states of ``dtype`` (immutable; built once per dtype)."""
        if dtype not in self._chains:
            self._chains[dtype] = self.method_impl.chain(self.options, self.schedule, dtype, self.guidance_grad)
        return self._chains[dtype]

    def plan(self, dtype: torch.dtype = torch.float32) -> Plan:
        """DiffPure's step plan (single-round unguided methods): the steps of the chain's one round."""
        rounds = self.chain(dtype).rounds
        if len(rounds) != 1:
            raise ValueError(f"method: {self.method!r} runs {len(rounds)} rounds, not one plan")
        return rounds[0].plan

    def surrogate_chain(self, dtype: torch.dtype) -> Chain:
        t = self.method_impl.surrogate_t_star(self.options, self.schedule)
        return ddpm_surrogate_chain(self.schedule, t, self.surrogate_steps, dtype)

    def describe(self) -> str:
        return f"method={self.method!r}, " + self.method_impl.describe(self.options)
