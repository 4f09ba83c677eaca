"""The LPIPS distance (networks from local files, a small network the project makes) and the unrestricted attacks
LF, PPGD and StAdv: their bounds hold on every returned sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffpure_fast as dpf
from diffpure_fast.attacks import DefendedClassifier
from diffpure_fast.attacks.perceptual import (
    LPIPS,
    AlexNetFeatures,
    SequentialFeatures,
    VGG16Features,
    load_lpips,
    lpips_project,
)
from diffpure_fast.attacks.unrestricted import flow_smoothness, lf_attack, ppgd_attack, stadv_attack, warp
from diffpure_fast.eval.datasets import load_data


def small_net() -> SequentialFeatures:
    """A two-layer conv net the test makes (fixed random weights)."""
    g = torch.Generator().manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return SequentialFeatures(trunk, (1, 3))


def test_lpips_formula_zero_and_symmetry():
    lp = LPIPS(small_net())
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(3, 1, 6, 6, generator=g), torch.rand(3, 1, 6, 6, generator=g)
    assert float(lp(x1, x1).abs().max()) == 0.0
    torch.testing.assert_close(lp(x1, x2), lp(x2, x1))
    # Laidlaw et al.'s normalize_flatten_features, written out: unit channel vectors / sqrt(H W), L2 over all layers
    want = torch.zeros(3)
    for f1, f2 in zip(lp.net(x1), lp.net(x2)):
        n1 = f1 / ((f1 ** 2).sum(1, keepdim=True).sqrt() + 1e-10) / (f1.shape[2] * f1.shape[3]) ** 0.5
        n2 = f2 / ((f2 ** 2).sum(1, keepdim=True).sqrt() + 1e-10) / (f2.shape[2] * f2.shape[3]) ** 0.5
        want += ((n1 - n2) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(lp(x1, x2), want.sqrt())
    assert not any(p.requires_grad for p in lp.parameters())


@pytest.mark.parametrize("kind, size", [("alexnet", 64), ("vgg16", 32)])
def test_lpips_networks_load_from_a_local_state_dict(tmp_path, kind, size):
    # torchvision's layout (features.N.*, classifier.* ignored), random weights saved by the test: nothing downloaded
    net = AlexNetFeatures() if kind == "alexnet" else VGG16Features()
    state = {f"features.{k}": v for k, v in net.trunk.state_dict().items()} | {"classifier.1.weight": torch.zeros(2)}
    torch.save(state, tmp_path / f"{kind}.pth")
    lp = load_lpips(f"{kind}:{tmp_path / f'{kind}.pth'}")
    x = torch.rand(2, 3, size, size)
    assert len(lp.net(x)) == 5
    torch.testing.assert_close(lp(x, x.flip(0)), LPIPS(net)(x, x.flip(0)))
    assert lp(x[:, :1], x[:, :1]).abs().max() == 0  # gray images are repeated to RGB
    del state["features.0.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="features.0.weight"):
        load_lpips(f"{kind}:{tmp_path / 'bad.pth'}")


def test_lpips_specs():
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_lpips("alexnet:/no/such/alexnet.pth")
    with pytest.raises(ValueError, match="lpips"):
        load_lpips("resnet")
    with pytest.raises(ValueError, match="cannot import"):
        load_lpips("no_such_module_xyz:f")
    lp = load_lpips("test_unrestricted:small_net")
    assert isinstance(lp.net, SequentialFeatures)
    digits = load_lpips("digits")
    x = torch.rand(2, 1, 16, 16)
    assert len(digits.net(x)) == 4 and float(digits(x, x).max()) == 0.0


def test_lpips_projection_meets_the_bound_as_measured():
    lp = LPIPS(small_net())
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 6, 6, generator=g)
    x_adv = (x + torch.randn(4, 1, 6, 6, generator=g)).clamp(0, 1)
    d = lp(x, x_adv)
    bound = float(d.median())
    out, dist, lam = lpips_project(lp, x, x_adv, bound)
    torch.testing.assert_close(lp(x, out), dist, rtol=0, atol=0)
    assert float(dist.max()) <= bound
    inside = d <= bound
    assert torch.equal(out[inside], x_adv[inside]) and bool((lam[inside] == 1).all())
    assert bool((lam[~inside] > 0).all()) and bool((lam[~inside] < 1).all())


def test_warp_and_flow_smoothness():
    x = torch.rand(2, 1, 5, 5)
    flow = torch.zeros(2, 5, 5, 2)
    torch.testing.assert_close(warp(x, flow), x)
    flow[0, 2, 2, 0] = 0.3   # one displaced pixel: 4 neighbouring pairs differ by 0.3
    torch.testing.assert_close(flow_smoothness(flow)[0], 4 * torch.tensor(0.09 + 1e-8).sqrt() + 36 * 1e-4)


@pytest.fixture(scope="module")
def digits():
    x, y = load_data("digits:test").get(list(range(6)))
    clf = dpf.load_classifier("digits")
    return x, y, DefendedClassifier(None, clf), load_lpips("digits")


@pytest.mark.parametrize("attack", ["lf", "ppgd", "stadv"])
def test_bounds_hold_on_every_returned_sample(digits, attack, one_thread):
    # On the undefended digits classifier (the bound does not depend on the defense; the harness tests run them
    # through the purifier): every returned sample within its bound, measured independently, and moved.
    x, y, d, lp = digits
    ids = torch.arange(6)
    if attack == "stadv":
        res = stadv_attack(d, x, y, ids, bound=0.05, steps=4, eot=1)
        assert float(res.measure.max()) <= 0.05
    else:
        fn, kw = (lf_attack, dict(step_size=0.05)) if attack == "lf" else (ppgd_attack, {})
        res = fn(d, x, y, ids, lpips=lp, bound=0.8, steps=4, eot=1, **kw)
        dist = lp(x, res.x_adv)
        torch.testing.assert_close(dist.double(), res.measure, rtol=1e-6, atol=1e-7)
        assert float(dist.max()) <= 0.8
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert bool(((res.x_adv - x).flatten(1).abs().amax(1) > 0).all())   # never the clean image
    assert res.pred_trace.shape == res.loss_trace.shape == (5, 6)
    # the returned iterate is the best of iterates 1..S by EOT loss
    best = res.loss_trace[1:].max(0).values
    assert bool((best >= res.loss_trace[1:]).all())


def test_unrestricted_bad_arguments_named(digits):
    x, y, d, lp = digits
    for fn, kw, name in ((stadv_attack, dict(bound=0.0, steps=1), "bound"), (stadv_attack, dict(bound=0.1, steps=0),
                         "steps"), (stadv_attack, dict(bound=0.1, steps=1, smoothness=-1.0), "smoothness"),
                         (lf_attack, dict(lpips=lp, bound=0.5, steps=1, step_size=0.1, factor=0), "factor"),
                         (ppgd_attack, dict(lpips=lp, bound=0.5, steps=1, eot=0), "eot")):
        with pytest.raises(ValueError, match=name):
            fn(d, x[:1], y[:1], torch.arange(1), **kw)
