"""DiffHammer (Wang, Fu, Han & Xiang, "DiffHammer: Rethinking the Robustness of Diffusion-Based Adversarial
Purification", NeurIPS 2024): a selective attack over N purification paths with gradient grafting, inside APGD.

At each iterate the defense purifies N copies (paths phi_i, fresh noise each). For each path the loss ``L_i`` and
its cheap gradient with respect to the *purified* image, ``g_i = d L_i / d phi_i`` (one classifier backward), are
taken; then (the paper's Algorithm 1, Eqs. 9-11):

* E-step: the paths that share a vulnerability. ``q_i = sigma(L_i + Delta^T g_i)`` with ``sigma(v) = sigmoid(lam v)``
  and ``Delta`` a step of the threat model's size along ``r = sum_i q_i g_i / sum_i q_i`` (``eps sign(r)`` for
  L-inf, ``eps r / ||r||`` for L2), iterated ``em_steps`` times from ``r`` = the plain mean of the ``g_i``;
* M-step: the aggregated purified-space gradient ``g~ = sum_i q_i g_i / sum_i q_i``;
* the representative path ``phi^ = argmax_j sum_i sigma(L_i + (eps u(g_j))^T g_i)`` (Eq. 11, ``u`` the same unit
  step), then gradient grafting: ``g~`` is back-propagated through ``phi^`` alone, ``d <phi^(x), g~> / d x``, with the
  purifier's own gradient (``grad_mode="full"``: the exact adjoint of the chain that ran). One full backward per
  iterate instead of N;
* the stepwise EM average ``G_t = t^-alpha g_t + (1 - t^-alpha) G_{t-1}`` (t = 1, 2, ...), which APGD then uses.

The defaults ``lam = 5``, ``em_steps = 5``, ``alpha = 0.5`` are the released code's (``attacker.py``; mission-anchors
§7); N is the EOT count. With N = 1 the weights normalise to 1 and the grafted gradient is the full gradient of that
one path (tested). Where ours differs from the released code, on purpose:

1. its EM loop runs once (the loop bound makes one pass), so ``q`` comes from the initial direction only; here the
   E-step iterates ``em_steps`` times;
2. its backward reuses the states stored on the defense's fine time grid with the coarse surrogate chain's
   coefficients (a grid mismatch DiffBreak App. D.1.5 measures at relative error ~1), and its GDMP guidance adds a
   scalar instead of a vector-Jacobian product; here the chosen path is recomputed and differentiated exactly as it
   ran, guidance included (``ChainAdjoint``).

Also ours (choices the paper leaves open): ``sigma`` is the same sigmoid in the E-step and in Eq. 11 (the released code
uses an ELU in the latter); the weights are normalised by their sum rather than by N (so the grafted gradient keeps
the scale of one path's gradient); the per-iterate prediction and loss are the EOT mean over the N paths.
"""

from __future__ import annotations

import torch

from .._validate import check_choice, check_int
from .apgd import GradientOracle
from .pgd import LOSSES, NORMS, TARGETED_LOSSES, _chunks, _copy_sum, attack_loss, eot_copies
from .randomness import attack_seed

__all__ = ["DIFFHAMMER_SETTINGS", "diffhammer_oracle", "em_weights", "graft_gradient", "representative_path"]

# The released code's settings (attacker.py, config.py): APGD with 3 restarts of 50 iterations, N = 10 paths,
# lambda 5, 5 EM steps, stepwise weight t^-0.5.
DIFFHAMMER_SETTINGS = {"steps": 50, "eot": 10, "restarts": 3, "lam": 5.0, "em_steps": 5, "alpha": 0.5}


