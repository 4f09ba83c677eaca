"""DiffPure purification: forward diffusion to t*, then a reverse-process solve back to a clean image.

``purify`` is side-effect free: it prints nothing, writes nothing, leaves torch's global RNG alone (all noise comes
from the counter-based generator of ``diffpure_fast.noise`` or from the caller), and gives no gradient to the score
network's parameters.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import ops
from .models.base import ScoreModel, as_score_model
from .noise import STREAM_FORWARD, check_seed, sample_noise
from .schedule import DIFFPURE_SCHEDULE, VPSchedule
from .solvers import Plan, get_solver
from .solvers.euler import T_END

__all__ = ["GRAD_MODES", "Noise", "Purifier", "PurifyConfig", "forward_diffuse", "purify", "reverse_solve"]

GRAD_MODES = ("none", "full", "adjoint", "bpda", "surrogate")


@dataclass(frozen=True)
class PurifyConfig:
    """Everything that defines a purification except the input, the model and the noise."""

    t_star: float = 0.1
    dt: float | None = 1e-3
    steps: int | None = None
    solver: str = "euler"
    value_range: tuple[float, float] = (0.0, 1.0)
    grad_mode: str = "none"
    surrogate_steps: int = 10
    grad_cache_steps: int = 0
    param_grads: bool = False
    schedule: VPSchedule = DIFFPURE_SCHEDULE

    def __post_init__(self):
        t = self.t_star
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 < t <= 1.0:
            raise ValueError(f"t_star: expected a float in (0, 1], got {t!r}")
        if self.schedule.level_of(t) < 1:
            raise ValueError(f"t_star: expected round({self.schedule.num_levels} t_star) >= 1 (DiffPure's diffusion "
                             f"level), got t_star={t}")
        if self.solver == "euler" and t <= T_END:
            raise ValueError(f"t_star: the reverse SDE runs from t* down to {T_END}; expected t_star > {T_END}")
        if self.dt is not None:
            dt = self.dt
            if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
                raise ValueError(f"dt: expected a positive float, got {dt!r}")
        for name in ("steps", "surrogate_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        v = self.grad_cache_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"grad_cache_steps: expected an int >= 0, got {v!r}")
        vr = self.value_range
        # finite too (found by the property tests): an infinite range turned every output into NaN, silently
        if (not isinstance(vr, (tuple, list)) or len(vr) != 2 or not all(isinstance(v, (int, float)) for v in vr)
                or not all(math.isfinite(v) for v in vr) or not vr[0] < vr[1]):
            raise ValueError(f"value_range: expected a finite pair (low, high) with low < high, got {vr!r}")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode: expected one of {GRAD_MODES}, got {self.grad_mode!r}")
        if not isinstance(self.param_grads, bool):
            raise TypeError(f"param_grads: expected a bool, got {type(self.param_grads).__name__}")
        if self.param_grads and self.grad_mode != "full":
            raise ValueError(f"param_grads: score-network parameter gradients come with grad_mode='full' only, got "
                             f"grad_mode={self.grad_mode!r}")
        get_solver(self.solver)

    def plan(self, dtype: torch.dtype = torch.float32) -> Plan:
        """The step coefficients for states of ``dtype`` (the Euler grid is accumulated in it, as torchsde does)."""
        dt = self.dt if (self.solver == "euler" and self.steps is None) else None
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return get_solver(self.solver).plan(self.schedule, self.t_star, dt=dt, steps=self.steps, dtype=np_dtype)


class Noise:
    """Where each step's noise comes from: caller-given increments, or the counter generator."""

    def __init__(self, *, seed: int | None = None, sample_ids: torch.Tensor | None = None,
                 increments: torch.Tensor | None = None):
        self.seed = seed
        self.sample_ids = sample_ids
        self.increments = increments

    def step(self, x: torch.Tensor, eps: torch.Tensor, k: int, step) -> torch.Tensor:
        """x_{k+1} = a x + b eps + c z_k through the fused op."""
        if self.increments is not None:
            return ops.sde_step(x, eps, step.a, step.b, step.c_increment, z=self.increments[k])
        return ops.sde_step(x, eps, step.a, step.b, step.c_unit, seed=self.seed, sample_ids=self.sample_ids, step=k)


