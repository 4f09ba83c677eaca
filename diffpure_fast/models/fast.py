"""The CPU fast path: a score network compiled with inductor (``torch.compile``) and run channels-last.

    model = dpf.load_score_model("score_sde", "checkpoint_8.pth", compile=True, channels_last=True)
    fast = dpf.fast_score_model(dpf.EpsModel(my_net, time_input="discrete"))     # any ScoreModel

What it changes, and why (2.47M-parameter NCSN++, batch 4, float32, 2-core CPU; benchmarks/results/fast_cpu.md and
network_profile_cpu.md, measured on the quiet VM):

* compiled, channels-last: inductor fuses the GroupNorm / SiLU / residual arithmetic between oneDNN's
  convolutions, which run on NHWC inputs: a no-grad purification takes 0.76x the eager time, so
  DiffPure's official pipeline takes 1.40x as long as this one (1.02x against the eager network; quiet 2-core
  VM, ``benchmarks/results/fast_cpu.md``; single runs here move by up to 20%).
* weights are constants to the compiled network (unless ``param_grads=True``): an aot_autograd backward graph
  computes the gradient of every input that required grad when it was traced, whatever ``autograd.grad`` asks
  for; traced with the weights requiring grad, one forward plus input-VJP took 1.46x as long (2.69 against 1.84
  eager no-grad calls, measured at 1 thread). The eager network gets this pruning from autograd for free.
* no compilation at import or construction: ``torch.compile`` is lazy. The first call of each kind (no-grad, with
  grad; per dtype, and a dynamic-shape graph after a second batch size) traces and compiles: 90 s and 124 s for
  this network's two graphs on the 2-core VM. Inductor's FX-graph and AOTAutograd caches keep the code in
  :func:`inductor_cache_dir`, so a second process only traces and loads it (7.4 s and 4.5 s).

Gradients cost more than the forward speed-up suggests: ``grad_mode="full"`` recomputes each step's network call
with a graph, then takes its input-VJP, whose convolution and GroupNorm backward kernels gain less from compiling
than the forward does; it took 3.38x the fast no-grad time (eager: 2.94x the eager one). ``grad_cache_steps``
skips the recompute for the steps it keeps: with all 100 kept, 2.46x, for 3.5 GB at batch 4.

Measured and left out: inductor's ``freezing`` (weights folded and prepacked for oneDNN) ran no faster (0.738x
against 0.740x eager) and its prepacked weights bypass the FX-graph cache, so every process would recompile; one
graph for forward plus input-VJP (``torch.func.vjp`` under ``torch.compile``) ran as fast as the two-graph split
(311 against 308 ms at 1 thread) and took 2.5x as long to compile; compiled without channels-last, a call took as
long as with it (41.4 against 40.9 ms, medians of 40 interleaved calls), so the default layout is a wash here.

What bounds it (``benchmarks/profile_network.py``, 39.4 ms per compiled call): its convolutions take 22.3 ms
(151 GFLOP/s), attention and matrix products 3.0 ms, inductor's fused GroupNorm/SiLU/residual kernels 7.9 ms, the
guard check 0.8 ms; a call with grad plus its input-VJP takes 2.52 no-grad calls, so ``grad_mode="full"`` without a
cache costs at least 3.5 no-grad calls per step.

A guidance term that differentiates through the network (``method="mimic"`` with ``eps_in_guidance=True``) retains
the network's graph for a second backward, and ``grad_mode="full"`` differentiates it twice; compiled graphs support
neither, so those calls run the eager network (:meth:`FastScoreModel.eager_model`); every other call stays
compiled.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .base import ScoreModel, as_score_model

__all__ = ["CACHE_ENV", "FastScoreModel", "fast_score_model", "inductor_cache_dir"]

CACHE_ENV = "DIFFPURE_FAST_CACHE_DIR"


def inductor_cache_dir() -> Path:
    """Where the fast path keeps inductor's compiled code: ``$DIFFPURE_FAST_CACHE_DIR/inductor`` when set, else
    ``$XDG_CACHE_HOME/diffpure_fast/inductor``, else ``~/.cache/diffpure_fast/inductor`` (a folder that survives
    reboots, unlike torch's default under /tmp). Reads the environment only; creates nothing."""
    own = os.environ.get(CACHE_ENV)
    if own:
        return Path(own).expanduser() / "inductor"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) else Path.home() / ".cache"
    return base / "diffpure_fast" / "inductor"


def _use_cache_dir(cache_dir) -> str:
    """Point inductor's caches at the fast path's folder (an explicit cache_dir always; otherwise only when the
    user has not set TORCHINDUCTOR_CACHE_DIR). Process-wide, as inductor reads it from the environment."""
    if cache_dir is not None:
        path = Path(cache_dir).expanduser()
    elif os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        path = inductor_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return str(path)


@contextlib.contextmanager
def _frozen(params: tuple[torch.Tensor, ...]):
    """Parameters with requires_grad=False for the duration (restored after, also on error): a graph traced and
    run inside has no weight-gradient branch. ~0.1 ms for the 368 tensors of the 2.5M-parameter NCSN++, against
    ~25 ms for one of its calls. Not thread-safe: two threads must not share a fast model's weights while one of
    them runs it with grad."""
    thawed = [p for p in params if p.requires_grad]
    try:
        for p in thawed:
            p.requires_grad = False
        yield
    finally:
        for p in thawed:
            p.requires_grad = True


