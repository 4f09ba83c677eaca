"""Guided purification methods (GDMP, MimicDiffusion): the released updates transcribed independently, exact
gradients through the guidance against plain autograd, the detached and straight-through modes, batch invariance
and option errors."""

import ast
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffpure_fast as dpf
from diffpure_fast import conformance
from diffpure_fast.config import PurifyConfig
from diffpure_fast.methods.gdmp import STREAM_GUIDANCE
from diffpure_fast.noise import STREAM_FORWARD, STREAM_REVERSE, sample_noise
from diffpure_fast.schedule import DIFFPURE_SCHEDULE
from diffpure_fast.testing.chain_reference import autograd_chain
from diffpure_fast.testing.nets import GaussianEps, tiny_score_model

REL = {torch.float64: 1e-6, torch.float32: 1e-4}
SMALL = {
    "gdmp": dict(purify_step=4, max_iter=2),
    "gdmp_ssim": dict(purify_step=3, max_iter=2, guide_mode="ssim"),
    "mimic": dict(steps=10, guidance_window=(2, 8)),
}


def _method(key):
    return key.split("_")[0]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _levels_abar():
    betas = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def _eps(model, x, t, level):
    b = x.shape[0]
    return model.eps(x, torch.full((b,), t, dtype=x.dtype), torch.full((b,), level, dtype=torch.int64))


def gdmp_released(x, model, *, purify_step, max_iter, guide_scale, ptb, seed, norm_batch=None):
    """pytorch_diffusion's denoise with diff_purify's cond_fn, transcribed step by step (MSE guidance, fixedlarge
    variance, clipped x0), with the engine's counter noise in place of torch.randn_like."""
    betas, abar = _levels_abar()
    alphas = 1.0 - betas
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
    logvar = np.log(np.append(post_var[1], betas[1:]))
    ids = torch.arange(x.shape[0])
    x_adv = x * 2 - 1
    xt_reverse = x_adv
    for r in range(max_iter):
        a = abar[purify_step]
        xt = math.sqrt(a) * xt_reverse + math.sqrt(1 - a) * sample_noise(seed, ids, r, STREAM_FORWARD, x)
        for n, i in enumerate(reversed(range(purify_step))):
            k = r * purify_step + n
            with torch.enable_grad():
                x_in = xt.detach().requires_grad_(True)
                x_adv_t = math.sqrt(abar[i]) * x_adv + math.sqrt(1 - abar[i]) * sample_noise(seed, ids, k,
                                                                                            STREAM_GUIDANCE, x)
                if norm_batch is None:
                    selected = -F.mse_loss(x_in, x_adv_t)
                else:
                    selected = -((x_in - x_adv_t) ** 2).sum() / (norm_batch * x[0].numel())
                m = ptb * 2 / 255.0 / 3.0 / guide_scale
                scale = math.sqrt(1 - abar[i]) / (m * math.sqrt(abar[i]))
                cond = torch.autograd.grad(selected, x_in)[0] * scale
            eps = _eps(model, xt, float(np.float32((i + 1) / 1000)), i)
            pred = torch.clamp(math.sqrt(1 / abar[i]) * xt - math.sqrt(1 / abar[i] - 1) * eps, -1, 1)
            mean = coef1[i] * pred + coef2[i] * xt + math.exp(logvar[i]) * cond
            mask = 0.0 if i == 0 else 1.0
            xt = mean + mask * math.exp(0.5 * logvar[i]) * sample_noise(seed, ids, k, STREAM_REVERSE, x)
        xt_reverse = xt
    return (xt_reverse + 1) / 2


