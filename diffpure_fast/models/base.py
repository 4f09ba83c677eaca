"""One interface over epsilon-prediction networks with different time conventions.

The engine only ever calls ``model.eps(x, t, levels=None)``:

* ``x``: (B, C, H, W) in roughly [-1, 1] (a diffused image);
* ``t``: (B,) continuous time in (0, 1], float32 (the exact float32 value the official pipeline computes);
* ``levels``: optional (B,) int64 discrete DDPM levels in [0, N) (the ancestral solver passes them; a discrete-time
  network uses them as its timestep, a continuous-time one ignores them and uses ``t``);
* returns epsilon, (B, C, H, W), with learned-variance channels already split off.

The score is ``-eps / sigma(t)`` with the continuous ``sigma`` of the schedule, for both families, as in DiffPure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._validate import check_bool
from ..schedule import DIFFPURE_SCHEDULE, VPSchedule

__all__ = ["AUTOCAST_DTYPES", "TIME_INPUTS", "AutocastModel", "EpsModel", "ScoreModel", "as_score_model",
           "network_vjp", "with_autocast"]

# How a network expects its time argument:
#   "continuous": score_sde continuous VP models, float labels 999 t (score_sde's get_score_fn: 999 whatever the
#                 config's num_scales);
#   "discrete":   guided-diffusion / DDPM nets, integer steps (1000 t).long() (or the solver's levels);
#   "unit":       the continuous t in [0, 1] unchanged.
TIME_INPUTS = ("continuous", "discrete", "unit")
CONTINUOUS_LABEL_SCALE = 999.0


class ScoreModel(nn.Module):
    """Base class: subclasses implement ``eps``; ``score`` and ``forward`` follow from it.

    ``in_channels`` and ``image_size`` (None when unknown) let callers reject inputs the network was not built for.
    ``default_t_star`` (None: the method's own default) is DiffPure's t* for the data this network was trained on,
    used by ``method="diffpure"`` when ``t_star`` is not given: ``load_score_model`` sets 0.15 for guided-diffusion's
    ImageNet model (DiffPure's ImageNet run scripts, ``--t 150``) and 0.1 for score_sde's CIFAR-10 model (``--t 100``).

    Structure: a loaded model is a wrapper (``EpsModel``; ``AutocastModel`` and ``FastScoreModel`` wrap another
    ``ScoreModel``) around the network, ``model.net`` (NCSN++, guided-diffusion's UNet, ...). The engine calls
    ``model.eps(x, t)``, which calls ``model.net`` directly, never ``model(x, t)``: a forward hook registered on the
    wrapper therefore never fires (it counts 0 calls); one on ``model.net`` fires once per network evaluation. To
    count calls whatever the wrapper, use ``diffpure_fast.count_network_calls(model)`` (``diffpure_fast.bench``),
    which counts ``eps`` and ``eps_and_variance`` calls.
    """

    schedule: VPSchedule = DIFFPURE_SCHEDULE
    in_channels: int | None = None
    image_size: int | None = None
    default_t_star: float | None = None

    def __init__(self):
        super().__init__()
        # A score model is created in eval mode: its own flag only (not .eval(), which would switch the networks
        # it wraps: their modes are their owners'); purify refuses any submodule in training mode.
        self.training = False

    def eps(self, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def has_learned_variance(self) -> bool:
        """Whether ``eps_and_variance`` is available (guided-diffusion's ``learn_sigma`` networks)."""
        return False

    def eps_and_variance(self, x: torch.Tensor, t: torch.Tensor,
                         levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, v): epsilon and the learned-variance channels v (B, C, H, W) of a network trained with learned
        variance (guided-diffusion's ``learn_sigma``: the second half of the output channels, about [-1, 1], which
        interpolate the log variance between the clipped posterior variance (v = -1) and beta (v = 1)).
        A network without them raises a ValueError naming ``model``."""
        raise ValueError(f"model: {type(self).__name__} has no learned-variance output (guided-diffusion's "
                         "learn_sigma); a sampler that uses the network's variance needs one")

    def score(self, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = self.schedule.sigma(t.to(x.dtype)).reshape(-1, *([1] * (x.dim() - 1)))
        return -self.eps(x, t, levels) / sigma

    def forward(self, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        return self.eps(x, t, levels)

    def eager_model(self) -> ScoreModel:
        """The model the engine calls where a guidance term differentiates through ``eps`` (its graph is then
        retained for a second backward, and the exact adjoint differentiates it twice): this one; a compiled
        model returns its eager network, since compiled graphs support neither."""
        return self


class EpsModel(ScoreModel):
    """Adapter: any ``net(x, label) -> epsilon`` module, with its time convention named explicitly.

    net: an ``nn.Module`` (or callable) taking (x (B, C, H, W), label (B,)) and returning (B, C', H, W) with
        ``C' == C`` or, for learned-variance nets (``learned_sigma=True``), ``C' == 2 C`` (the first C are epsilon).
        Put it in eval mode yourself: purify refuses a network with any submodule in training mode.
    time_input: one of ``TIME_INPUTS`` or a callable mapping (t (B,) float32, levels or None) to the label.
    schedule: the VP schedule the network was trained on; purify runs on it (default DiffPure's, beta 0.1..20).
    """

    def __init__(self, net: Callable, *, time_input="continuous", learned_sigma: bool = False,
                 schedule: VPSchedule = DIFFPURE_SCHEDULE):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net: expected an nn.Module or callable net(x, t) -> eps, got {type(net).__name__}")
        if not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input: expected one of {TIME_INPUTS} or a callable, got {time_input!r}")
        self.net = net
        self.in_channels = getattr(net, "in_channels", None) or getattr(net, "num_channels", None)
        self.image_size = getattr(net, "image_size", None)
        self.time_input = time_input
        self.learned_sigma = check_bool("learned_sigma", learned_sigma)
        self.schedule = schedule

    def labels(self, t: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        if callable(self.time_input):
            return self.time_input(t, levels)
        if self.time_input == "continuous":
            return t * CONTINUOUS_LABEL_SCALE
        if self.time_input == "discrete":
            if levels is not None:
                return levels
            # float32 on purpose: DiffPure floors the float32 product, and float64 can land on the other side.
            return (t.float() * self.schedule.num_levels).long()
        return t

    def _output(self, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        out = self.net(x, self.labels(t, levels))
        expected = 2 * x.shape[1] if self.learned_sigma else x.shape[1]
        if out.shape[0] != x.shape[0] or out.shape[1] != expected or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"model: expected an output of shape {(x.shape[0], expected, *x.shape[2:])} "
                             f"(learned_sigma={self.learned_sigma}), got {tuple(out.shape)}")
        return out

    @property
    def has_learned_variance(self) -> bool:
        return self.learned_sigma

    def eps(self, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        out = self._output(x, t, levels)
        return out[:, :x.shape[1]] if self.learned_sigma else out

    def eps_and_variance(self, x: torch.Tensor, t: torch.Tensor,
                         levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.learned_sigma:
            return super().eps_and_variance(x, t, levels)
        out = self._output(x, t, levels)
        return out[:, :x.shape[1]], out[:, x.shape[1]:]


def as_score_model(model) -> ScoreModel:
    if isinstance(model, ScoreModel):
        return model
    raise TypeError(
        "model: expected a diffpure_fast ScoreModel (from dpf.load_score_model, or dpf.EpsModel(net, "
        f"time_input='continuous'|'discrete'|'unit') around an (x, t) -> eps network), got {type(model).__name__}")


# The reduced precisions a score network may run in under autocast (PurifyConfig.autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastModel(ScoreModel):
    """A score model whose network runs under ``torch.autocast`` while the solver state keeps its dtype.

    ``eps(x, t, levels)`` takes x (B, C, H, W) in the state's dtype (float32 normally), runs the wrapped model with
    autocast to ``mode`` ("bf16" or "fp16") on x's device type, and returns eps cast back to x's dtype, so the fused
    step, the noise and the stored states of the adjoints stay in full precision; only the network's matmuls and
    convolutions run in the reduced precision (autocast keeps its float32 list, e.g. group norms and softmax, in
    float32). Gradients flow through it as through any autocast region.

    The autocast weight cache is off: the network is called once per region (one step), so the cache would save
    nothing, and a CUDA graph capture requires it off (torch.cuda.graphs: cached casts would be freed during
    capture). ``inner``: the wrapped ScoreModel (its parameters are this module's).
    """

    def __init__(self, inner: ScoreModel, mode: str):
        super().__init__()
        if mode not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast: expected one of {tuple(AUTOCAST_DTYPES)}, got {mode!r}")
        self.inner, self.mode = inner, mode
        self.schedule = inner.schedule
        self.in_channels, self.image_size = inner.in_channels, inner.image_size

    def eps(self, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.mode], cache_enabled=False):
            out = self.inner.eps(x, t, levels)
        return out.to(x.dtype)

    @property
    def has_learned_variance(self) -> bool:
        return self.inner.has_learned_variance

    def eps_and_variance(self, x: torch.Tensor, t: torch.Tensor,
                         levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.mode], cache_enabled=False):
            eps, var = self.inner.eps_and_variance(x, t, levels)
        return eps.to(x.dtype), var.to(x.dtype)


def with_autocast(model: ScoreModel, mode: str | None) -> ScoreModel:
    """``model`` itself for mode None, else an ``AutocastModel`` around it."""
    return model if mode is None else AutocastModel(model, mode)


def network_vjp(model: ScoreModel, outputs, inputs, grad_outputs, **kwargs) -> tuple:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, **kwargs)`` where ``outputs`` come from ``model``'s
    network: every call site of the engine that takes a VJP through the score network goes through here.

    For a model under ``autocast="fp16"`` the incoming vectors are multiplied by one power of two before the
    backward pass and the results divided by it after, as a loss scaler does (torch.amp.GradScaler), but chosen per
    call from the vectors themselves: their largest magnitude lands in [1, 2). Otherwise the network's backward runs
    on the raw vectors in float16, whose smallest normal number is 6.1e-5: an attack's gradient of 1e-6 per pixel
    flushes to zero or to a few bits (CPU, digits model, 10-step exact gradient with the upstream gradient scaled by
    1e-6 / 1e-8: relative error 1.28 / 4.9 without the scale, 5.8e-4 / 5.9e-4 with it; bf16: 4.7e-3). One
    scalar for all vectors and samples, because J^T (s v) = s J^T v holds for a scalar whatever the network mixes
    across the batch; a power of two, so scaling and unscaling are exact in float32. The scale is computed on the
    device (no synchronisation: CUDA-graph capturable). The cost: one reduction and two elementwise passes per VJP.
    Larger vectors are left with 15 binades of headroom below float16's maximum (65504); a backward pass that still
    overflows gives inf/NaN in the gradient, never a silently small one (bf16, with float32's range, needs no scale).

    outputs, inputs, grad_outputs: as ``torch.autograd.grad`` takes them (a tensor or a sequence); returns its tuple.
    """
    if not (isinstance(model, AutocastModel) and model.mode == "fp16"):
        return torch.autograd.grad(outputs, inputs, grad_outputs, **kwargs)
    vectors = [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else list(grad_outputs)
    amax = torch.stack([torch.linalg.vector_norm(v.detach(), ord=float("inf")) for v in vectors]).amax()
    # amax = m 2^e with m in [0.5, 1): scale = 2^(1 - e) puts it in [1, 2) (amax = 0 gives e = 0: scale 2).
    _, exponent = torch.frexp(amax)
    scale = torch.exp2(1 - exponent.to(amax.dtype))
    grads = torch.autograd.grad(outputs, inputs, [v * scale for v in vectors], **kwargs)
    return tuple(None if g is None else g / scale for g in grads)
