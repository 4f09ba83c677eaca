"""DiffAttack (Kang, Song & Li, "DiffAttack: Evasion Attacks Against Diffusion-Based Adversarial Purification",
NeurIPS 2023, arXiv 2311.16124): APGD-EOT on ``L = L_cls + lambda L_dev``.

``L_dev`` is the paper's deviated-reconstruction loss (its Eq. 8), ``E_t[alpha(t) d(x_t, x'_t)]``: the distance
between the reverse chain's state ``x'_t`` and the forward-diffused input ``x_t`` at the same level, averaged over the
EOT draws, which pushes the reconstruction away from the input at intermediate steps, where the classifier's
gradient has not yet been diluted by the whole chain. The paper's settings (its App. D.2): APGD with 100
iterations x 20 EOT, ``lambda = 1.0``, ``alpha(t)`` the reciprocal of the number of chosen levels, levels sampled
uniformly over the chain; its code was never released (``kangmintong/DiffAttack`` holds a README only).

Our reading of what the paper leaves open (DiffBreak's implementation, ``DiffBreak/utils/losses.py``, reads it the
same way): ``d`` is the mean squared error per pixel; ``x_t = sqrt(abar_t) x_in + sqrt(1 - abar_t) z`` with the
attacked input ``x_in`` (the current iterate, in [-1, 1]) detached and ``z`` the start noise of the state's round (the
same draw the chain started from, so the two differ by the reconstruction alone); ``abar_t`` is the marginal of the
state's level (``chain.state_alpha_bar``); the levels are every ``dev_every``-th state of each round after its
start. The gradient flows through the chain's states by the exact adjoint, which returns them as outputs in the same
near-constant memory (``grad.discrete_adjoint.ChainAdjoint``, ``expose``): the paper's segment-wise
forwarding-backwarding, for every method the engine runs.
"""

from __future__ import annotations

import torch

from .._validate import OptionError, check_choice, check_float
from .apgd import GradientOracle
from .pgd import LOSSES, TARGETED_LOSSES, _chunks, _copy_sum, attack_loss, eot_copies
from .randomness import attack_seed

__all__ = ["DIFFATTACK_SETTINGS", "deviation_loss", "diffattack_oracle"]

# The paper's App. D.2: AutoAttack's APGD (100 iterations, 20 EOT) with lambda = 1.0 over every level.
DIFFATTACK_SETTINGS = {"steps": 100, "eot": 20, "dev_weight": 1.0, "dev_every": 1}


def deviation_loss(trajectory) -> torch.Tensor:
    """``L_dev`` (B,) of an ``engine.Trajectory``: the mean over its states of the mean squared distance between the
    state and the forward-diffused input at the state's level (see the module docstring); zero without states."""
    x_in = trajectory.x_unit.detach()
    if not trajectory.states:
        return torch.zeros(x_in.shape[0], dtype=x_in.dtype, device=x_in.device)
    total = 0.0
    for state, ab, z in zip(trajectory.states, trajectory.alpha_bar, trajectory.start_noise):
        ref = x_in * ab ** 0.5 + z * (1.0 - ab) ** 0.5
        total = total + (state - ref).square().flatten(1).mean(1)
    return total / len(trajectory.states)


def diffattack_oracle(defended, y: torch.Tensor, sample_ids: torch.Tensor, *, seed: int, eot: int, loss: str = "ce",
                      target: torch.Tensor | None = None, dev_weight: float = 1.0, dev_every: int = 1,
                      noise_seed: int | None = None, chunk_size: int | None = None) -> GradientOracle:
    """APGD's oracle for DiffAttack: at iterate k, the mean over ``eot`` purification draws of ``d L / d x`` with
    ``L = L_cls + dev_weight L_dev`` (batched as ``pgd.eot_gradient``: copy j of sample b has noise id
    ``sample_ids[b] * eot + j``, the purifier seed ``derive_seed(seed, "diffattack", k)`` or ``noise_seed``).

    Returns (grad (B, C, H, W), mean logits (B, K), mean L (B,)): the best iterate is the one of highest L, as in the
    paper's Algorithm 2. The defense must be a Purifier with grad_mode "full" (ValueError naming grad_mode
    otherwise). loss: ``"ce"``, ``"dlr"``, ``"cw"`` or a targeted loss with ``target`` (B,) int64.
    """
    check_choice("loss", loss, LOSSES + TARGETED_LOSSES)
    dev_weight = check_float("dev_weight", dev_weight, low=0.0)
    if defended.purifier is not None and defended.grad_mode != "full":
        raise OptionError("grad_mode", f"DiffAttack differentiates the chain's intermediate states, which needs the "
                                       f"exact adjoint (grad_mode='full'); the defense has "
                                       f"grad_mode={defended.grad_mode!r}")
    y_rep, t_rep, ids = eot_copies(y, target, sample_ids, eot)

    def oracle(x_k: torch.Tensor, k: int):
        b = x_k.shape[0]
        s = attack_seed(seed, noise_seed, "diffattack", k)
        x_rep = x_k.detach().repeat(eot, 1, 1, 1)
        grads = torch.empty_like(x_rep)
        logits_all, losses = [], []
        for c0, c1 in _chunks(eot * b, chunk_size):
            xc = x_rep[c0:c1].clone().requires_grad_(True)
            with torch.enable_grad():
                tr = defended.trajectory(xc, seed=s, noise_ids=ids[c0:c1], every=dev_every)
                logits = defended.classifier(tr.output)
                total = (attack_loss(logits, y_rep[c0:c1], loss, None if t_rep is None else t_rep[c0:c1])
                         + dev_weight * deviation_loss(tr))
                grads[c0:c1] = torch.autograd.grad(total.sum(), xc)[0]
            logits_all.append(logits.detach())
            losses.append(total.detach())
        return (_copy_sum(grads, eot) / eot, _copy_sum(torch.cat(logits_all), eot) / eot,
                _copy_sum(torch.cat(losses), eot) / eot)

    return oracle