def mimic_released(x, model, *, steps, window, rho, seed, norm_batch=None):
    """PurificationForward_mimic.denoising_process (eta = 1) from pure noise, transcribed step by step."""
    _, abar = _levels_abar()
    skip = 1000 // steps
    seq = list(range(skip - 1, 1000, skip))
    ids = torch.arange(x.shape[0])
    ori_x = x * 2 - 1
    xt = sample_noise(seed, ids, 0, STREAM_FORWARD, x)
    up = torch.nn.Upsample(scale_factor=4)
    for count, (i, j) in enumerate(zip(reversed(seq), reversed([-1] + seq[:-1]))):
        at, an = abar[i], (abar[j] if j >= 0 else 1.0)
        et = _eps(model, xt, float(np.float32(i / 999)), i)
        x0_t = (xt - et * math.sqrt(1 - at)) / math.sqrt(at)
        c1 = math.sqrt((1 - at / an) * (1 - an) / (1 - at))
        c2 = math.sqrt(max(1 - an - c1 ** 2, 0.0))
        guidances = 0.0
        if window[0] <= count < window[1]:
            with torch.enable_grad():
                xg = xt.detach().requires_grad_(True)
                x0g = (xg - et.detach() * math.sqrt(1 - at)) / math.sqrt(at)
                if norm_batch is None:
                    measure_norm = torch.norm(x0g - ori_x, 1, 1).mean()
                    measure_super = torch.norm(up(x0g) - up(ori_x), 1, 1).mean()
                else:
                    hw = x.shape[2] * x.shape[3]
                    measure_norm = torch.norm(x0g - ori_x, 1, 1).sum() / (norm_batch * hw)
                    measure_super = torch.norm(up(x0g) - up(ori_x), 1, 1).sum() / (norm_batch * 16 * hw)
                ga = torch.autograd.grad(measure_norm, [xg], retain_graph=True)[0]
                gb = torch.autograd.grad(measure_super, [xg])[0]
            guidances = rho * math.sqrt(at) * ga + rho * math.sqrt(at) * gb
        z = sample_noise(seed, ids, count, STREAM_REVERSE, x)
        xt = math.sqrt(an) * x0_t + c1 * z + c2 * et - guidances
    return (xt + 1) / 2


@pytest.mark.parametrize("norm_batch", [None, 7])
def test_gdmp_matches_released_update(norm_batch):
    torch.manual_seed(0)
    model = tiny_score_model()
    x = torch.rand(3, 3, 6, 5)
    kw = dict(purify_step=6, max_iter=3, guide_scale=60000.0, ptb=8.0)
    ours = dpf.purify(x, model, method="gdmp", seed=4, norm_batch=norm_batch, **kw)
    ref = gdmp_released(x, model, seed=4, norm_batch=norm_batch, **kw)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("norm_batch", [None, 16])
def test_mimic_matches_released_update(norm_batch):
    torch.manual_seed(1)
    # The exact epsilon of Gaussian data: a chain from pure noise that stays in range (a random tiny network, not
    # being a denoiser, drives the 20-step chain from level 999 to |x| ~ 100, where float32 rounding is 1e-5).
    model = dpf.EpsModel(GaussianEps(DIFFPURE_SCHEDULE), time_input="unit")
    x = torch.rand(2, 3, 4, 5)
    ours = dpf.purify(x, model, method="mimic", seed=2, steps=20, guidance_window=(4, 18), rho=30.0,
                      norm_batch=norm_batch)
    ref = mimic_released(x, model, steps=20, window=(4, 18), rho=30.0, seed=2, norm_batch=norm_batch)
    assert ref.abs().max() < 2
    assert (ours - ref).abs().max().item() <= 1e-5


def test_mimic_default_window_is_released_freedom_strategy():
    opts = dpf.PurifyConfig.build("mimic").options
    assert opts.guidance_window == (21, 90) and opts.steps == 100 and opts.rho == 3000.0
    guidance = dpf.PurifyConfig.build("mimic").chain().guidance
    assert [k for k in range(100) if guidance.active(k)] == list(range(21, 90))


