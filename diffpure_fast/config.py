"""``PurifyConfig``: everything that defines a purification except the input, the model and the noise.

What every method shares (value range, gradient mode and its options, the schedule) are fields here; a method's own
options (DiffPure's ``t_star``/``dt``/``steps``/``solver``, GDMP's ``purify_step``, ...) are its options dataclass
(``diffpure_fast.methods``). ``PurifyConfig.build(method=..., **options)`` splits keyword arguments between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ._validate import OptionError, OptionTypeError, check_bool, check_choice, check_int, check_value_range
from .chain import Chain
from .methods import GUIDANCE_GRADS, Method, MethodOptions, get_method
from .methods.base import ddpm_surrogate_chain
from .schedule import DIFFPURE_SCHEDULE, VPSchedule
from .solvers import Plan

__all__ = ["AUTOCAST_MODES", "CUDA_GRAPH_GRAD_MODES", "GRAD_MODES", "GUIDANCE_GRADS", "RESIZE_MODES", "PurifyConfig"]

GRAD_MODES = ("none", "full", "adjoint", "bpda", "surrogate")
# Reduced-precision autocast of the score network (the solver state stays in the input's dtype): see
# diffpure_fast.models.base.AutocastModel.
AUTOCAST_MODES = (None, "bf16", "fp16")
# The gradient modes a CUDA graph serves (diffpure_fast.cuda_graphs): "none"/"bpda" replay the captured chain,
# "full"/"surrogate" replay a captured forward and one captured per-step VJP. "adjoint" re-solves the state backward
# with Brownian bridges drawn on the host side, step by step: not captured.
CUDA_GRAPH_GRAD_MODES = ("none", "bpda", "full", "surrogate")
# The resize stage a defense may own (engine._purify): inputs of another size are resized to the score model's size,
# purified, and resized back, as DiffPure's ImageNet pipeline does (F.interpolate, align_corners=False, 224 <-> 256).
RESIZE_MODES = (None, "bilinear")


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
    resize: str | None = None

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
        # finite too (found by the property tests): an infinite range turned every output into NaN, silently
        object.__setattr__(self, "value_range", check_value_range("value_range", self.value_range))
        check_choice("grad_mode", self.grad_mode, GRAD_MODES)
        if self.guidance_grad not in m.guidance_grads:
            raise OptionError("guidance_grad", lambda s: f"{s.setting('method', self.method)} takes one of "
                                                         f"{m.guidance_grads}, got {self.guidance_grad!r}")
        object.__setattr__(self, "surrogate_steps", check_int("surrogate_steps", self.surrogate_steps))
        object.__setattr__(self, "grad_cache_steps", check_int("grad_cache_steps", self.grad_cache_steps, low=0))
        check_bool("param_grads", self.param_grads)
        if self.param_grads and self.grad_mode != "full":
            raise OptionError("param_grads", lambda s: f"score-network parameter gradients come with "
                                                       f"{s.setting('grad_mode', 'full')} only, got "
                                                       f"{s.setting('grad_mode', self.grad_mode)}")
        if self.grad_mode == "adjoint":
            m.check_adjoint(self.options)
        if self.autocast not in AUTOCAST_MODES:
            raise OptionError("autocast", f"expected one of {AUTOCAST_MODES} (the score network's reduced precision; "
                                          f"the solver state keeps the input's dtype), got {self.autocast!r}")
        check_bool("cuda_graph", self.cuda_graph)
        check_choice("resize", self.resize, RESIZE_MODES)   # None: inputs must have the score model's size
        if not isinstance(self.schedule, VPSchedule):
            raise OptionTypeError("schedule", f"expected a VPSchedule, got {type(self.schedule).__name__}")
        # Chains per state dtype, built once (purify runs every attack step with the same config): not a field,
        # so equality and the repr are those of the options.
        object.__setattr__(self, "_chains", {})
        self.chain(torch.float32)  # builds (and so validates) the step plan once
        if self.grad_mode == "surrogate":
            self.surrogate_chain(torch.float32)  # validates surrogate_steps against the surrogate level
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
        """grad_mode="surrogate"'s chain: exactly ``surrogate_steps`` DDPM steps from the method's surrogate level;
        more steps than that level has levels is an error naming ``surrogate_steps`` (never capped)."""
        m = self.method_impl
        t = m.surrogate_t_star(self.options, self.schedule)
        level = self.schedule.level_of(t)
        if self.surrogate_steps > level:
            origin = m.surrogate_origin(self.options)

            def detail(s):
                why = (f"set by {s.setting(*origin)}" if origin is not None
                       else f"the constant of {s.setting('method', self.method)}")
                return (f"expected at most {level}: the surrogate DDPM chain starts at level {level} = "
                        f"round({self.schedule.num_levels} x {t:g}) ({why}), one step per level at most, got "
                        f"{self.surrogate_steps}")
            raise OptionError("surrogate_steps", detail)
        return ddpm_surrogate_chain(self.schedule, t, self.surrogate_steps, dtype)

    def resolved(self) -> dict:
        """The values a run uses where options are rounded or derived: the diffusion level the chain starts from
        (DiffPure's round(N t*)), its rounds and total solver steps, and with ``grad_mode="surrogate"`` the
        surrogate chain's level and steps. Recorded with the options (``describe``, evaluation records)."""
        chain = self.chain(torch.float32)
        out = {"level": self.method_impl.start_level(self.options, self.schedule), "rounds": len(chain.rounds),
               "steps": len(chain)}
        if self.grad_mode == "surrogate":
            sur = self.surrogate_chain(torch.float32)
            out["surrogate_level"] = self.schedule.level_of(
                self.method_impl.surrogate_t_star(self.options, self.schedule))
            out["surrogate_steps"] = len(sur)
        return out

    def describe(self) -> str:
        used = ", ".join(f"{k} {v}" for k, v in self.resolved().items())
        resize = "" if self.resize is None else f", inputs resized ({self.resize}) to the model's size and back"
        return f"method={self.method!r}, " + self.method_impl.describe(self.options) + f" (used: {used}){resize}"
