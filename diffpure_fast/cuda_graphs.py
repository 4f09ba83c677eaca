"""CUDA graphs of a purification's reverse chain (``purify(..., cuda_graph=True)``).

A purification is hundreds of small kernel launches per step (a score network, then the fused step) repeated over
100-150 steps with the same shapes: at batch 1 on a GPU the host cannot queue them as fast as the GPU runs them. A
CUDA graph records every launch of the whole chain once and replays it with one call.

What is captured, per (chain, shape, dtype, device, seed, autocast, fused-step implementation, model weights):

* ``grad_mode`` "none" / "bpda": the whole chain, start state and every step's network call and fused step, in one
  graph. A call copies its input into the graph's static input (x in [-1, 1], and the (B,) noise ids), replays,
  and clones the static output out (the next replay overwrites it).
* "full" (unguided chains): the forward is the same whole-chain graph, which also copies every state x_k into a
  static (steps, B, C, H, W) buffer, cloned out for the backward pass. The backward replays one captured per-step
  graph ``v -> J_eps(x)^T v`` (network forward and VJP) with static x, t, level and v, once per step in reverse:
  t and the level are static tensors filled per step, so one capture serves every step of every chain of that
  shape. The step's own linear part ``g a + vjp b`` runs eagerly (two elementwise kernels).
* "surrogate": the whole-chain graph for the output and the "full" machinery on the surrogate DDPM chain.
* not captured (a ValueError from PurifyConfig): "adjoint" (Brownian bridges drawn on the host, step by step),
  guided chains (GDMP, MimicDiffusion, AGDM: their guidance runs autograd and host-side set-up inside each step),
  ``param_grads``, ``grad_cache_steps``, and caller-given noise (``forward_noise``/``increments``).

The seed is captured, not an input. The fused op takes ``seed`` and ``step`` as Python ints, which a capture bakes
into the recorded kernel arguments; making the seed a device tensor would change every kernel's signature. So a
graph belongs to one seed: ``cuda_graph=True`` needs an int seed (``Purifier(seed=...)``, or ``purify(...,
seed=...)``; each new seed captures a new graph). The noise ids *are* a static device input: a caller who wants
fresh noise per call without recapturing keeps the seed and passes new ``noise_ids`` (distinct ids in [0, 2^32)
give independent Philox streams; ids reused under the same seed reuse their noise).

Capture protocol (torch.cuda.graphs): the first call of a key runs the captured function once on a side stream
(warm-up: cuDNN/cuBLAS algorithm choice, Triton compilation, lazy initialisation, none of which may happen during
capture), captures it into a graph with its own memory pool, then replays. Each cached graph keeps its pool (one
step's activations, with their autograd graph for the VJP) until it is evicted (``MAX_GRAPHS_PER_MODEL`` per model,
least recently used first), the model is garbage-collected, or :func:`clear_cuda_graphs` runs.

Everything here also runs on CPU tensors with ``backend="emulate"``, where "capture" runs the function once and
"replay" runs it again, copying its results into the same static outputs: the tests check every buffer, key and
gradient path that way against the eager engine, without a GPU.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import ops
from .chain import Chain, Noise, solve_round, start_state
from .config import PurifyConfig
from .grad import GraphGuard
from .grad.discrete_adjoint import carry_into, history_cotangents
from .models.base import ScoreModel, network_vjp, with_autocast
from .solvers.base import Step

__all__ = ["BACKENDS", "MAX_GRAPHS_PER_MODEL", "ChainGraphs", "clear_cuda_graphs", "graph_count"]

BACKENDS = ("cuda", "emulate")
# Each graph holds its memory pool; 8 covers a few shapes (e.g. a batch and its last, smaller batch) and seeds of
# one evaluation without letting an attack loop over many seeds grow the GPU memory without bound.
MAX_GRAPHS_PER_MODEL = 8

# model -> {key: captured runner}, least recently used first. Weak keys: a model's graphs go with it. The runners
# reach the model through a weak reference, so the cache does not keep its own key alive.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_cuda_graphs(model: ScoreModel | None = None) -> None:
    """Drop the cached graphs (and so their memory pools) of ``model``, or of every model."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def graph_count(model: ScoreModel) -> int:
    """How many captured runners ``model`` has cached."""
    return len(_CACHE.get(model, ()))


def _fingerprint(model: ScoreModel) -> tuple:
    """Where the model's weights live: a graph reads them by address, so ``model.to(...)`` (new storage) must
    recapture, while in-place updates (``load_state_dict``, optimiser steps) are seen by the next replay."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def _copy_into(static, fresh) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    else:
        for s, f in zip(static, fresh):
            _copy_into(s, f)


# One side stream per device index for every warm-up and capture: cuBLAS keeps a workspace per stream it ran on, so a
# fresh stream per capture would leave one workspace behind per stream of torch's pool.
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture(fn: Callable, device: torch.device, warmup: int):
    """(graph, outputs): ``fn`` warmed up ``warmup`` times on a side stream of ``device``, then captured on that
    same stream.

    Warm-up on a side stream, as torch.cuda.graphs asks: lazy initialisation, cuDNN/cuBLAS workspace and algorithm
    choice and Triton's JIT happen there, not during capture. The capture is given that stream explicitly: without
    ``stream=``, ``torch.cuda.graph`` uses one class-wide capture stream created on the device that captured first,
    so a later capture for cuda:1 would run on cuda:0's stream."""
    with torch.cuda.device(device):
        index = torch.cuda.current_device()
        side = _SIDE_STREAMS.get(index)
        if side is None:
            side = _SIDE_STREAMS[index] = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            outputs = fn()
    return graph, outputs