CASES = [("gdmp", "exact"), ("gdmp", "detached"), ("gdmp_ssim", "exact"), ("mimic", "straight_through"),
         ("mimic_eps", "straight_through")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("key,guidance_grad", CASES)
def test_full_matches_plain_autograd_through_guidance(key, guidance_grad, dtype):
    opts = dict(SMALL[_method(key)] if key != "gdmp_ssim" else SMALL[key])
    if key == "mimic_eps":
        opts["eps_in_guidance"] = True
    if _method(key) == "mimic":
        opts["rho"] = 5.0   # moderate guidance keeps the tiny chain in a well-conditioned range
    model = tiny_score_model(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 4, generator=g, dtype=dtype)
    w = torch.randn(2, 3, 5, 4, generator=g, dtype=dtype)
    cfg = PurifyConfig.build(_method(key), grad_mode="full", guidance_grad=guidance_grad, **opts)
    xg = x.clone().requires_grad_(True)
    out = dpf.purify(xg, model, method=_method(key), seed=3, grad_mode="full", guidance_grad=guidance_grad, **opts)
    (g_full,) = torch.autograd.grad((out * w).sum(), xg)
    xa = x.clone().requires_grad_(True)
    ref = autograd_chain(xa, model, cfg, seed=3)
    (g_auto,) = torch.autograd.grad((ref * w).sum(), xa)
    assert torch.allclose(out.detach(), ref.detach(), atol=1e-12 if dtype == torch.float64 else 1e-5)
    assert g_auto.abs().max() > 0
    assert rel_err(g_full, g_auto) <= REL[dtype]


def test_grad_cache_steps_and_param_grads_through_guidance():
    model = tiny_score_model(dtype=torch.float64)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    w = torch.randn_like(x)
    grads = []
    for cache in (0, 3, 100):
        xg = x.clone().requires_grad_(True)
        model.zero_grad()
        out = dpf.purify(xg, model, method="gdmp", seed=1, grad_mode="full", grad_cache_steps=cache,
                         param_grads=True, **SMALL["gdmp"])
        (out * w).sum().backward()
        grads.append((xg.grad.clone(), [p.grad.clone() for p in model.parameters()]))
    for gx, gp in grads[1:]:
        assert rel_err(gx, grads[0][0]) <= 1e-12
        assert all(rel_err(a, b) <= 1e-12 for a, b in zip(gp, grads[0][1]))
    # Parameter gradients against plain autograd through the same chain.
    model.zero_grad()
    cfg = PurifyConfig.build("gdmp", **SMALL["gdmp"])
    (autograd_chain(x, model, cfg, seed=1) * w).sum().backward()
    assert all(rel_err(a, p.grad) <= 1e-6 for a, p in zip(grads[0][1], model.parameters()))


def test_gradcheck_guided_chain_float64():
    model = tiny_score_model(channels=1, hidden=4, dtype=torch.float64)
    x = (torch.rand(2, 1, 3, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    for opts in (dict(purify_step=2, max_iter=2, guide_scale=2000.0),
                 dict(purify_step=2, max_iter=1, guide_mode="ssim", guide_scale=2000.0)):
        assert torch.autograd.gradcheck(
            lambda inp, o=opts: dpf.purify(inp, model, method="gdmp", seed=5, grad_mode="full", **o), (x,),
            eps=1e-6, atol=1e-5, rtol=1e-4)


def test_detached_guidance_differs_from_exact():
    model = tiny_score_model(dtype=torch.float64)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn_like(x)
    g = {}
    # norm_batch=1 and 10 levels: guidance strong enough on a 4x4 image to matter (at the default 36 levels the
    # detached gradient is ~0 next to the exact one, cosine ~1e-11, on this network).
    opts = dict(purify_step=10, max_iter=2, norm_batch=1)
    for mode in ("exact", "detached"):
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, method="gdmp", seed=0, grad_mode="full", guidance_grad=mode, **opts)
        g[mode] = torch.autograd.grad((out * w).sum(), xg)[0]
    # The guidance pulls every step toward the (noised) input: dropping its derivative loses a large part of the
    # gradient, while the chain's own path (through the start state) is kept.
    assert rel_err(g["detached"], g["exact"]) > 0.03
    cos = F.cosine_similarity(g["detached"].flatten(), g["exact"].flatten(), dim=0).item()
    assert 0.0 < cos < 0.999


@pytest.mark.parametrize("eps_in_guidance", [False, True])
def test_mimic_exact_gradient_is_zero_gradient_masking(eps_in_guidance):
    model = tiny_score_model(dtype=torch.float64)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    opts = dict(SMALL["mimic"], eps_in_guidance=eps_in_guidance)
    grads = {}
    for mode in ("exact", "detached", "straight_through"):
        out = dpf.purify(x, model, method="mimic", seed=0, grad_mode="full", guidance_grad=mode, **opts)
        grads[mode] = torch.autograd.grad(out.sum(), x)[0]
    # The input enters only through sign(x0 - ref): the exact (and the detached) input gradient is exactly zero.
    assert torch.count_nonzero(grads["exact"]) == 0
    assert torch.count_nonzero(grads["detached"]) == 0
    # The declared straight-through surrogate gives the attacker a signal.
    assert grads["straight_through"].abs().max() > 0


@pytest.mark.parametrize("method", ["gdmp", "mimic"])
def test_batch_invariance_and_released_batch_dependence(method):
    # An elementwise (exactly batch-invariant) network: a convolution's rounding may depend on the batch size.
    model = dpf.EpsModel(GaussianEps(DIFFPURE_SCHEDULE), time_input="unit")
    x = torch.rand(4, 3, 4, 4)
    opts = dict(SMALL[method])
    ids = torch.arange(4)
    full = dpf.purify(x, model, method=method, seed=9, noise_ids=ids, **opts)
    part = dpf.purify(x[2:3], model, method=method, seed=9, noise_ids=ids[2:3], **opts)
    assert torch.equal(full[2:3], part)
    # norm_batch=None is the released batch mean: a sample's result depends on its batch.
    full = dpf.purify(x, model, method=method, seed=9, noise_ids=ids, norm_batch=None, **opts)
    part = dpf.purify(x[2:3], model, method=method, seed=9, noise_ids=ids[2:3], norm_batch=None, **opts)
    assert (full[2:3] - part).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["gdmp", "mimic"])
def test_bpda_and_surrogate_work_for_guided_methods(method):
    model = tiny_score_model()
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    no_grad = dpf.purify(x.detach(), model, method=method, seed=1, **SMALL[method])
    for mode in ("bpda", "surrogate"):
        out = dpf.purify(x, model, method=method, seed=1, grad_mode=mode, surrogate_steps=3, **SMALL[method])
        # BPDA's straight-through x + (out - x) rounds differently from out: equal to float32 rounding.
        assert torch.allclose(out.detach(), no_grad, rtol=1e-6, atol=1e-5)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(g).all() and g.abs().max() > 0


def test_purifier_module_runs_guided_method():
    model = tiny_score_model()
    p = dpf.Purifier(model, method="gdmp", seed=0, **SMALL["gdmp"])
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(p(x), dpf.purify(x, model, method="gdmp", seed=0, **SMALL["gdmp"]))
    assert "method='gdmp'" in repr(p) and "purify_step=4" in repr(p)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "method: expected one of"),
    (dict(method="gdmp", t_star=0.1), "t_star: not an option of method='gdmp'"),
    (dict(method="diffpure", rho=3.0), "rho: not an option of method='diffpure'"),
    (dict(method="mimic", guidance_window=(5, 200)), "guidance_window"),
    (dict(method="mimic", steps=7, guidance_window=(0, 7)), "steps: expected a divisor"),
    (dict(method="gdmp", guide_mode="l2"), "guide_mode"),
    (dict(method="gdmp", guidance_grad="straight_through"), "guidance_grad: method='gdmp'"),
    (dict(method="diffpure", guidance_grad="detached"), "guidance_grad"),
    (dict(method="gdmp", grad_mode="adjoint"), "grad_mode: 'adjoint'"),
    (dict(method="gdmp", norm_batch=0), "norm_batch"),
])
def test_bad_method_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpf.purify(torch.rand(1, 3, 4, 4), tiny_score_model(), seed=0, **kwargs)


