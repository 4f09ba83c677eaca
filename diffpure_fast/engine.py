"""The public surface: ``purify`` and ``Purifier`` run any purification method (``diffpure_fast.methods``: DiffPure,
GDMP, MimicDiffusion, AGDM) on a batch, with the gradient mode the caller asks for.

``purify`` is side-effect free: it prints nothing, writes nothing, leaves torch's global RNG alone (all noise comes
from the counter-based generator of ``diffpure_fast.noise`` or from the caller), and gives no gradient to the score
network's parameters.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._validate import OptionError, OptionTypeError, check_eval_mode, check_int
from .chain import Chain, Noise, forward_diffuse, model_eps, reverse_solve, run_chain, state_alpha_bar
from .config import AUTOCAST_MODES, GRAD_MODES, GUIDANCE_GRADS, PurifyConfig
from .cuda_graphs import ChainGraphs
from .grad import differentiable_chain
from .methods import METHODS
from .models.base import ScoreModel, as_score_model, with_autocast
from .noise import check_seed
from .schedule import VPSchedule

__all__ = ["AUTOCAST_MODES", "GRAD_MODES", "GUIDANCE_GRADS", "METHODS", "Noise", "Purifier", "PurifyConfig",
           "Trajectory", "forward_diffuse", "model_eps", "purify", "reverse_solve"]


# ---------------------------------------------------------------------------------------------------------------
# Validation: every bad input gets an error naming the argument and what was expected.


def _check_image(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise OptionTypeError("x", f"expected a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise OptionError("x", f"expected shape (B, C, H, W) (rank 4), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise OptionTypeError("x", f"expected a floating-point dtype, got {x.dtype}")
    if x.shape[0] == 0:
        raise OptionError("x", "expected a batch of at least one image, got B = 0")
    if x.device.type == "meta":  # found by the property tests: the range check below reads values
        raise OptionError("x", "is on the meta device, which holds no values; purify needs real data")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise OptionError(name, "contains NaN or Inf")


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _check_inputs(x, model, cfg: PurifyConfig, chain: Chain, forward_noise, increments, noise_ids):
    _check_image(x)
    _check_finite("x", x)
    lo, hi = cfg.value_range
    x_min, x_max = torch.stack(torch.aminmax(x.detach())).tolist()  # one device-to-host copy, not two
    if x_min < lo or x_max > hi:
        raise OptionError("x", lambda s: f"values must lie in {s.name('value_range')} {tuple(cfg.value_range)}, got "
                                         f"min {x_min:.6g}, max {x_max:.6g} (nothing is clipped: rescale them, or "
                                         f"pass {s.name('value_range')})")
    channels, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    if channels is not None and x.shape[1] != channels:
        raise OptionError("x", f"the model takes {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise OptionError("x", lambda s: f"the model was built for {size}x{size} images, got {x.shape[2]}x"
                                         f"{x.shape[3]} (pass {s.setting('resize', 'bilinear')} to resize inside the "
                                         f"defense, as DiffPure's ImageNet pipeline does 224 -> 256 and back)")
    dev = _model_device(model)
    if dev is not None and dev != x.device:
        raise OptionError("x", f"is on {x.device} but the model's parameters are on {dev}; move one of them")
    cfg.method_impl.check_model(cfg.options, model)
    cfg.method_impl.check_inputs(cfg.options, x)
    for name, t, shape in (("forward_noise", forward_noise, tuple(x.shape)),
                           ("increments", increments, (len(chain), *x.shape))):
        if t is None:
            continue
        if len(chain.rounds) != 1 or (chain.guidance is not None and not chain.guidance.accepts_given_noise):
            raise ValueError(f"{name}: caller-given noise is for single-round chains that draw no noise of their own "
                             f"(method='diffpure'); method={cfg.method!r} draws its noise from the counter "
                             "generator (seed, noise_ids)")
        (rnd,) = chain.rounds
        if name == "forward_noise" and rnd.noise_scale == 0.0:
            raise ValueError(f"forward_noise: {cfg.describe()} has no forward diffusion (its chain starts at the "
                             "input), so it takes no forward noise")
        if name == "increments" and rnd.plan.increment_meaning is None:
            raise ValueError(f"increments: {cfg.describe()} draws no noise after the forward diffusion (its solver "
                             f"{rnd.plan.solver!r} is deterministic), so it takes no increments")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            extra = (f" (one per solver step: {len(chain)} steps of {rnd.plan.solver!r}: "
                     f"{rnd.plan.increment_meaning})" if name == "increments" else "")
            raise ValueError(f"{name}: expected shape {shape}{extra}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")
        _check_finite(name, t)
    _as_noise_ids(noise_ids, x)
    if cfg.cuda_graph:
        _check_cuda_graph_call(x, forward_noise, increments)


def _check_cuda_graph_call(x: torch.Tensor, forward_noise, increments) -> None:
    """What a captured chain needs from a call (the config's part is checked by PurifyConfig)."""
    if x.device.type != "cuda":
        raise ValueError(f"cuda_graph: needs CUDA tensors (x and the model on a GPU), got x on {x.device}; pass "
                         "cuda_graph=False on this device")
    if forward_noise is not None or increments is not None:
        raise ValueError("cuda_graph: draws its noise in the captured kernels from (seed, noise_ids); caller-given "
                         "forward_noise/increments need cuda_graph=False")


def _check_graph_seed(seed) -> None:
    if seed is None:
        raise ValueError("cuda_graph: needs an int seed: the fused step's seed is a kernel argument recorded in the "
                         "captured graph, so a fresh seed per call would capture a new graph per call; pass seed=..., "
                         "and new noise_ids per call for fresh noise without recapturing (see "
                         "diffpure_fast.cuda_graphs)")


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
    if ids.numel() and not all(0 <= v < 1 << 32 for v in torch.stack(torch.aminmax(ids)).tolist()):
        raise ValueError("noise_ids: expected ids in [0, 2^32)")
    return ids.to(x.device)


# ---------------------------------------------------------------------------------------------------------------


def _model_schedule(schedule: VPSchedule | None, model: ScoreModel) -> VPSchedule:
    """The schedule a purification runs on: the score model's own (the one its network was trained on; a loaded
    checkpoint's comes from its config). An explicit ``schedule`` must equal it: another one would give the
    network's output a meaning it does not have."""
    own = model.schedule
    if schedule is None:
        return own
    if not isinstance(schedule, VPSchedule):
        raise OptionTypeError("schedule", f"expected a VPSchedule or None (the model's), got {type(schedule).__name__}")
    if schedule != own:
        raise OptionError("schedule", f"{schedule} contradicts the score model's own {own} (the schedule its network "
                                      f"was trained on; a loaded checkpoint's comes from its config); leave "
                                      f"schedule unset, or build the model with this schedule")
    return schedule


def purify(x: torch.Tensor, model: ScoreModel, *, method: str = "diffpure", seed: int | None = None,
           noise_ids=None, forward_noise: torch.Tensor | None = None, increments: torch.Tensor | None = None,
           value_range: tuple[float, float] = (0.0, 1.0), grad_mode: str = "none", guidance_grad: str = "exact",
           surrogate_steps: int = 10, grad_cache_steps: int = 0, param_grads: bool = False,
           schedule: VPSchedule | None = None, cuda_graph: bool = False, autocast: str | None = None,
           resize: str | None = None, **options) -> torch.Tensor:
    """Purify a batch with a purification method.

    Args:
        x: (B, C, H, W) float tensor with values in ``value_range``.
        model: a ``ScoreModel`` (``dpf.load_score_model(...)``, or ``dpf.EpsModel(net, time_input=...)``) with no
            submodule in training mode (an error otherwise: dropout would make the output random and the gradient
            wrong; the package never switches a caller's network between modes).
        method: ``"diffpure"`` (Nie et al. 2022: diffuse to t*, solve the reverse SDE), ``"gdmp"`` (Wang et al. 2022:
            guided DDPM rounds pulled toward the noised input), ``"mimic"`` (MimicDiffusion, Song et al. 2024: a
            DDPM chain from pure noise with L1 guidance toward the input), ``"agdm"`` (Lin et al. 2024: DDPM
            steps guided by an adversarially trained auxiliary network; a reconstruction, no code was published).
            See ``diffpure_fast.methods``.
        **options: the method's options (anything else is an error naming it):
            diffpure: ``diffusion_type`` (the official runner: ``"sde"`` (default), ``"ode"``, ``"ldsde"``,
            ``"ddpm"``, ``"celebahq-ddpm"``; see ``diffpure_fast.methods.diffpure``), then that runner's options
            (``t_star``'s default is the model's ``default_t_star`` where it has one: 0.15 for a loaded
            guided_diffusion (ImageNet) model, as DiffPure's ImageNet runs; else the runner's):
            sde: ``t_star`` (0.1), ``dt`` (1e-3, Euler–Maruyama on torchsde's float32 grid), ``steps``
            (instead of dt: Euler steps over [1e-5, t*], or DDPM steps, default one per level), ``solver``
            (``"euler"``: DiffPure's reverse SDE, or ``"ddpm"``: ancestral steps on the discrete schedule);
            ode: ``t_star`` (0.1), ``step_size`` (1e-3, Euler on torchdiffeq's grid); ldsde: ``t_star`` (0.1),
            ``dt`` (1e-2), ``sigma2`` (1e-3), ``lambda_ld`` (1e-2), ``eta`` (5); ddpm (a learned-variance model):
            ``t_star`` (0.1); celebahq-ddpm: ``t_star`` (0.5), ``var_type`` ("fixedsmall" | "fixedlarge");
            gdmp: ``purify_step`` (36), ``max_iter`` (4), ``guide_mode`` ("mse" | "ssim"), ``guide_scale`` (60000),
            ``ptb`` (8), ``norm_batch`` (100), ``clip_x0`` (True);
            mimic: ``steps`` (100), ``guidance_window`` ((21, 90)), ``rho`` (3000), ``upsample`` (4),
            ``norm_batch`` (16), ``eps_in_guidance`` (False), ``eta`` (1.0), ``st_beta`` (1.0);
            agdm: ``auxiliary`` (required: the auxiliary network, e.g. ``dpf.load_auxiliary("digits")``),
            ``t_star`` (0.07), ``steps`` (None: one DDPM step per level), ``scale`` (3000), ``scale_schedule``
            ("constant" | "noise"), ``distance`` ("feature_mse" | "logit_mse" | "kl"), ``feature_layer`` (None),
            ``aux_input`` ("x_t" | "x0_hat"), ``label`` ("adversarial" | "current" | "none"),
            ``aux_value_range`` ((0, 1)). Defaults beyond t* are our reading (``diffpure_fast.methods.agdm``).
        seed, noise_ids: the engine's noise is a function of (seed, noise_ids[i], step, element): the same pair
            gives the same noise for a sample whatever batch it sits in. ``seed=None`` draws a fresh seed from the
            OS (not from torch's RNG); ``noise_ids`` (a 1-D integer list, tuple, NumPy array or tensor of B ids in
            [0, 2^32)) defaults to ``arange(B)``.
        forward_noise: (B, C, H, W) the z of DiffPure's forward diffusion, used exactly when given (not for
            ``ldsde``, which has none).
        increments: (steps, B, C, H, W) DiffPure's per-step noise used exactly when given: Brownian increments
            dW_k for ``"euler"`` and ``ldsde``, standard normals for ``"ddpm"``, ``diffusion_type="ddpm"`` and
            ``"celebahq-ddpm"`` (one per level, in call order); none for ``ode``.
        value_range: the range of ``x`` and of the output; the chains work in [-1, 1] internally.
        grad_mode: ``"none"`` (no graph), ``"full"`` (exact gradient of this discrete computation, guidance
            included; stored states, recomputed steps), ``"adjoint"`` (the official continuous adjoint: torchsde's
            for DiffPure's Euler–Maruyama solve, torchdiffeq's ``odeint_adjoint`` for ``diffusion_type="ode"``),
            ``"bpda"`` (identity backward), ``"surrogate"`` (exact gradient of an unguided ``surrogate_steps``-step
            DDPM chain from the method's surrogate level, with the real forward output).
        guidance_grad: how ``"full"`` treats guidance terms: ``"exact"``; ``"detached"`` (the guidance as a constant,
            as the released evaluations of GDMP and MimicDiffusion computed); ``"straight_through"`` (mimic: the sign
            in its guidance gets a smooth-L1 derivative in the backward pass only, a declared surrogate).
        surrogate_steps: the DDPM step count of ``grad_mode="surrogate"``'s gradient chain, run exactly: at most the
            level of the method's surrogate start (e.g. round(1000 t*) for DiffPure), else an error.
        grad_cache_steps: ``grad_mode="full"`` keeps the graphs of this many last steps from the forward pass
            (memory: one step's activations each) instead of recomputing them in the backward pass (a count of at
            least the chain's steps keeps every step; the gradient is the same whatever the count).
        param_grads: ``grad_mode="full"`` also back-propagates into the score network's parameters that require
            grad (off by default: attacks need d/dx only, and parameter VJPs cost time).
        cuda_graph: replay the chain from CUDA graphs captured once per (chain, shape, dtype, device, seed, model),
            see ``diffpure_fast.cuda_graphs``: CUDA tensors, an int ``seed`` (captured), unguided chains (method
            "diffpure"), ``grad_mode`` "none", "bpda", "full" or "surrogate", no caller-given noise. The replay
            runs the eager path's kernels with the same arguments, so outputs equal the eager ones on the same
            device and fused-step implementation (the cuda-marked tests check it bit for bit).
        autocast: ``"bf16"`` or ``"fp16"`` runs the score network under ``torch.autocast`` in that precision, its
            eps cast back to x's dtype before the fused step (the state, noise and gradients' accumulation stay in
            x's dtype); ``None`` (default) runs it in the model's own precision.
        schedule: ``None`` (default): the model's own ``VPSchedule`` (``model.schedule``: DiffPure's beta 0.1..20
            for the official checkpoints; a score_sde config's ``beta_min``/``beta_max``/``num_scales`` otherwise).
            An explicit schedule must equal the model's (``ValueError`` naming ``schedule`` otherwise).

    Raises:
        ValueError (``diffpure_fast._validate.OptionError``, naming the argument): a bad option, a model in
        training mode, x outside ``value_range``, an option the run cannot honour exactly (e.g. more
        ``surrogate_steps`` than the surrogate level has levels). Nothing is clipped, capped or rounded silently;
        rounded quantities (DiffPure's level round(N t*)) are rounded once and recorded
        (``PurifyConfig.resolved()``).

    Returns:
        (B, C, H, W) purified images in ``value_range`` (not clipped: the reverse process can overshoot slightly,
        as in the official code).
    """
    model = as_score_model(model)
    cfg = PurifyConfig.build(method, value_range=value_range, grad_mode=grad_mode, guidance_grad=guidance_grad,
                             surrogate_steps=surrogate_steps, grad_cache_steps=grad_cache_steps,
                             param_grads=param_grads, schedule=_model_schedule(schedule, model),
                             cuda_graph=cuda_graph, autocast=autocast, resize=resize,
                             **_model_defaults(model, method, options))
    return _purify(x, model, cfg, seed=seed, noise_ids=noise_ids, forward_noise=forward_noise, increments=increments)


@dataclass
class Trajectory:
    """A purification with chosen intermediate states (``Purifier.trajectory``).

    output: (B, C, H, W) the purified images in the value range. states: the states x_k (B, C, H, W) in [-1, 1]
    before global steps ``steps`` (differentiable in x with grad_mode "full": the exact adjoint); alpha_bar: the
    forward marginal's alpha_bar at each state's level or time (``chain.state_alpha_bar``); start_noise: the start
    noise z_r (B, C, H, W) of each state's round (zeros for a round that draws none); x_unit: the input in [-1, 1].
    """

    output: torch.Tensor
    states: list[torch.Tensor]
    steps: tuple[int, ...]
    alpha_bar: tuple[float, ...]
    start_noise: list[torch.Tensor]
    x_unit: torch.Tensor


def _state_steps(chain: Chain, every: int) -> tuple[int, ...]:
    """Global indices of every ``every``-th state of each round after its start (the start itself is the diffused
    input, not a reconstruction)."""
    every = check_int("every", every)
    return tuple(rnd.first_step + j for rnd in chain.rounds for j in range(every, len(rnd.plan), every))


def _trajectory(chain: Chain, cfg: PurifyConfig, noise: Noise, x_unit: torch.Tensor, out: torch.Tensor,
                steps: tuple[int, ...], states: list[torch.Tensor]) -> Trajectory:
    rounds = {k: r for r, rnd in enumerate(chain.rounds) for k in range(rnd.first_step, rnd.first_step + len(rnd.plan))}
    with torch.no_grad():
        z = {r: (noise.start(r, x_unit.detach()) if chain.rounds[r].noise_scale != 0.0
                 else torch.zeros_like(x_unit)) for r in sorted({rounds[k] for k in steps})}
    all_steps = [st for rnd in chain.rounds for st in rnd.plan.steps]
    return Trajectory(out, states, steps, tuple(state_alpha_bar(all_steps[k], cfg.schedule) for k in steps),
                      [z[rounds[k]] for k in steps], x_unit)


def _model_defaults(model: ScoreModel, method: str, options: dict) -> dict:
    """The options with the score model's own DiffPure t* (``ScoreModel.default_t_star``: 0.15 for guided-diffusion's
    ImageNet model, DiffPure's ``--t 150``) where ``t_star`` is not given; the celebahq-ddpm runner keeps its own."""
    t = getattr(model, "default_t_star", None)
    if t is None or method != "diffpure" or "t_star" in options or options.get("diffusion_type") == "celebahq-ddpm":
        return options
    return {**options, "t_star": t}


def _purify(x, model, cfg: PurifyConfig, *, seed, noise_ids, forward_noise=None, increments=None,
            states_every: int | None = None):
    """purify's work; with ``states_every`` a ``Trajectory`` (every states_every-th state of each round)."""
    model = as_score_model(model)
    # At every call, not only when the config was built: the caller may have switched the network since. Cost:
    # ~1.6 ms for the 643 modules of DiffPure's CIFAR-10 NCSN++ (2-core VM, under load), against ~25 ms for each
    # of its 100 network calls there.
    check_eval_mode("model", model)
    _model_schedule(cfg.schedule, model)
    chain = cfg.chain(x.dtype if isinstance(x, torch.Tensor) else torch.float32)
    x_user, x = x, _resized(x, model, cfg.resize)
    _check_inputs(x, model, cfg, chain, forward_noise, increments, noise_ids)
    expose = () if states_every is None else _state_steps(chain, states_every)
    if cfg.cuda_graph:
        _check_graph_seed(seed)
    seed = secrets.randbits(63) if seed is None else check_seed(seed)
    ids = _as_noise_ids(noise_ids, x)

    lo, hi = cfg.value_range
    scale = (hi - lo) / 2.0
    x_unit = x if (lo, hi) == (-1.0, 1.0) else (x - lo) / scale - 1.0
    noise = Noise(seed=seed, sample_ids=ids, increments=increments, forward=forward_noise)

    if cfg.param_grads and getattr(model, "weights_constant", False):
        raise ValueError("param_grads: the model is a compiled fast_score_model whose weights are constants to its "
                         "network; build it with fast_score_model(..., param_grads=True) for weight gradients")
    wants_params = cfg.param_grads and any(p.requires_grad for p in model.parameters())
    wants_graph = cfg.grad_mode != "none" and torch.is_grad_enabled() and (x.requires_grad or wants_params)
    # Captured graphs apply cfg.autocast inside the capture; the eager path wraps the network here.
    graphs = ChainGraphs(model, cfg) if cfg.cuda_graph else None
    net = with_autocast(model, cfg.autocast)
    if states_every is not None and (cfg.cuda_graph or (wants_graph and cfg.grad_mode != "full")):
        raise OptionError("grad_mode", f"intermediate states are given with grad_mode='full' (their exact gradient) "
                                       f"or without a graph, and without cuda_graph; got grad_mode={cfg.grad_mode!r}"
                                       + (", cuda_graph=True" if cfg.cuda_graph else ""))
    states = None
    if not wants_graph or cfg.grad_mode == "bpda":
        with torch.no_grad():
            if expose:
                out, all_states = run_chain(x_unit, net, chain, noise, keep_states=True)
                states = [all_states[k] for k in expose]
            else:
                out = run_chain(x_unit, net, chain, noise) if graphs is None else graphs.run(x_unit, chain, noise)
        if wants_graph:
            # BPDA (DiffPure's BPDA+EOT): the purification's value, the identity's gradient d out / d x = I.
            out = x_unit + (out - x_unit.detach())
    elif graphs is not None:
        out = graphs.differentiable(x_unit, chain, noise, x_user=x_user)
    elif expose:
        out, *states = differentiable_chain(x_unit, net, chain, noise, cfg, x_user=x_user, expose=expose)
    else:
        out = differentiable_chain(x_unit, net, chain, noise, cfg, x_user=x_user)
    out = out if (lo, hi) == (-1.0, 1.0) else (out + 1.0) * scale + lo
    out = out if x is x_user else F.interpolate(out, size=tuple(x_user.shape[2:]), mode=cfg.resize,
                                                align_corners=False)
    if states_every is None:
        return out
    return _trajectory(chain, cfg, noise, x_unit, out, expose, states or [])


def _resized(x, model: ScoreModel, resize: str | None):
    """x resized to the score model's size (``resize``: the interpolation, DiffPure's ``F.interpolate(...,
    mode='bilinear', align_corners=False)``), or x itself (no resize asked, or already that size). Differentiable:
    the attack's budget stays in the input's space, the resize being part of the defense."""
    if resize is None:
        return x
    _check_image(x)
    size = getattr(model, "image_size", None)
    if size is None:
        raise OptionError("resize", "the score model does not say its image size (model.image_size is None); "
                                    "set it, or resize the images yourself")
    if tuple(x.shape[2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode=resize, align_corners=False)


class Purifier(nn.Module):
    """``purify`` as a module: ``Purifier(model, method=..., **options)(x) == purify(x, model, method=..., **options)``.

    A drop-in preprocessing layer (e.g. ``nn.Sequential(Purifier(model, grad_mode="full"), classifier)``) for
    AutoAttack / torchattacks style evaluation: no prints, no files, no global RNG; the score network is a
    submodule (``.to(device)`` moves it) put in eval mode here and kept there by ``.train()``; a call with the
    network switched back to training mode (``purifier.model.train()``) is an error naming ``model``.
    ``seed=None`` draws fresh noise on every call (a randomized defense); an int makes every call reuse the same
    noise. Options are validated once, here.

    ``cuda_graph=True`` needs an int seed (it is recorded in the captured graph); pass new ``noise_ids`` to
    ``forward`` for fresh noise per call without recapturing. The captured graphs are cached per model (see
    ``diffpure_fast.cuda_graphs``), so ``.to(device)`` recaptures on the next call.
    """

    def __init__(self, model: ScoreModel, *, method: str = "diffpure", seed: int | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0), grad_mode: str = "none", guidance_grad: str = "exact",
                 surrogate_steps: int = 10, grad_cache_steps: int = 0, param_grads: bool = False,
                 schedule: VPSchedule | None = None, cuda_graph: bool = False, autocast: str | None = None,
                 resize: str | None = None, **options):
        super().__init__()
        model = as_score_model(model)
        self.config = PurifyConfig.build(method, value_range=value_range, grad_mode=grad_mode,
                                         guidance_grad=guidance_grad, surrogate_steps=surrogate_steps,
                                         grad_cache_steps=grad_cache_steps, param_grads=param_grads,
                                         schedule=_model_schedule(schedule, model), cuda_graph=cuda_graph,
                                         autocast=autocast, resize=resize,
                                         **_model_defaults(model, method, options))
        # The Purifier owns its score network: eval mode now and on every .train() (forward still checks it, since
        # the network itself can be switched back: purifier.model.train()).
        self.model = model.eval()
        if cuda_graph:
            _check_graph_seed(seed)
        self.seed = None if seed is None else check_seed(seed)

    def train(self, mode: bool = True):
        # The score network stays in eval mode (dropout off), as in DiffPure, whatever the wrapper's mode.
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor, *, noise_ids=None) -> torch.Tensor:
        return _purify(x, self.model, self.config, seed=self.seed, noise_ids=noise_ids)

    def trajectory(self, x: torch.Tensor, *, noise_ids=None, every: int = 1) -> Trajectory:
        """``forward(x)`` with every ``every``-th intermediate state of each round after its start (a
        ``Trajectory``), for losses on the reverse chain's states (DiffAttack's deviated reconstruction). The
        states are differentiable in x with ``grad_mode="full"`` (the exact adjoint returns them as outputs, in the
        same memory); other gradient modes and ``cuda_graph`` are refused (ValueError naming grad_mode)."""
        return _purify(x, self.model, self.config, seed=self.seed, noise_ids=noise_ids, states_every=every)

    def extra_repr(self) -> str:
        c = self.config
        extra = (", cuda_graph=True" if c.cuda_graph else "") + (f", autocast={c.autocast!r}" if c.autocast else "")
        extra += f", resize={c.resize!r}" if c.resize else ""
        return (f"{c.describe()}, grad_mode={c.grad_mode!r}, guidance_grad={c.guidance_grad!r}, "
                f"value_range={c.value_range}, seed={self.seed}{extra}")
