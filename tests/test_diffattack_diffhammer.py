"""DiffAttack's gradient against plain autograd through the same chain, and DiffHammer's selection and grafting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import diffpure_fast as dpf
from diffpure_fast.attacks import DefendedClassifier
from diffpure_fast.attacks.diffattack import deviation_loss, diffattack_oracle
from diffpure_fast.attacks.diffhammer import diffhammer_oracle, em_weights, graft_gradient, representative_path
from diffpure_fast.attacks.pgd import attack_loss, eot_gradient
from diffpure_fast.attacks.randomness import derive_seed
from diffpure_fast.chain import Noise
from diffpure_fast.engine import Trajectory
from diffpure_fast.testing.chain_reference import autograd_chain
from diffpure_fast.testing.nets import tiny_score_model


@pytest.fixture(scope="module")
def tiny():
    """A float64 tiny score model and linear classifier on 3x4x4 images: exact arithmetic for gradient checks."""
    g = torch.Generator().manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).double()
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64, generator=g) * 0.8 + 0.1
    return tiny_score_model(dtype=torch.float64), clf.eval(), x, torch.tensor([0, 3, 4])


def _defended(model, clf, **opts):
    pur = dpf.Purifier(model, grad_mode="full", **(dict(t_star=0.1, steps=4, dt=None) | opts))
    return DefendedClassifier(pur, clf)


def test_deviation_loss_by_hand():
    x = torch.full((1, 1, 2, 2), 0.5)
    z = torch.ones(1, 1, 2, 2)
    s1, s2 = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    tr = Trajectory(output=x, states=[s1, s2], steps=(1, 2), alpha_bar=(0.64, 0.36), start_noise=[z, z], x_unit=x)
    # refs: 0.8 * 0.5 + 0.6 = 1.0 and 0.6 * 0.5 + 0.8 = 1.1; squared distances 1.0 and 0.81, mean over the states
    torch.testing.assert_close(deviation_loss(tr), torch.tensor([(1.0 + 0.81) / 2]))


def test_diffattack_gradient_equals_autograd_through_the_same_chain(tiny):
    # The oracle's gradient of L_cls + lambda L_dev (through the chain's states by the exact adjoint, 2 EOT copies)
    # against plain autograd through the same chain with the same noise (seed, ids), in float64.
    model, clf, x, y = tiny
    d = _defended(model, clf)
    ids = torch.tensor([5, 6, 7])
    oracle = diffattack_oracle(d, y, ids, seed=11, eot=2, loss="ce", dev_weight=0.7, dev_every=1)
    grad, logits, loss = oracle(x, 4)
    seed = derive_seed(11, "diffattack", 4)
    tr = d.trajectory(x, seed=seed, noise_ids=ids * 2, every=1)   # the states' marginals (constants)
    ref_grad, ref_loss = torch.zeros_like(x), torch.zeros(3, dtype=torch.float64)
    for j in range(2):
        xa = x.clone().requires_grad_(True)
        noise_ids = ids * 2 + j
        out, states = autograd_chain(xa, model, d.purifier.config, seed=seed, keep_states=True, noise_ids=noise_ids)
        z = Noise(seed=seed, sample_ids=noise_ids).start(0, x)
        dev = sum(((states[k] - ((2 * xa.detach() - 1) * math.sqrt(ab) + z * math.sqrt(1 - ab))) ** 2).mean((1, 2, 3))
                  for k, ab in zip(tr.steps, tr.alpha_bar)) / len(tr.steps)
        total = attack_loss(clf(out), y, "ce") + 0.7 * dev
        ref_grad += torch.autograd.grad(total.sum(), xa)[0] / 2
        ref_loss += total.detach() / 2
    assert tr.steps == (1, 2, 3)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-10
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    # the deviation term changes the gradient (it is not the classifier's alone)
    plain, _, _ = eot_gradient(d, x, y, ids, seed=seed, eot=2)
    assert ((grad - plain).norm() / plain.norm()).item() > 1e-3


def test_diffattack_needs_the_exact_adjoint(tiny):
    model, clf, x, y = tiny
    pur = dpf.Purifier(model, grad_mode="bpda", t_star=0.1, steps=2, dt=None)
    with pytest.raises(ValueError, match="grad_mode"):
        diffattack_oracle(DefendedClassifier(pur, clf), y, torch.arange(3), seed=0, eot=1)


def test_grafting_equals_the_full_backward_when_n_is_1(tiny):
    # N = 1: the EM weights normalise to 1, the only path is the representative, and the grafted gradient is that
    # path's full gradient (the stepwise average is the gradient itself at the first iterate).
    model, clf, x, y = tiny
    d = _defended(model, clf)
    ids = torch.tensor([2, 9, 4])
    grad, logits, loss = diffhammer_oracle(d, y, ids, seed=3, paths=1, eps=0.05, loss="cw")(x, 0)
    seed = derive_seed(3, "diffhammer", 0)
    full, full_logits, full_loss = eot_gradient(d, x, y, ids, seed=seed, eot=1, loss="cw")
    torch.testing.assert_close(grad, full, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0)
    # graft_gradient itself: <phi(x), c> differentiated through one path equals autograd through that path
    c = torch.randn_like(x)
    xa = x.clone().requires_grad_(True)
    out = autograd_chain(xa, model, d.purifier.config, seed=seed, noise_ids=ids)
    (want,) = torch.autograd.grad((out * c).sum(), xa)
    # autograd_chain returns [0, 1] images, as the Purifier does
    torch.testing.assert_close(graft_gradient(d, x, c, seed=seed, noise_ids=ids), want, rtol=1e-10, atol=1e-14)


def test_diffhammer_stepwise_average(tiny):
    model, clf, x, y = tiny
    d = _defended(model, clf, steps=2)
    ids = torch.arange(3)
    avg = diffhammer_oracle(d, y, ids, seed=1, paths=3, eps=0.05)
    raw = diffhammer_oracle(d, y, ids, seed=1, paths=3, eps=0.05, alpha=0.0)   # t^0 = 1: no averaging
    g0, _, _ = avg(x, 0)
    g1, _, _ = avg(x, 1)
    r1, _, _ = raw(x, 1)
    w = 2 ** -0.5
    torch.testing.assert_close(g1, w * r1 + (1 - w) * g0, rtol=1e-12, atol=1e-15)


def test_em_selects_the_paths_that_share_a_vulnerability():
    # 5 paths of one sample in 4 dimensions: three share the gradient direction e1, two point along -e1 + e2. The
    # E-step raises the weights of the majority and lowers the others'; the representative path is a majority one.
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    grads = torch.stack([e1, 1.1 * e1, 0.9 * e1, -e1 + e2, -e1 + 0.5 * e2]).double()[:, None, :]
    losses = torch.zeros(5, 1, dtype=torch.float64)
    q = em_weights(losses, grads, eps=0.5, norm="l2", lam=5.0, em_steps=5)
    assert q.shape == (5, 1)
    assert float(q[:3].min()) > 0.9 and float(q[3:].max()) < 0.3
    assert int(representative_path(losses, grads, eps=0.5, norm="l2")[0]) in (0, 1, 2)
    # with one EM pass from the plain mean (the released code's loop), the direction is far weaker on the minority
    q1 = em_weights(losses, grads, eps=0.5, norm="l2", em_steps=1)
    assert float(q1[3:].max()) > float(q[3:].max())


def test_diffhammer_bad_arguments_named(tiny):
    model, clf, x, y = tiny
    d = _defended(model, clf, steps=1)
    for kw, name in ((dict(paths=0), "paths"), (dict(em_steps=0), "em_steps"), (dict(loss="mse"), "loss"),
                     (dict(norm="l1"), "norm")):
        with pytest.raises(ValueError, match=name):
            diffhammer_oracle(d, y, torch.arange(3), **(dict(seed=0, paths=2, eps=0.1) | kw))
