"""The CPU fast path (``dpf.fast_score_model``, ``load_score_model(compile=, channels_last=)``): compiled and
channels-last outputs and gradients against the eager network, the inductor cache folder, option errors.

Everything compiles the tiny test network (two convolutions; a few seconds per graph on 2 cores) into a temporary
cache folder, so this file stays small in CI; the mid-size NCSN++ numbers are benchmarks/bench_fast.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.models.fast import CACHE_ENV, FastScoreModel, inductor_cache_dir
from diffpure_fast.testing.nets import tiny_score_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (2, 3, 8, 8)
# Float32 purification of the tiny net: compiled and eager kernels differ by rounding only (measured ~1e-7).
ATOL = 1e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        yield tmp_path_factory.mktemp("inductor")


@pytest.fixture(scope="module")
def fast(cache):
    return dpf.fast_score_model(tiny_score_model(), cache_dir=cache)


@pytest.fixture(scope="module")
def eager():
    return tiny_score_model()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_import_and_construction_compile_nothing(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        import diffpure_fast as dpf
        assert "torch._dynamo" not in sys.modules and "torch._inductor" not in sys.modules, "imported at import"
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
        from diffpure_fast.testing.nets import tiny_score_model
        fast = dpf.fast_score_model(tiny_score_model(), cache_dir=sys.argv[1])
        from torch._dynamo.utils import counters
        assert not counters["stats"], dict(counters["stats"])   # torch.compile is lazy: nothing traced yet
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == sys.argv[1]
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_outputs_match_eager(fast, eager):
    x = _x() * 2 - 1
    t = torch.full((SHAPE[0],), 0.3)
    with torch.no_grad():
        out, ref = fast.eps(x, t), eager.eps(x, t)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    with torch.no_grad():
        out = dpf.purify(_x(1), fast, seed=3, t_star=0.05)
    torch.testing.assert_close(out, dpf.purify(_x(1), eager, seed=3, t_star=0.05), rtol=0, atol=ATOL)


def test_channels_last_alone_matches_eager(eager):
    model = tiny_score_model()
    params = list(model.parameters())
    fast = dpf.fast_score_model(model, compile=False)
    assert list(fast.parameters()) == params                      # converted in place, the same Parameter objects
    assert model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = _x() * 2 - 1, torch.full((SHAPE[0],), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(fast.eps(x, t), eager.eps(x, t), rtol=0, atol=ATOL)
    assert dpf.fast_score_model(model, compile=False, channels_last=False) is model


@pytest.mark.parametrize("grad_mode", ["none", "full", "adjoint", "bpda", "surrogate"])
def test_gradients_match_eager(fast, eager, grad_mode):
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    grads, outs = [], []
    for model in (fast, eager):
        x = _x(2).requires_grad_(True)
        out = dpf.purify(x, model, seed=4, t_star=0.05, grad_mode=grad_mode)
        outs.append(out.detach())
        if grad_mode == "none":
            assert not out.requires_grad
            continue
        (g,) = torch.autograd.grad((out * w).sum(), x)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=ATOL)
    for g, ref in zip(grads[:1], grads[1:]):
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(g, ref, rtol=0, atol=ATOL * float(ref.abs().max()))


def test_weights_stay_live(cache):
    """No weight is baked into the compiled code: an in-place update (loading EMA weights, say) is seen."""
    fast = dpf.fast_score_model(tiny_score_model(), cache_dir=cache)
    x, t = _x() * 2 - 1, torch.full((SHAPE[0],), 0.3)
    with torch.no_grad():
        before = fast.eps(x, t)
        fast.model.net.conv2.bias.add_(1.0)
        torch.testing.assert_close(fast.eps(x, t), before + 1.0, rtol=0, atol=ATOL)


def test_guidance_through_the_network_runs_eagerly(fast, eager):
    """mimic with eps_in_guidance differentiates the network twice; gdmp's guidance does not contain it."""
    assert fast.eager_model() is fast.model and eager.eager_model() is eager
    # straight_through: the mimic gradient with respect to the input is zero under "exact" (a sign), not here.
    mimic = dict(method="mimic", steps=10, guidance_window=(2, 8), eps_in_guidance=True,
                 guidance_grad="straight_through")
    for opts in (mimic, dict(method="gdmp", purify_step=3, max_iter=2, guide_mode="ssim")):
        grads = []
        for model in (fast, eager):
            x = _x(3).requires_grad_(True)
            out = dpf.purify(x, model, seed=6, grad_mode="full", **opts)
            grads.append(torch.autograd.grad(out.sum(), x)[0])
        assert grads[1].abs().max() > 0, opts
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=ATOL * float(grads[1].abs().max()))

    # Without the fallback the compiled graph would be differentiated twice, which aot_autograd refuses.
    fast.eager_model = lambda: fast
    try:
        x = _x(3).requires_grad_(True)
        with pytest.raises(RuntimeError, match="retain_graph|double backward|create_graph"):
            torch.autograd.grad(dpf.purify(x, fast, seed=6, grad_mode="full", **mimic).sum(), x)
    finally:
        del fast.eager_model