class _Captured:
    """``fn()`` captured once and replayed: it reads static inputs it closes over, and ``outputs`` (what it
    returned at capture) are rewritten by every ``replay()``."""

    def __init__(self, fn: Callable, device: torch.device, backend: str, warmup: int = 1):
        self.fn, self.backend = fn, backend
        if backend == "emulate":
            with torch.no_grad():
                self.outputs = fn()
            return
        self.graph, self.outputs = _capture(fn, device, warmup)

    def replay(self):
        if self.backend == "emulate":
            fresh = self.fn()
            with torch.no_grad():
                _copy_into(self.outputs, fresh)
        else:
            self.graph.replay()
        return self.outputs


class _ChainRunner:
    """A whole chain captured from static inputs x (B, C, H, W) in [-1, 1] and ids (B,) int64; with keep_states,
    it also writes every state x_k into a static (steps, B, C, H, W) buffer."""

    def __init__(self, model: ScoreModel, autocast: str | None, chain: Chain, seed: int, like: torch.Tensor,
                 keep_states: bool, backend: str):
        # The body closes over these tensors, never over self: a runner -> captured -> body -> runner cycle would
        # keep an evicted or cleared graph (its memory pool, the states buffer) alive until the cycle collector ran.
        self.x = x = torch.zeros_like(like, memory_format=torch.contiguous_format)
        self.ids = torch.zeros(like.shape[0], dtype=torch.int64, device=like.device)
        self.states = states = (torch.zeros((len(chain), *like.shape), dtype=like.dtype, device=like.device)
                                if keep_states else None)
        model_ref = weakref.ref(model)
        noise = Noise(seed=seed, sample_ids=self.ids)

        def body():
            net = with_autocast(model_ref(), autocast)
            sink = None if states is None else _StateSink(states)
            with torch.no_grad():
                y = x
                for r, rnd in enumerate(chain.rounds):
                    y = solve_round(start_state(y, rnd, r, noise, x), net, rnd, noise, states=sink)
            return y

        self.captured = _Captured(body, like.device, backend)

    def run(self, x_in: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, states or None), both fresh tensors (cloned out of the static buffers)."""
        with torch.no_grad():
            self.x.copy_(x_in)
            self.ids.copy_(ids)
            y = self.captured.replay().clone()
            return y, None if self.states is None else self.states.clone()


class _StateSink:
    """Stands in for ``solve_round``'s states list: each appended state is copied into the static buffer."""

    def __init__(self, buf: torch.Tensor):
        self.buf, self.k = buf, 0

    def append(self, x: torch.Tensor) -> None:
        self.buf[self.k].copy_(x)
        self.k += 1


class _VJPRunner:
    """One step's ``J_eps(x)^T v`` captured with static x, t (B,), level (B,) and v: one capture, every step."""

    def __init__(self, model: ScoreModel, autocast: str | None, like: torch.Tensor, with_levels: bool,
                 backend: str):
        # Closes over the tensors, not over self (see _ChainRunner).
        self.x = x = torch.zeros_like(like, memory_format=torch.contiguous_format).requires_grad_(True)
        self.t = t = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
        self.levels = levels = (torch.zeros(like.shape[0], dtype=torch.int64, device=like.device) if with_levels
                                else None)
        self.v = v = torch.zeros_like(x, requires_grad=False)
        model_ref = weakref.ref(model)

        def body():
            net = with_autocast(model_ref(), autocast)
            with torch.enable_grad():
                (vjp,) = network_vjp(net, net.eps(x, t, levels), x, v)
            return vjp

        self.captured = _Captured(body, like.device, backend)

    def run(self, x: torch.Tensor, step: Step, v: torch.Tensor) -> torch.Tensor:
        """J_eps(x)^T v at the step's time. The result is the static output: use it before the next ``run``."""
        with torch.no_grad():
            self.x.copy_(x)
            # fill_ rounds the Python float to the dtype as model_eps's torch.full does: the same t, bit for bit.
            self.t.fill_(step.t)
            if self.levels is not None:
                self.levels.fill_(step.level)
            self.v.copy_(v)
        return self.captured.replay()


