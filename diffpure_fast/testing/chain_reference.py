"""The plain-autograd reference of a purification chain: the oracle of the exact adjoint (``grad_mode="full"``)."""

from __future__ import annotations

import torch

from ..chain import Noise, start_state, step_terms
from ..config import PurifyConfig

__all__ = ["autograd_chain"]


def autograd_chain(x: torch.Tensor, model, cfg: PurifyConfig, seed: int, *, keep_states: bool = False,
                   noise_ids: torch.Tensor | None = None):
    """cfg's chain on x (B, C, H, W) in [0, 1] with one autograd graph through every step (``create_graph=True``
    inside the guidance, so second-order terms are in it), noise ids ``noise_ids`` (default ``arange(B)``); returns
    the output in [0, 1],
    or (output, states) with keep_states: ``states[k]`` the state x_k in [-1, 1] before global step k, in the graph.
    Memory grows with the chain: tests only."""
    chain = cfg.chain(x.dtype)
    x_in = x * 2 - 1
    ids = torch.arange(x.shape[0], device=x.device) if noise_ids is None else noise_ids.to(x.device)
    noise = Noise(seed=seed, sample_ids=ids)
    y, states = x_in, []
    for r, rnd in enumerate(chain.rounds):
        xk = start_state(y, rnd, r, noise, x_in)
        if not xk.requires_grad:  # a round that starts from noise
            xk = xk.requires_grad_(True)
        prev = None
        for j, step in enumerate(rnd.plan.steps):
            k = rnd.first_step + j
            states.append(xk)
            eps, g = step_terms(model, chain.guidance, k, step, xk, x_in, noise, create_graph=True)
            xk, prev = noise.step(xk, eps, k, step, g, prev), (xk, eps)
        y = xk
    return ((y + 1) / 2, states) if keep_states else (y + 1) / 2