def _unit_step(v: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A step of size eps along v (..., D) in the threat model's norm: eps sign(v) (L-inf) or eps v / ||v|| (L2)."""
    if norm == "linf":
        return eps * v.sign()
    return eps * v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def em_weights(losses: torch.Tensor, grads: torch.Tensor, *, eps: float, norm: str, lam: float = 5.0,
               em_steps: int = 5) -> torch.Tensor:
    """The E-step's path weights q (N, B) in (0, 1) (see the module docstring).

    losses: (N, B) the loss of each path; grads: (N, B, D) the gradient of each path's loss with respect to its
    purified image, flattened; eps, norm: the threat model's step."""
    q = torch.ones_like(losses)
    for _ in range(em_steps):
        r = (q[..., None] * grads).sum(0) / q.sum(0)[..., None]
        delta = _unit_step(r, norm, eps)
        q = torch.sigmoid(lam * (losses + (grads * delta[None]).sum(-1)))
    return q


def representative_path(losses: torch.Tensor, grads: torch.Tensor, *, eps: float, norm: str,
                        lam: float = 5.0) -> torch.Tensor:
    """Eq. 11: per sample, the path j (B,) int64 whose one-step attack ``eps u(g_j)`` raises the most paths' sigma.
    losses: (N, B); grads: (N, B, D)."""
    steps = _unit_step(grads, norm, eps)                       # (N_j, B, D)
    gain = torch.einsum("jbd,ibd->jib", steps, grads)          # (N_j, N_i, B): the step of j on path i
    return torch.sigmoid(lam * (losses[None] + gain)).sum(1).argmax(0)


def graft_gradient(defended, x: torch.Tensor, cotangent: torch.Tensor, *, seed: int,
                   noise_ids: torch.Tensor) -> torch.Tensor:
    """Gradient grafting: ``d <phi(x), cotangent> / d x`` (B, C, H, W) through one purification path per sample
    (purifier seed ``seed``, noise ids (B,)), with the purifier's gradient mode. cotangent: (B, C, H, W), a gradient
    with respect to the purified image."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = defended.purify(xg, seed=seed, noise_ids=noise_ids)
        return torch.autograd.grad(out, xg, grad_outputs=cotangent)[0]


def diffhammer_oracle(defended, y: torch.Tensor, sample_ids: torch.Tensor, *, seed: int, paths: int, eps: float,
                      norm: str = "linf", loss: str = "ce", target: torch.Tensor | None = None, lam: float = 5.0,
                      em_steps: int = 5, alpha: float = 0.5, noise_seed: int | None = None,
                      chunk_size: int | None = None) -> GradientOracle:
    """APGD's oracle for DiffHammer (see the module docstring): at iterate k the ``paths`` purifications use the
    purifier seed ``derive_seed(seed, "diffhammer", k)`` (or ``noise_seed``: fixed noise) and noise ids
    ``sample_ids[b] * paths + i``; the grafted backward reuses the chosen path's seed and id.

    Returns (the stepwise-averaged gradient (B, C, H, W), mean logits over the paths (B, K), mean loss (B,)).
    Cost per iterate: ``paths`` purifications without a graph and one with the gradient (against ``paths`` with the
    gradient for plain EOT)."""
    check_choice("loss", loss, LOSSES + TARGETED_LOSSES)
    check_choice("norm", norm, NORMS)
    paths, em_steps = check_int("paths", paths), check_int("em_steps", em_steps)
    y_rep, t_rep, ids = eot_copies(y, target, sample_ids, paths)
    state = {"avg": None}

    def oracle(x_k: torch.Tensor, k: int):
        b = x_k.shape[0]
        s = attack_seed(seed, noise_seed, "diffhammer", k)
        x_rep = x_k.detach().repeat(paths, 1, 1, 1)
        pur_grads = torch.empty_like(x_rep)
        logits_all, losses = [], []
        for c0, c1 in _chunks(paths * b, chunk_size):
            with torch.no_grad():
                pur = defended.purify(x_rep[c0:c1], seed=s, noise_ids=ids[c0:c1])
            pur.requires_grad_(True)
            with torch.enable_grad():
                logits = defended.classifier(pur)
                lv = attack_loss(logits, y_rep[c0:c1], loss, None if t_rep is None else t_rep[c0:c1])
                pur_grads[c0:c1] = torch.autograd.grad(lv.sum(), pur)[0]
            logits_all.append(logits.detach())
            losses.append(lv.detach())
        lv = torch.cat(losses).reshape(paths, b).double()
        g = pur_grads.reshape(paths, b, -1).double()
        q = em_weights(lv, g, eps=eps, norm=norm, lam=lam, em_steps=em_steps)
        g_tilde = ((q[..., None] * g).sum(0) / q.sum(0)[..., None]).to(x_k.dtype).reshape(x_k.shape)
        chosen = representative_path(lv, g, eps=eps, norm=norm, lam=lam).to(sample_ids.device)
        grad = graft_gradient(defended, x_k, g_tilde, seed=s, noise_ids=(sample_ids * paths + chosen).to(x_k.device))
        t = k + 1
        state["avg"] = grad if state["avg"] is None else t ** -alpha * grad + (1 - t ** -alpha) * state["avg"]
        return (state["avg"], _copy_sum(torch.cat(logits_all), paths) / paths,
                _copy_sum(torch.cat(losses), paths) / paths)

    return oracle