def test_param_grads_needs_the_option(fast, cache):
    x = _x().requires_grad_(True)
    with pytest.raises(ValueError, match="param_grads"):
        dpf.purify(x, fast, seed=0, t_star=0.05, grad_mode="full", param_grads=True)
    eager = tiny_score_model()
    fast_p = dpf.fast_score_model(tiny_score_model(), param_grads=True, cache_dir=cache)
    grads = []
    for model in (fast_p, eager):
        out = dpf.purify(_x(), model, seed=0, t_star=0.02, grad_mode="full", param_grads=True)
        grads.append(torch.autograd.grad(out.sum(), list(model.parameters())))
    for g, ref in zip(*grads):
        torch.testing.assert_close(g.contiguous(), ref, rtol=1e-4, atol=ATOL * float(ref.abs().max()))


def test_cache_folder_choice(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert inductor_cache_dir() == tmp_path / "home" / ".cache" / "diffpure_fast" / "inductor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inductor_cache_dir() == tmp_path / "xdg" / "diffpure_fast" / "inductor"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")        # the XDG spec: relative paths are invalid
    assert inductor_cache_dir() == tmp_path / "home" / ".cache" / "diffpure_fast" / "inductor"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "own"))
    assert inductor_cache_dir() == tmp_path / "own" / "inductor"
    assert not (tmp_path / "own").exists()                            # reading the choice creates nothing

    # Set for the process when compiling, and only then; a user's TORCHINDUCTOR_CACHE_DIR wins unless cache_dir.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    dpf.fast_score_model(tiny_score_model(), compile=False)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    dpf.fast_score_model(tiny_score_model())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "own" / "inductor")
    assert (tmp_path / "own" / "inductor").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "user"))
    dpf.fast_score_model(tiny_score_model())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "user")
    dpf.fast_score_model(tiny_score_model(), cache_dir=tmp_path / "explicit")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "explicit")


_COMPILE_ONCE = textwrap.dedent("""
    import sys, torch
    import diffpure_fast as dpf
    from diffpure_fast.testing.nets import tiny_score_model
    from torch._dynamo.utils import counters
    fast = dpf.fast_score_model(tiny_score_model(hidden=12), cache_dir=sys.argv[1])
    with torch.no_grad():
        fast.eps(torch.zeros(1, 3, 8, 8), torch.full((1,), 0.5))
    print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
""")


def test_second_process_does_not_recompile(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, str(tmp_path)], capture_output=True, text=True,
                              env=env, timeout=300, check=False, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        runs.append(tuple(int(v) for v in proc.stdout.split()[-2:]))
    assert runs == [(0, 1), (1, 0)]                   # (hits, misses): compiled once, then loaded from the folder


def test_bad_options(fast, cache):
    model = tiny_score_model()
    for kw in (dict(compile="yes"), dict(channels_last=1), dict(param_grads=None)):
        with pytest.raises(TypeError, match=next(iter(kw))):
            dpf.fast_score_model(model, **kw)
    with pytest.raises(TypeError, match="cache_dir"):
        dpf.fast_score_model(model, cache_dir=3)
    with pytest.raises(TypeError, match="model"):
        dpf.fast_score_model(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="already"):
        dpf.fast_score_model(fast)
    with pytest.raises(TypeError, match="compile"):
        dpf.load_score_model("digits", compile=1)
    with pytest.raises(TypeError, match="channels_last"):
        dpf.load_score_model("digits", channels_last="no")


def test_load_score_model_options():
    model = dpf.load_score_model("digits", compile=False, channels_last=True)
    assert isinstance(model, FastScoreModel) and model.family == "digits" and not model.training
    assert not model.compiled and model.channels_last
    assert not isinstance(dpf.load_score_model("digits"), FastScoreModel)
