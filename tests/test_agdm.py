"""AGDM (adversarial guidance, a reconstruction): the guided step against a transcription of the formula, exact
gradients through the guidance against plain autograd, the detached mode, options and auxiliary-network errors,
and the auxiliary network's training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffpure_fast as dpf
from diffpure_fast.chain import Noise
from diffpure_fast.config import PurifyConfig
from diffpure_fast.data import load_digits_dataset
from diffpure_fast.models.auxiliary import AuxiliaryCNN, auxiliary_outputs
from diffpure_fast.noise import STREAM_FORWARD, STREAM_REVERSE, sample_noise
from diffpure_fast.testing.chain_reference import autograd_chain
from diffpure_fast.testing.nets import GaussianEps, TinyAuxNet, tiny_score_model
from diffpure_fast.train import AuxTrainConfig, init_auxiliary, noise_augment, train_auxiliary

REL = {torch.float64: 1e-6, torch.float32: 1e-4}
SHAPE = (2, 3, 5, 4)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_aux(dtype=torch.float64, **kw):
    return TinyAuxNet(**kw).to(dtype).eval()


def _opts(aux, **kw):
    # 6 DDPM steps from level 70 and a scale at which the guidance moves the tiny chain by O(0.1).
    return {"auxiliary": aux, "steps": 6, "scale": 400.0, **kw}


def agdm_transcribed(x, model, aux, *, t_star, steps, scale, seed, distance="feature_mse", label="adversarial"):
    """The guided ancestral DDPM step of the module docstring, written out from the discrete schedule with autograd
    for grad Phi only (aux_input="x_t", constant scale, auxiliary on [0, 1])."""
    betas = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    level = round(1000 * t_star)
    levels = [int(v) for v in np.round(np.linspace(level - 1, 0, steps))]
    ids = torch.arange(x.shape[0])
    ref = x * 2 - 1
    z0 = sample_noise(seed, ids, 0, STREAM_FORWARD, x)
    xt = ref * math.sqrt(abar[level - 1]) + z0 * math.sqrt(1 - abar[level - 1])

    def aux01(u):
        return aux((u + 1) / 2)

    for k, lk in enumerate(levels):
        ab = abar[lk]
        ab_next = abar[levels[k + 1]] if k + 1 < len(levels) else 1.0
        alpha = ab / ab_next
        var = (1 - alpha) * (1 - ab_next) / (1 - ab)
        t = torch.full((x.shape[0],), float(np.float32((lk + 1) / 1000)), dtype=x.dtype)
        eps = model.eps(xt, t, None)
        mu = (xt - (1 - alpha) / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)
        u = xt.detach().requires_grad_(True)
        with torch.enable_grad():
            f_u, l_u = aux01(u)
            f_r, l_r = aux01(ref)
            if distance == "feature_mse":
                d = (f_r - f_u).square().mean(1)
            elif distance == "logit_mse":
                d = (l_r - l_u).square().mean(1)
            else:
                p_r = F.softmax(l_r, 1)
                d = (p_r * (F.log_softmax(l_r, 1) - F.log_softmax(l_u, 1))).sum(1)
            phi = -d
            if label == "adversarial":
                phi = phi + F.log_softmax(l_u, 1).gather(1, l_r.argmax(1)[:, None])[:, 0]
            (grad,) = torch.autograd.grad(phi.sum(), u)
        z = sample_noise(seed, ids, k, STREAM_REVERSE, x)
        xt = mu + scale * var * grad + math.sqrt(var) * z
    return (xt + 1) / 2


@pytest.mark.parametrize("distance,label", [("feature_mse", "adversarial"), ("logit_mse", "none"),
                                            ("kl", "adversarial")])
def test_agdm_step_matches_transcribed_formula(distance, label):
    # A per-element exact epsilon network: no convolution rounding, so the transcription agrees to float64 rounding.
    model = dpf.EpsModel(GaussianEps(dpf.DIFFPURE_SCHEDULE), time_input="unit").double()
    aux = tiny_aux()
    x = torch.rand(*SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = dpf.purify(x, model, method="agdm", seed=4, distance=distance, label=label, **_opts(aux))
    ref = agdm_transcribed(x, model, aux, t_star=0.07, steps=6, scale=400.0, seed=4, distance=distance, label=label)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    unguided = dpf.purify(x, model, method="agdm", seed=4, auxiliary=aux, steps=6, scale=0.0)
    assert (out - unguided).abs().max() > 1e-3   # the guidance does move the chain


def test_scale_zero_is_diffpure_ddpm():
    model = tiny_score_model(dtype=torch.float64)
    x = torch.rand(*SHAPE, dtype=torch.float64)
    a = dpf.purify(x, model, method="agdm", seed=2, auxiliary=tiny_aux(), steps=6, scale=0.0)
    b = dpf.purify(x, model, method="diffpure", seed=2, solver="ddpm", t_star=0.07, steps=6, dt=None)
    assert torch.equal(a, b)


CASES = [dict(), dict(distance="kl"), dict(distance="logit_mse", label="current"), dict(aux_input="x0_hat"),
         dict(scale_schedule="noise", label="none")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("extra", CASES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_full_matches_plain_autograd_through_guidance(extra, dtype):
    model = tiny_score_model(dtype=dtype)
    aux = tiny_aux(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(*SHAPE, generator=g, dtype=dtype)
    w = torch.randn(*SHAPE, generator=g, dtype=dtype)
    opts = _opts(aux, **extra)
    xg = x.clone().requires_grad_(True)
    out = dpf.purify(xg, model, method="agdm", seed=3, grad_mode="full", **opts)
    (g_full,) = torch.autograd.grad((out * w).sum(), xg)
    xa = x.clone().requires_grad_(True)
    ref = autograd_chain(xa, model, PurifyConfig.build("agdm", **opts), seed=3)
    (g_auto,) = torch.autograd.grad((ref * w).sum(), xa)
    assert torch.allclose(out.detach(), ref.detach(), atol=1e-12 if dtype == torch.float64 else 1e-5)
    assert g_auto.abs().max() > 0
    assert rel_err(g_full, g_auto) <= REL[dtype]


def test_gradcheck_agdm_float64():
    model = tiny_score_model(channels=1, hidden=4, dtype=torch.float64)
    aux = tiny_aux(channels=1, pixels=9, features=3, classes=3)
    x = (torch.rand(2, 1, 3, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    for extra in (dict(), dict(distance="kl", aux_input="x0_hat")):
        assert torch.autograd.gradcheck(
            lambda inp, e=extra: dpf.purify(inp, model, method="agdm", seed=5, grad_mode="full",
                                            **_opts(aux, steps=3, **e)), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_exact_gradient_includes_the_path_through_the_reference():
    """x' (the attacked input) enters the guidance through c(x'): the exact gradient keeps that path, the detached
    one drops the whole guidance derivative."""
    model = tiny_score_model(dtype=torch.float64)
    aux = tiny_aux()
    x = torch.rand(*SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w = torch.randn_like(x)
    grads = {}
    for mode in ("exact", "detached"):
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, method="agdm", seed=0, grad_mode="full", guidance_grad=mode,
                         **_opts(aux, scale=2000.0))
        grads[mode] = torch.autograd.grad((out * w).sum(), xg)[0]
    # The detached gradient is the gradient of the chain with the guidance terms frozen at their values.
    cfg = PurifyConfig.build("agdm", guidance_grad="detached", **_opts(aux, scale=2000.0))
    xa = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((autograd_chain(xa, model, cfg, seed=0) * w).sum(), xa)
    assert rel_err(grads["detached"], g_ref) <= 1e-6
    assert rel_err(grads["detached"], grads["exact"]) > 0.01


def test_batch_invariance():
    model = dpf.EpsModel(GaussianEps(dpf.DIFFPURE_SCHEDULE), time_input="unit")
    aux = tiny_aux(torch.float32)
    x = torch.rand(4, *SHAPE[1:])
    ids = torch.arange(4)
    full = dpf.purify(x, model, method="agdm", seed=9, noise_ids=ids, **_opts(aux))
    part = dpf.purify(x[2:3], model, method="agdm", seed=9, noise_ids=ids[2:3], **_opts(aux))
    assert torch.allclose(full[2:3], part, atol=1e-6, rtol=0)


def test_bpda_and_surrogate_run():
    model = tiny_score_model()
    aux = tiny_aux(torch.float32)
    x = torch.rand(*SHAPE, requires_grad=True)
    for mode in ("bpda", "surrogate"):
        out = dpf.purify(x, model, method="agdm", seed=1, grad_mode=mode, surrogate_steps=3, **_opts(aux))
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(g).all() and g.abs().max() > 0


def test_feature_layer_adapts_a_plain_classifier():
    """A classifier returning logits only works as the auxiliary with feature_layer naming its latent layer, and
    gives the same guidance as the same network returning (features, logits)."""
    aux = tiny_aux()

    class LogitsOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[1]

    feats, logits = aux(torch.rand(*SHAPE, dtype=torch.float64))
    f2, l2 = auxiliary_outputs(LogitsOnly(aux).eval(), torch.rand(*SHAPE, dtype=torch.float64), "inner.feat")
    assert f2.shape == (2, 6) and l2.shape == logits.shape
    model = tiny_score_model(dtype=torch.float64)
    x = torch.rand(*SHAPE, dtype=torch.float64)
    # The pre-tanh output of inner.feat differs from the features: compare against a pair network reading the same
    # layer.
    a = dpf.purify(x, model, method="agdm", seed=0, feature_layer="inner.feat", **_opts(LogitsOnly(aux).eval()))
    b = dpf.purify(x, model, method="agdm", seed=0, feature_layer="feat", **_opts(aux))
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # Logits-only auxiliaries are fine for the logit distances without a feature layer.
    dpf.purify(x, model, method="agdm", seed=0, distance="kl", **_opts(LogitsOnly(aux).eval()))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(), TypeError, "auxiliary: method='agdm' needs the auxiliary network"),
    (dict(auxiliary="digits"), TypeError, "auxiliary: method='agdm' needs"),
    (dict(auxiliary=TinyAuxNet()), ValueError, "auxiliary: is in training mode"),
    (dict(auxiliary="eval", distance="l1"), ValueError, "distance: expected one of"),
    (dict(auxiliary="eval", label="true"), ValueError, "label: expected one of"),
    (dict(auxiliary="eval", aux_input="x0"), ValueError, "aux_input: expected one of"),
    (dict(auxiliary="eval", scale=-1.0), ValueError, "scale: expected a value >= 0"),
    (dict(auxiliary="eval", scale_schedule="cosine"), ValueError, "scale_schedule"),
    (dict(auxiliary="eval", steps=100), ValueError, "steps: at most 70 DDPM steps"),
    (dict(auxiliary="eval", aux_value_range=(1.0, 0.0)), ValueError, "aux_value_range"),
    (dict(auxiliary="eval", guidance_grad="straight_through"), ValueError, "guidance_grad: method='agdm'"),
    (dict(auxiliary="eval", t_star=0.5, rho=1.0), ValueError, "rho: not an option of method='agdm'"),
])
def test_bad_options_name_the_argument(kwargs, exc, match):
    if kwargs.get("auxiliary") == "eval":
        kwargs = dict(kwargs, auxiliary=tiny_aux(torch.float32))
    with pytest.raises(exc, match=match):
        dpf.purify(torch.rand(*SHAPE), tiny_score_model(), method="agdm", seed=0, **kwargs)


class _LogitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(60, 5)

    def forward(self, x):
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("aux,kwargs,match", [
    (TinyAuxNet(channels=1), dict(), r"auxiliary: the network failed on an input of shape \(2, 3, 5, 4\)"),
    (TinyAuxNet(pixels=9), dict(), r"auxiliary: the network failed on an input of shape"),
    (_LogitsNet(), dict(), r"expected a network returning \(features, logits\), got Tensor \(logits only\?\)"),
    (TinyAuxNet(), dict(feature_layer="nope"), "feature_layer: the auxiliary network has no submodule 'nope'"),
    (TinyAuxNet().double(), dict(), "auxiliary: the network failed"),
])
def test_mismatched_auxiliary_is_a_clear_error(aux, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpf.purify(torch.rand(*SHAPE), tiny_score_model(), method="agdm", seed=0, auxiliary=aux.eval(), **kwargs)


def test_purifier_and_description():
    aux = tiny_aux(torch.float32)
    p = dpf.Purifier(tiny_score_model(), method="agdm", seed=0, **_opts(aux))
    x = torch.rand(*SHAPE)
    assert torch.equal(p(x), dpf.purify(x, tiny_score_model(), method="agdm", seed=0, **_opts(aux)))
    assert "auxiliary=TinyAuxNet" in repr(p) and "scale=400.0" in repr(p)


def test_default_chain_is_70_ddpm_steps_from_t007():
    cfg = PurifyConfig.build("agdm", auxiliary=tiny_aux())
    (rnd,) = cfg.chain().rounds
    assert [s.level for s in rnd.plan.steps] == list(range(69, -1, -1))
    guidance = cfg.chain().guidance
    # The last step (to level -1) has no noise, so no variance: unguided.
    assert [guidance.active(k) for k in range(70)] == [True] * 69 + [False]


def test_shipped_auxiliary_loads_and_guides_the_digits_model():
    aux = dpf.load_auxiliary("digits")
    assert isinstance(aux, AuxiliaryCNN) and not aux.training
    assert all(not p.requires_grad for p in aux.parameters())
    x, _ = load_digits_dataset("test")
    x = x[:2]
    out = dpf.purify(x, dpf.load_score_model("digits"), method="agdm", auxiliary=aux, seed=0, steps=5)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="name: expected 'digits'"):
        dpf.load_auxiliary("cifar10")


# ---- training ----------------------------------------------------------------------------------------------------

def _tiny_train(seed=0, **kw):
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 10
    net = init_auxiliary(lambda: AuxiliaryCNN(resolution=8, channels=(4, 4), hidden=8), seed)
    cfg = AuxTrainConfig(epochs=2, batch=16, pgd_steps=2, noise_level=20, seed=seed, **kw)
    history = train_auxiliary(net, x, y, cfg)
    return net, history


def test_training_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, ha = _tiny_train()
    assert torch.equal(torch.random.get_rng_state(), state)
    b, hb = _tiny_train()
    assert ha == hb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c, _ = _tiny_train(seed=1)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert not a.training and len(ha) == 2 and {"loss", "ce", "robust"} <= set(ha[0])


def test_noise_augment_levels_and_fraction():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((2000, 1, 2, 2), 0.75)
    out = noise_augment(x, prob=0.25, levels=(0, 70), gen=gen)
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert abs(changed - 0.25) < 0.04
    # level 69 keeps sqrt(abar_69) of the signal: (2 * 0.75 - 1) * 0.9666.. on average
    out = noise_augment(torch.full((4000, 1, 4, 4), 0.75), prob=1.0, levels=(69, 70), gen=gen)
    ab = dpf.DIFFPURE_SCHEDULE.discrete_alpha_bar()[69].item()
    assert abs((2 * out - 1).mean().item() - 0.5 * math.sqrt(ab)) < 0.01


@pytest.mark.parametrize("kw,match", [(dict(distance="l2"), "distance"), (dict(noise_prob=2.0), "noise_prob"),
                                      (dict(epochs=0), "epochs")])
def test_bad_training_config(kw, match):
    with pytest.raises(ValueError, match=match):
        AuxTrainConfig(**kw)


def test_noise_is_not_drawn_twice():
    """AGDM draws no guidance noise of its own: its only noise is the chain's start and solver noise."""
    calls = []
    orig = Noise.draw

    def spy(self, step, stream, like):
        calls.append(stream)
        return orig(self, step, stream, like)

    Noise.draw = spy
    try:
        dpf.purify(torch.rand(*SHAPE), tiny_score_model(), method="agdm", seed=0, **_opts(tiny_aux(torch.float32)))
    finally:
        Noise.draw = orig
    assert calls == [STREAM_FORWARD]