class ChainGraphs:
    """The captured runners of one model under one config: ``run`` (no graph) and ``differentiable``.

    model: the caller's ScoreModel (cached graphs are keyed on it); cfg: the PurifyConfig (its ``autocast`` is
    applied inside the captures); backend: "cuda" (tensors on a CUDA device) or "emulate" (tests, any device).
    """

    def __init__(self, model: ScoreModel, cfg: PurifyConfig, *, backend: str = "cuda"):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.model, self.cfg, self.backend = model, cfg, backend

    def _runner(self, key: tuple, make: Callable):
        graphs = _CACHE.setdefault(self.model, OrderedDict())
        key = (*key, self.cfg.autocast, self.backend, _fingerprint(self.model))
        runner = graphs.get(key)
        if runner is None:
            runner = graphs[key] = make()
            while len(graphs) > MAX_GRAPHS_PER_MODEL:
                graphs.popitem(last=False)
        graphs.move_to_end(key)
        return runner

    def _chain_runner(self, chain: Chain, noise: Noise, like: torch.Tensor, keep_states: bool) -> _ChainRunner:
        if chain.guidance is not None or noise.increments is not None or noise.forward is not None:
            raise ValueError("cuda_graph: captures unguided chains with counter noise only (no guidance, no "
                             "caller-given forward_noise or increments)")
        impl = ops.default_impl_name(like.device)  # the fused-step kernel a capture records
        key = ("chain", chain, tuple(like.shape), like.dtype, like.device, noise.seed, keep_states, impl)
        return self._runner(key, lambda: _ChainRunner(self.model, self.cfg.autocast, chain, noise.seed, like,
                                                      keep_states, self.backend))

    def vjp_runner(self, like: torch.Tensor, with_levels: bool) -> _VJPRunner:
        key = ("vjp", tuple(like.shape), like.dtype, like.device, with_levels)
        return self._runner(key, lambda: _VJPRunner(self.model, self.cfg.autocast, like, with_levels, self.backend))

    def run(self, x_in: torch.Tensor, chain: Chain, noise: Noise) -> torch.Tensor:
        """The chain from x_in (B, C, H, W) in [-1, 1], replayed; no autograd graph."""
        y, _ = self._chain_runner(chain, noise, x_in, False).run(x_in.detach(), noise.sample_ids)
        return y

    def differentiable(self, x_in: torch.Tensor, chain: Chain, noise: Noise, *, x_user: torch.Tensor) -> torch.Tensor:
        """The chain from x_in (B, C, H, W) in [-1, 1] with the backward pass of ``cfg.grad_mode``: "full" (exact,
        replayed per-step VJPs) or "surrogate"; x_user: the caller's tensor, watched for in-place changes."""
        guard = GraphGuard(**{"the input x": x_user, "a score-network parameter or buffer":
                              list(self.model.parameters()) + list(self.model.buffers())})
        mode = self.cfg.grad_mode
        if mode == "full":
            return GraphedChainAdjoint.apply(x_in, self, chain, noise, guard)
        if mode == "surrogate":
            out = self.run(x_in, chain, noise)
            sur_noise = Noise(seed=noise.seed, sample_ids=noise.sample_ids)
            sur = GraphedChainAdjoint.apply(x_in, self, self.cfg.surrogate_chain(x_in.dtype), sur_noise, guard)
            return out + (sur - sur.detach())
        raise ValueError(f"cuda_graph: no captured backward for grad_mode={mode!r}")


class GraphedChainAdjoint(torch.autograd.Function):
    """``ChainAdjoint`` (diffpure_fast.grad.discrete_adjoint) for unguided chains, replaying captured graphs: the
    forward is the whole-chain graph keeping its states, the backward one captured VJP per step.

    For each step, in reverse: g <- a_k g + b_k J_eps(x_k)^T g; into a round's start x_0 = s y + n z: g <- s g
    (zero for a round from pure noise). The same arithmetic as ChainAdjoint's unguided path, in the same order."""

    @staticmethod
    def forward(ctx, x_in, graphs: ChainGraphs, chain: Chain, noise: Noise, guard: GraphGuard):
        y, states = graphs._chain_runner(chain, noise, x_in, True).run(x_in.detach(), noise.sample_ids)
        ctx.graphs, ctx.chain, ctx.states, ctx.guard = graphs, chain, states, guard
        return y

    @staticmethod
    def backward(ctx, grad_out):
        ctx.guard.check("purify(grad_mode='full', cuda_graph=True) backward")
        chain, states = ctx.chain, ctx.states
        kinds = {s.level is not None for rnd in chain.rounds for s in rnd.plan.steps}
        if len(kinds) != 1:  # the capture either passes a level tensor to the network or not, for every step
            raise ValueError("cuda_graph: a chain whose steps mix discrete levels and continuous times")
        with_levels = kinds.pop()
        vjp = ctx.graphs.vjp_runner(states[0], with_levels)
        g = grad_out.contiguous()
        for rnd in reversed(chain.rounds):
            carry = None  # a multistep step's history term's share (ChainAdjoint's carry)
            for j in range(len(rnd.plan) - 1, -1, -1):
                k = rnd.first_step + j
                step = rnd.plan.steps[j]
                g_next = g
                if carry is None:
                    g = g * step.a + vjp.run(states[k], step, g) * step.b
                else:
                    g_eps, g_x = carry_into(carry, g * step.b, g * step.a)
                    g = g_x + vjp.run(states[k], step, g_eps)
                carry = history_cotangents(step, g_next)
            g = torch.zeros_like(g) if rnd.from_noise else g * rnd.start_scale
        return g, None, None, None, None
