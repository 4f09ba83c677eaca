"""PGD-EOT with batched EOT: the batched gradient against the looped one, losses, projections, seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffpure_fast as dpf
from diffpure_fast.attacks import DefendedClassifier, attack_loss, derive_seed, eot_gradient, eot_noise_ids, pgd_eot
from diffpure_fast.models.base import EpsModel


class ConvEpsNet(nn.Module):
    """Convolutions and elementwise ops only: exactly batch-invariant on the CPU (torch's Linear is not: its GEMM
    blocking depends on the batch size, which changes the last bits of a sample's result)."""

    def __init__(self, channels=3, hidden=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(hidden))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, labels):
        t = (labels.to(x.dtype) / 1000.0)[:, None, None, None]
        h = torch.nn.functional.silu(self.conv1(x) + self.scale[None, :, None, None] * torch.sin(3 * t))
        return self.conv2(h) + 0.1 * x


class ConvClassifier(nn.Module):
    """conv -> relu -> conv to K channels -> spatial mean: logits (B, K), batch-invariant."""

    def __init__(self, channels=3, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, k, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x - 0.5))).mean((2, 3)) * 5


def _defended(grad_mode):
    model = EpsModel(ConvEpsNet().eval(), time_input="continuous")
    kw = dict(dt=0.04) if grad_mode == "adjoint" else dict(steps=3, dt=None)
    return DefendedClassifier(dpf.Purifier(model, t_star=0.1, grad_mode=grad_mode, **kw), ConvClassifier().eval())


@pytest.fixture(autouse=True)
def _single_thread():
    # one thread: intra-op parallel reductions could otherwise split a sum differently between two runs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("grad_mode", ["full", "adjoint", "bpda", "surrogate"])
@pytest.mark.parametrize("eot_reduce", ["loss", "logits"])
def test_batched_eot_gradient_bit_identical_to_looped(grad_mode, eot_reduce):
    d = _defended(grad_mode)
    g = torch.Generator().manual_seed(1)
    x, y, ids = torch.rand(3, 3, 8, 8, generator=g), torch.tensor([0, 3, 4]), torch.tensor([5, 9, 2])
    looped = eot_gradient(d, x, y, ids, seed=7, eot=4, eot_reduce=eot_reduce, batched=False)
    # chunks of 5 split the 12 copies 5 + 5 + 2, across samples and copies; a chunk of 1 is left out: oneDNN runs a
    # batch-1 convolution with another kernel whose sums round differently (measured: 1e-8 differences)
    for chunk in (None, 5, 2):
        batched = eot_gradient(d, x, y, ids, seed=7, eot=4, eot_reduce=eot_reduce, chunk_size=chunk)
        for a, b in zip(batched, looped):
            assert torch.equal(a, b), (chunk, (a - b).abs().max())
    assert looped[0].abs().max() > 0  # a real gradient, not a vacuous equality of zeros


def test_batched_eot_with_linear_layers_matches_to_float_tolerance():
    # TinyEpsNet has Linear layers (not batch-invariant on CPU): equal to rounding only, documented in eot_gradient
    from diffpure_fast.testing.nets import tiny_score_model

    d = DefendedClassifier(dpf.Purifier(tiny_score_model(), t_star=0.1, steps=3, dt=None, grad_mode="full"),
                           ConvClassifier().eval())
    x, y, ids = torch.rand(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    a = eot_gradient(d, x, y, ids, seed=3, eot=3)[0]
    b = eot_gradient(d, x, y, ids, seed=3, eot=3, batched=False)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_eot_copies_use_distinct_noise():
    d = _defended("full")
    x = torch.rand(1, 3, 8, 8).repeat(2, 1, 1, 1)
    ids = eot_noise_ids(torch.tensor([4, 4]), 2)
    assert ids.tolist() == [8, 8, 9, 9]
    with torch.no_grad():
        out = d.purify(x.repeat(2, 1, 1, 1), seed=1, noise_ids=ids)
    assert torch.equal(out[0], out[1]) and not torch.allclose(out[0], out[2])
    with pytest.raises(ValueError, match="2\\^32"):
        eot_noise_ids(torch.tensor([1 << 30]), 8)


def test_losses_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(attack_loss(logits, y, "cw"), torch.tensor([1.0 - 3.0, 5.0 - 2.0]))
    torch.testing.assert_close(attack_loss(logits, y, "dlr"), torch.tensor([-2.0 / 3.0, 3.0 / 4.0]))
    ce = -torch.log_softmax(logits, 1)[[0, 1], [0, 1]]
    torch.testing.assert_close(attack_loss(logits, y, "ce"), ce)
    with pytest.raises(ValueError, match="loss"):
        attack_loss(logits, y, "hinge")


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_eot_stays_in_ball_and_raises_loss(norm, eps):
    d = _defended("full")
    g = torch.Generator().manual_seed(2)
    x, y, ids = torch.rand(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3]), torch.arange(4)
    res = pgd_eot(d, x, y, ids, eps=eps, steps=4, norm=norm, eot=2, restarts=2, seed=0,
                  step_size=eps / 2 if norm == "l2" else None)
    delta = (res.x_adv - x).flatten(1)
    bound = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(bound.max()) <= eps * (1 + 1e-6)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.pred_trace.shape == (2, 5, 4) and res.loss_trace.shape == (2, 5, 4)
    # the attack raises its EOT loss from the start to the end, on average over samples and restarts
    assert float(res.loss_trace[:, -1].mean()) > float(res.loss_trace[:, 0].mean())


def test_pgd_eot_independent_of_batch_composition():
    d = _defended("full")
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    ids = torch.tensor([10, 11, 12, 13])
    full = pgd_eot(d, x, y, ids, eps=0.05, steps=2, eot=2, seed=3)
    part = pgd_eot(d, x[2:], y[2:], ids[2:], eps=0.05, steps=2, eot=2, seed=3)
    assert torch.equal(full.x_adv[2:], part.x_adv)
    assert torch.equal(full.pred_trace[:, :, 2:], part.pred_trace)


def test_pgd_eot_bad_arguments_named():
    d = _defended("bpda")
    x, y, ids = torch.rand(1, 3, 8, 8), torch.tensor([0]), torch.tensor([0])
    for kw, name in ((dict(norm="l1"), "norm"), (dict(steps=-1), "steps"), (dict(eot=0), "eot"),
                     (dict(restarts=0), "restarts"), (dict(chunk_size=0), "chunk_size"), (dict(eps=-1.0), "eps")):
        args = dict(eps=0.1, steps=1) | kw
        with pytest.raises(ValueError, match=name):
            pgd_eot(d, x, y, ids, **args)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "attack", 0, 1) == derive_seed(0, "attack", 0, 1)
    assert len({derive_seed(0, "attack", 0, s) for s in range(100)}) == 100
    assert 0 <= derive_seed(123, "x") < 1 << 63