def _eps_call(model: ScoreModel, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None,
              channels_last: bool) -> torch.Tensor:
    # The layout changes sit inside the compiled region, where inductor fuses them into the first and last kernels.
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return model.eps(x, t, levels).contiguous()


def _eps_variance_call(model: ScoreModel, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None,
                       channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eps, var = model.eps_and_variance(x, t, levels)
    return eps.contiguous(), var.contiguous()


class FastScoreModel(ScoreModel):
    """A ``ScoreModel`` whose ``eps`` runs ``model``'s compiled (and/or channels-last) network.

    Built by :func:`fast_score_model`. ``model`` is a submodule (``.to(device)`` moves it; ``state_dict`` keys start
    with ``model.``); its parameters are shared, not copied. ``eps(x, t, levels)`` takes and returns (B, C, H, W)
    as ``model.eps`` does; the result is contiguous whatever ``x``'s layout.
    """

    def __init__(self, model: ScoreModel, *, compile: bool = True, channels_last: bool = True,
                 param_grads: bool = False, cache_dir: str | os.PathLike | None = None):
        super().__init__()
        self.model = model
        self.schedule = model.schedule
        self.in_channels, self.image_size = model.in_channels, model.image_size
        self.compiled, self.channels_last, self.param_grads = compile, channels_last, param_grads
        self.cache_dir = _use_cache_dir(cache_dir) if compile else None
        # The same Parameter objects for the model's life (.to() and load_state_dict keep them); a parameter added
        # later would only stay requires_grad, i.e. cost time, never correctness.
        self._params = tuple(model.parameters())
        # torch.compile only wraps here; tracing and code generation wait for the first call.
        self._call = torch.compile(_eps_call) if compile else _eps_call
        self._call_variance = torch.compile(_eps_variance_call) if compile else _eps_variance_call

    def _run(self, call, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None):
        cl = self.channels_last and x.dim() == 4
        if self.weights_constant and torch.is_grad_enabled():
            with _frozen(self._params):
                return call(self.model, x, t, levels, cl)
        return call(self.model, x, t, levels, cl)

    def eps(self, x: torch.Tensor, t: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(self._call, x, t, levels)

    @property
    def has_learned_variance(self) -> bool:
        return self.model.has_learned_variance

    def eps_and_variance(self, x: torch.Tensor, t: torch.Tensor,
                         levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_learned_variance:   # the eager model's error, not one from inside the compiled region
            return self.model.eps_and_variance(x, t, levels)
        return self._run(self._call_variance, x, t, levels)

    @property
    def weights_constant(self) -> bool:
        """Whether the compiled network treats the weights as constants (no weight gradients through it)."""
        return self.compiled and not self.param_grads

    def eager_model(self) -> ScoreModel:
        # aot_autograd's backward is differentiable once, and its donated buffers refuse retain_graph=True.
        return self.model if self.compiled else self

    def extra_repr(self) -> str:
        return f"compile={self.compiled}, channels_last={self.channels_last}, param_grads={self.param_grads}"


def _check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def fast_score_model(model: ScoreModel, *, compile: bool = True, channels_last: bool = True,
                     param_grads: bool = False, cache_dir: str | os.PathLike | None = None) -> ScoreModel:
    """The fast path of a score model: its network compiled with inductor and run channels-last.

    Args:
        model: any ``ScoreModel`` (``dpf.load_score_model(...)``, or ``dpf.EpsModel(net, time_input=...)``).
        compile: ``torch.compile`` the network's ``eps`` (lazily: the first call of each kind compiles it).
        channels_last: convert the 4-D weights to channels-last, in place, as ``model.to(memory_format=
            torch.channels_last)`` does (the parameters stay the same objects), and feed the network channels-last
            inputs.
        param_grads: keep the weights differentiable through the compiled network, for ``purify(...,
            param_grads=True)``; off, gradients flow to the input only, and a forward plus input-VJP with grad is
            1.46x faster.
        cache_dir: the folder for inductor's compiled code; default: ``TORCHINDUCTOR_CACHE_DIR`` when set, else
            :func:`inductor_cache_dir`. Sets ``TORCHINDUCTOR_CACHE_DIR`` for the process.

    Returns:
        a :class:`FastScoreModel` sharing ``model``'s parameters (``model`` itself when both options are off).
        Outputs match the eager network's within float32 rounding (1e-5); every ``grad_mode`` works through it.
    """
    model = as_score_model(model)
    for name, v in (("compile", compile), ("channels_last", channels_last), ("param_grads", param_grads)):
        _check_bool(name, v)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected a path or None, got {type(cache_dir).__name__}")
    if isinstance(model, FastScoreModel):
        raise ValueError("model: is already a FastScoreModel; pass its .model to build another one")
    if not (compile or channels_last):
        return model
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return FastScoreModel(model, compile=compile, channels_last=channels_last, param_grads=param_grads,
                          cache_dir=cache_dir)