def model_eps(model: ScoreModel, x: torch.Tensor, step) -> torch.Tensor:
    """The network's epsilon at one step: (B, C, H, W)."""
    b = x.shape[0]
    t = torch.full((b,), step.t, dtype=x.dtype, device=x.device)
    levels = None if step.level is None else torch.full((b,), step.level, dtype=torch.int64, device=x.device)
    return model.eps(x, t, levels)


def forward_diffuse(x: torch.Tensor, z: torch.Tensor, t_star: float, schedule: VPSchedule) -> torch.Tensor:
    """DiffPure's one-shot forward diffusion with the *discrete* alpha_bar at level round(N t*):
    ``sqrt(abar[L-1]) x + sqrt(1 - abar[L-1]) z``; x, z: (B, C, H, W), x in [-1, 1]."""
    ab = schedule.discrete_alpha_bar()[schedule.level_of(t_star) - 1].item()
    return x * math.sqrt(ab) + z * math.sqrt(1.0 - ab)


def reverse_solve(x: torch.Tensor, model: ScoreModel, plan: Plan, noise: Noise, *, keep_states: bool = False):
    """Run every step of ``plan`` from x (B, C, H, W). Returns x_n, or (x_n, [x_0 .. x_{n-1}]) with keep_states."""
    states = []
    for k, step in enumerate(plan.steps):
        if keep_states:
            states.append(x)
        x = noise.step(x, model_eps(model, x, step), k, step)
    return (x, states) if keep_states else x


# ---------------------------------------------------------------------------------------------------------------
# Validation: every bad input gets an error naming the argument and what was expected.


def _pair(v):
    """A list value_range as a tuple; anything else unchanged, for PurifyConfig to reject by name."""
    return tuple(v) if isinstance(v, list) else v


def _check_image(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (B, C, H, W) (rank 4), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point dtype, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x: expected a batch of at least one image, got B = 0")
    if x.device.type == "meta":  # found by the property tests: the range check below reads values
        raise ValueError("x: is on the meta device, which holds no values; purify needs real data")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _check_inputs(x, model, cfg: PurifyConfig, plan: Plan, forward_noise, increments, noise_ids):
    _check_image(x)
    _check_finite("x", x)
    lo, hi = cfg.value_range
    x_min, x_max = float(x.detach().min()), float(x.detach().max())
    if x_min < lo or x_max > hi:
        raise ValueError(f"x: values must lie in value_range={tuple(cfg.value_range)}, got min {x_min:.6g}, "
                         f"max {x_max:.6g} (nothing is clipped: rescale, or pass value_range)")
    channels, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"x: the model takes {channels} channels, got x with {x.shape[1]} (shape {tuple(x.shape)})")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"x: the model was built for {size}x{size} images, got {x.shape[2]}x{x.shape[3]} (resize "
                         f"before purifying; DiffPure's ImageNet pipeline resizes 224 -> 256 and back)")
    dev = _model_device(model)
    if dev is not None and dev != x.device:
        raise ValueError(f"x: is on {x.device} but the model's parameters are on {dev}; move one of them")
    for name, t, shape in (("forward_noise", forward_noise, tuple(x.shape)),
                           ("increments", increments, (len(plan), *x.shape))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            extra = (f" (one per solver step: {len(plan)} steps of solver={cfg.solver!r})"
                     if name == "increments" else "")
            raise ValueError(f"{name}: expected shape {shape}{extra}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")
        _check_finite(name, t)
    _as_noise_ids(noise_ids, x)


def _as_noise_ids(noise_ids, x: torch.Tensor) -> torch.Tensor:
    """noise_ids as a (B,) int64 tensor on x's device; None gives arange(B). Accepts any 1-D integer sequence (list,
    tuple, range, NumPy array, tensor) of ids in [0, 2^32); bools and floats are refused, never rounded."""
    if noise_ids is None:
        return torch.arange(x.shape[0], device=x.device)
    what = "noise_ids: expected a 1-D integer sequence (list, tuple, NumPy array or tensor) of per-sample ids"
    if isinstance(noise_ids, (torch.Tensor, np.ndarray)):
        dt = noise_ids.dtype
        is_int = (dt.kind in "iu") if isinstance(noise_ids, np.ndarray) else not (
            dt == torch.bool or dt.is_floating_point or dt.is_complex)
        if not is_int:
            raise TypeError(f"{what}, got an array of dtype {dt}")
        if noise_ids.ndim != 1:
            raise ValueError(f"{what}, got shape {tuple(noise_ids.shape)}")
        # int64 is exact below 2^63; larger unsigned ids wrap negative and fail the range check below
        ids = torch.as_tensor(noise_ids).detach().to(torch.int64)
    elif isinstance(noise_ids, (list, tuple, range)):
        bad = next((v for v in noise_ids if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))),
                   None)
        if bad is not None:
            raise TypeError(f"{what}, got an element {bad!r} of type {type(bad).__name__}")
        if any(not 0 <= int(v) < 1 << 32 for v in noise_ids):
            raise ValueError("noise_ids: expected ids in [0, 2^32)")
        ids = torch.tensor([int(v) for v in noise_ids], dtype=torch.int64)
    else:
        raise TypeError(f"{what}, got {type(noise_ids).__name__}")
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"noise_ids: expected {x.shape[0]} ids (one per sample), got {ids.shape[0]}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 1 << 32):
        raise ValueError("noise_ids: expected ids in [0, 2^32)")
    return ids.to(x.device)