# ---- command line and harness ------------------------------------------------------------------------------------

def test_cli_eval_agdm_exact_and_detached(tmp_path):
    """``eval --method agdm`` (shipped auxiliary) under exact and detached guidance gradients: the report names the
    gradient and the auxiliary network's fingerprint, and a different auxiliary is a different configuration."""
    import json

    from diffpure_fast.cli import main

    base = ["eval", "--method", "agdm", "--n-images", "2", "--batch-size", "2", "--steps", "2", "--attack-steps",
            "1", "--eot", "1", "--n-eval", "1", "--eps", "0.1", "--threads", "1", "--quiet"]
    for grad in ("exact", "detached"):
        out = tmp_path / grad
        assert main(base + ["--guidance-grad", grad, "--output", str(out)]) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["n_samples"] == 2
        assert ("exact through the guidance" if grad == "exact" else "guidance detached") in rep["gradient"]
        options = json.loads((out / "config.json").read_text())["defense"]["options"]
        assert options["auxiliary"].startswith("AuxiliaryCNN@") and options["t_star"] == 0.07


@pytest.mark.parametrize("argv,match", [
    (["--method", "gdmp", "--auxiliary", "digits"], "--auxiliary: an option of AGDM"),
    (["--method", "agdm", "--dt", "0.001"], "--dt: an option of DiffPure"),
    (["--method", "agdm", "--auxiliary", "nowhere.pt"],
     "auxiliary: 'nowhere.pt' is not a file, module:function or 'digits'"),
])
def test_cli_purify_agdm_option_errors(tmp_path, capsys, argv, match):
    from diffpure_fast.cli import main

    src = tmp_path / "x.npy"
    np.save(src, np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32))
    rc = main(["purify", "--model", "digits", "--input", str(src), "--output", str(tmp_path / "y.npy"),
               "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err, err