def test_given_noise_is_for_diffpure_only():
    with pytest.raises(ValueError, match="forward_noise: caller-given noise"):
        dpf.purify(torch.rand(1, 3, 4, 4), tiny_score_model(), method="gdmp", seed=0,
                   forward_noise=torch.zeros(1, 3, 4, 4), **SMALL["gdmp"])


VEC_DIR = Path(os.environ.get("DIFFPURE_FAST_CONFORMANCE_DIR",
                              Path(__file__).resolve().parents[2] / "shared" / "conformance"))
VECTORS = sorted(VEC_DIR.glob("*.pt")) if VEC_DIR.is_dir() else []


@pytest.mark.skipif(not VECTORS, reason=f"no conformance vectors in {VEC_DIR}")
@pytest.mark.parametrize("path", VECTORS, ids=[p.name for p in VECTORS])
def test_methods_run_on_official_networks(path, one_thread):
    """Every method on the official NCSN++ (continuous labels) and ADM (discrete steps, learned sigma) networks,
    loaded from the recorded official checkpoints: finite outputs and finite exact gradients through guidance."""
    vec = conformance.load_vector(str(path))
    family, key = conformance.KINDS[vec["kind"]]
    model = dpf.load_score_model(family, vec[key], vec["config"])
    x = ((vec["purify"]["x"][:1] + 1) / 2).clamp(0, 1).requires_grad_(True)
    for method, opts in (("gdmp", dict(purify_step=2, max_iter=1)),
                         ("mimic", dict(steps=2, guidance_window=(0, 2), rho=1.0)),
                         ("diffpure", dict(t_star=0.01, solver="ddpm", steps=2))):
        guidance_grad = "straight_through" if method == "mimic" else "exact"
        out = dpf.purify(x, model, method=method, seed=0, grad_mode="full", guidance_grad=guidance_grad, **opts)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(g).all(), method


LOWER_LAYERS = ("chain.py", "config.py", "cuda_graphs.py", "schedule.py", "noise.py", "grad", "methods", "ops",
                "models", "solvers")


def test_lower_layers_never_import_the_api():
    """Layers point down: nothing below the public API (engine.py) imports it, so there is no circle between the
    API and the gradient code."""
    root = Path(dpf.__file__).parent
    offenders = []
    for name in LOWER_LAYERS:
        for f in ([root / name] if name.endswith(".py") else sorted((root / name).rglob("*.py"))):
            for node in ast.walk(ast.parse(f.read_text())):
                mods = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                        [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(m.split(".")[-1] in ("engine", "cli", "demo") for m in mods):
                    offenders.append(f"{f.relative_to(root)} imports {mods}")
    assert not offenders, offenders