# ---------------------------------------------------------------------------------------------------------------


def purify(x: torch.Tensor, model: ScoreModel, *, t_star: float = 0.1, dt: float | None = 1e-3,
           steps: int | None = None, solver: str = "euler", seed: int | None = None,
           noise_ids=None, forward_noise: torch.Tensor | None = None,
           increments: torch.Tensor | None = None, value_range: tuple[float, float] = (0.0, 1.0),
           grad_mode: str = "none", surrogate_steps: int = 10, grad_cache_steps: int = 0,
           param_grads: bool = False, schedule: VPSchedule = DIFFPURE_SCHEDULE) -> torch.Tensor:
    """Purify a batch with DiffPure: diffuse to ``t_star``, then solve the reverse process back.

    Args:
        x: (B, C, H, W) float tensor with values in ``value_range``.
        model: a ``ScoreModel`` (``dpf.load_score_model(...)``, or ``dpf.EpsModel(net, time_input=...)``).
        t_star: diffusion time in (0, 1]; DiffPure's CIFAR-10 default is 0.1 (100 Euler–Maruyama steps).
        dt: Euler–Maruyama step on torchsde's float32 grid (default 1e-3, DiffPure's).
        steps: instead of ``dt``, a step count: Euler steps over [1e-5, t*], or DDPM steps (default one per level).
        solver: ``"euler"`` (DiffPure's reverse SDE) or ``"ddpm"`` (ancestral steps on the discrete schedule).
        seed, noise_ids: the engine's noise is a function of (seed, noise_ids[i], step, element): the same pair
            gives the same noise for a sample whatever batch it sits in. ``seed=None`` draws a fresh seed from the
            OS (not from torch's RNG); ``noise_ids`` (a 1-D integer list, tuple, NumPy array or tensor of B ids in
            [0, 2^32)) defaults to ``arange(B)``.
        forward_noise: (B, C, H, W) the z of the forward diffusion, used exactly when given.
        increments: (steps, B, C, H, W) per-step noise used exactly when given: Brownian increments dW_k for
            ``"euler"``, standard normals for ``"ddpm"``.
        value_range: the range of ``x`` and of the output; DiffPure works in [-1, 1] internally.
        grad_mode: ``"none"`` (no graph), ``"full"`` (exact gradient of this discrete computation, stored states,
            recomputed network calls), ``"adjoint"`` (torchsde-style continuous adjoint), ``"bpda"`` (identity
            backward), ``"surrogate"`` (exact gradient of a ``surrogate_steps``-step DDPM chain with the same
            forward output).
        surrogate_steps: the DDPM step count of ``grad_mode="surrogate"``'s gradient chain.
        grad_cache_steps: ``grad_mode="full"`` keeps the graphs of this many last steps from the forward pass
            (memory: one network call's activations each) instead of recomputing them in the backward pass.
        param_grads: ``grad_mode="full"`` also back-propagates into the score network's parameters that require
            grad (off by default: attacks need d/dx only, and parameter VJPs cost time).

    Returns:
        (B, C, H, W) purified images in ``value_range`` (not clipped: the reverse SDE can overshoot slightly, as
        in the official code).
    """
    cfg = PurifyConfig(t_star=t_star, dt=dt, steps=steps, solver=solver, value_range=_pair(value_range),
                       grad_mode=grad_mode, surrogate_steps=surrogate_steps, grad_cache_steps=grad_cache_steps,
                       param_grads=param_grads, schedule=schedule)
    model = as_score_model(model)
    plan = cfg.plan(x.dtype if isinstance(x, torch.Tensor) else torch.float32)
    _check_inputs(x, model, cfg, plan, forward_noise, increments, noise_ids)
    seed = secrets.randbits(63) if seed is None else check_seed(seed)
    ids = _as_noise_ids(noise_ids, x)

    lo, hi = cfg.value_range
    scale = (hi - lo) / 2.0
    x_unit = x if (lo, hi) == (-1.0, 1.0) else (x - lo) / scale - 1.0
    z = forward_noise if forward_noise is not None else sample_noise(seed, ids, 0, STREAM_FORWARD, x_unit)
    noise = Noise(seed=seed, sample_ids=ids, increments=increments)

    wants_params = cfg.param_grads and any(p.requires_grad for p in model.parameters())
    wants_graph = cfg.grad_mode != "none" and torch.is_grad_enabled() and (x.requires_grad or wants_params)
    if not wants_graph or cfg.grad_mode == "bpda":
        with torch.no_grad():
            out = reverse_solve(forward_diffuse(x_unit, z, cfg.t_star, cfg.schedule), model, plan, noise)
        if wants_graph:
            # BPDA (DiffPure's BPDA+EOT): the purification's value, the identity's gradient d out / d x = I.
            out = x_unit + (out - x_unit.detach())
    else:
        from .grad import differentiable_reverse_solve
        x_t = forward_diffuse(x_unit, z, cfg.t_star, cfg.schedule)
        out = differentiable_reverse_solve(x_t, model, plan, noise, cfg, x_in=x)
    return out if (lo, hi) == (-1.0, 1.0) else (out + 1.0) * scale + lo


class Purifier(nn.Module):
    """``purify`` as a module: ``Purifier(model, t_star=0.1, ...)(x) == purify(x, model, t_star=0.1, ...)``.

    A drop-in preprocessing layer (e.g. ``nn.Sequential(Purifier(model, grad_mode="full"), classifier)``) for
    AutoAttack / torchattacks style evaluation: no prints, no files, no global RNG; the score network is a
    submodule (``.to(device)`` moves it) in eval mode. ``seed=None`` draws fresh noise on every call (a randomized
    defense); an int makes every call reuse the same noise.
    """

    def __init__(self, model: ScoreModel, *, t_star: float = 0.1, dt: float | None = 1e-3, steps: int | None = None,
                 solver: str = "euler", seed: int | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                 grad_mode: str = "none", surrogate_steps: int = 10, grad_cache_steps: int = 0,
                 param_grads: bool = False, schedule: VPSchedule = DIFFPURE_SCHEDULE):
        super().__init__()
        self.config = PurifyConfig(t_star=t_star, dt=dt, steps=steps, solver=solver, value_range=_pair(value_range),
                                   grad_mode=grad_mode, surrogate_steps=surrogate_steps,
                                   grad_cache_steps=grad_cache_steps, param_grads=param_grads, schedule=schedule)
        self.model = as_score_model(model).eval()
        self.seed = None if seed is None else check_seed(seed)

    def train(self, mode: bool = True):
        # The score network stays in eval mode (dropout off), as in DiffPure, whatever the wrapper's mode.
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor, *, noise_ids=None) -> torch.Tensor:
        c = self.config
        return purify(x, self.model, t_star=c.t_star, dt=c.dt, steps=c.steps, solver=c.solver, seed=self.seed,
                      noise_ids=noise_ids, value_range=c.value_range, grad_mode=c.grad_mode,
                      surrogate_steps=c.surrogate_steps, grad_cache_steps=c.grad_cache_steps,
                      param_grads=c.param_grads, schedule=c.schedule)

    def extra_repr(self) -> str:
        c = self.config
        return (f"t_star={c.t_star}, solver={c.solver!r}, dt={c.dt}, steps={c.steps}, grad_mode={c.grad_mode!r}, "
                f"value_range={c.value_range}, seed={self.seed}")
