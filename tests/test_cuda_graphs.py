"""cuda_graph=True: the captured chain and per-step VJP against the eager engine.

Without a GPU the capture machinery runs with ``backend="emulate"`` (capture runs the function once, replay runs it
again into the same static outputs): every static buffer, cache key and gradient path is checked bit for bit against
the eager engine on CPU. The tests marked ``cuda`` capture real CUDA graphs and compare them with the eager CUDA
engine (bit for bit) and with the CPU reference (to the kernels' noise tolerance).
"""

import contextlib
import functools
import gc
import weakref

import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast import cuda_graphs, engine, ops
from diffpure_fast.chain import run_chain
from diffpure_fast.engine import Noise
from diffpure_fast.grad import differentiable_chain
from diffpure_fast.models.base import with_autocast
from diffpure_fast.testing.nets import tiny_score_model

# Few steps keep the CPU tests fast (the tiny network makes each step cheap, the step count sets the time).
PLANS = {"euler": dict(t_star=0.05, steps=5), "ddpm": dict(t_star=0.05, solver="ddpm", steps=4),
         "ode": dict(diffusion_type="ode", t_star=0.005),
         "celebahq": dict(diffusion_type="celebahq-ddpm", t_star=0.004),
         # solvers whose steps have a history term (the captured backward carries it as ChainAdjoint does)
         "dpm-solver++": dict(t_star=0.05, solver="dpm-solver++", steps=4),
         "heun": dict(t_star=0.05, solver="heun", steps=4)}
FAST = PLANS["euler"]


@pytest.fixture(autouse=True)
def _fresh_cache():
    cuda_graphs.clear_cuda_graphs()
    yield
    cuda_graphs.clear_cuda_graphs()


@pytest.fixture
def emulated(monkeypatch):
    """The engine's cuda_graph path on CPU tensors, through the emulated backend."""
    monkeypatch.setattr(engine, "ChainGraphs", functools.partial(cuda_graphs.ChainGraphs, backend="emulate"))
    monkeypatch.setattr(engine, "_check_cuda_graph_call", lambda *args: None)


def _graphs(model, dtype=torch.float32, **kw):
    cfg = dpf.PurifyConfig.build(value_range=(-1, 1), cuda_graph=True, **kw)
    return cfg, cfg.chain(dtype), cuda_graphs.ChainGraphs(model, cfg, backend="emulate")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_captured_chain_equals_eager_bitwise(plan, dtype):
    model = tiny_score_model(dtype=dtype)
    _, chain, graphs = _graphs(model, dtype, **PLANS[plan])
    x = torch.rand(3, 3, 6, 5, dtype=dtype) * 2 - 1
    ids = torch.tensor([5, 0, 9])
    got = graphs.run(x, chain, Noise(seed=11, sample_ids=ids))
    want = dpf.purify(x, model, seed=11, noise_ids=ids, value_range=(-1, 1), **PLANS[plan])
    assert torch.equal(got, want)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_captured_full_gradient_equals_eager_bitwise(plan):
    model = tiny_score_model(dtype=torch.float64)
    _, chain, graphs = _graphs(model, torch.float64, grad_mode="full", **PLANS[plan])
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64) * 2 - 1
    w = torch.randn(x.shape, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = graphs.differentiable(xg, chain, Noise(seed=4, sample_ids=torch.arange(2)), x_user=xg)
    (got,) = torch.autograd.grad((out * w).sum(), xg)
    xe = x.clone().requires_grad_(True)
    out_e = dpf.purify(xe, model, seed=4, value_range=(-1, 1), grad_mode="full", **PLANS[plan])
    (want,) = torch.autograd.grad((out_e * w).sum(), xe)
    assert torch.equal(out, out_e) and torch.equal(got, want)


@pytest.mark.parametrize("grad_mode", ["none", "bpda", "full", "surrogate"])
def test_engine_cuda_graph_path_equals_eager(emulated, grad_mode):
    """purify(cuda_graph=True) through the engine (value range mapping, BPDA, surrogate) equals cuda_graph=False."""
    model = tiny_score_model()
    x = torch.rand(2, 3, 6, 5)
    w = torch.randn(x.shape)
    results = []
    for cuda_graph in (False, True):
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, seed=2, **FAST, grad_mode=grad_mode, surrogate_steps=3,
                         cuda_graph=cuda_graph)
        grad = None if grad_mode == "none" else torch.autograd.grad((out * w).sum(), xg)[0]
        results.append((out.detach(), grad))
    assert torch.equal(results[0][0], results[1][0])
    assert grad_mode == "none" or torch.equal(results[0][1], results[1][1])
    assert cuda_graphs.graph_count(model) > 0


def test_purifier_cuda_graph_path_with_autocast(emulated):
    model = tiny_score_model()
    x = torch.rand(2, 3, 6, 5)
    eager = dpf.Purifier(model, seed=3, **FAST, autocast="bf16")(x)
    graphed = dpf.Purifier(model, seed=3, **FAST, autocast="bf16", cuda_graph=True)
    assert torch.equal(graphed(x), eager)
    assert "cuda_graph=True" in repr(graphed) and "bf16" in repr(graphed)


def test_replays_read_new_inputs_and_ids_without_recapturing():
    model = tiny_score_model()
    _, chain, graphs = _graphs(model, **FAST)
    outs = []
    for i in range(3):
        x = torch.rand(2, 3, 6, 5) * 2 - 1
        ids = torch.tensor([2 * i, 2 * i + 1])
        out = graphs.run(x, chain, Noise(seed=1, sample_ids=ids))
        assert torch.equal(out, dpf.purify(x, model, seed=1, noise_ids=ids, value_range=(-1, 1), **FAST))
        outs.append(out)
    assert cuda_graphs.graph_count(model) == 1
    # Outputs are cloned out of the static buffer: an earlier result is not overwritten by later replays.
    assert not torch.equal(outs[0], outs[1])


def test_one_graph_per_seed_and_shape_bounded_cache():
    model = tiny_score_model()
    _, chain, graphs = _graphs(model, **FAST)
    x = torch.rand(2, 3, 6, 5) * 2 - 1
    ids = torch.arange(2)
    graphs.run(x, chain, Noise(seed=0, sample_ids=ids))
    graphs.run(x[:1], chain, Noise(seed=0, sample_ids=ids[:1]))
    assert cuda_graphs.graph_count(model) == 2
    for seed in range(1, 2 * cuda_graphs.MAX_GRAPHS_PER_MODEL):
        graphs.run(x, chain, Noise(seed=seed, sample_ids=ids))
    assert cuda_graphs.graph_count(model) == cuda_graphs.MAX_GRAPHS_PER_MODEL
    cuda_graphs.clear_cuda_graphs(model)
    assert cuda_graphs.graph_count(model) == 0


def test_new_weight_storage_recaptures_and_in_place_updates_do_not():
    model = tiny_score_model()
    _, chain, graphs = _graphs(model, **FAST)
    x = torch.rand(2, 3, 6, 5) * 2 - 1
    noise = Noise(seed=0, sample_ids=torch.arange(2))
    graphs.run(x, chain, noise)
    p = next(model.parameters())
    with torch.no_grad():
        p.mul_(1.01)  # same storage: a real graph reads the new values on its next replay
    graphs.run(x, chain, noise)
    assert cuda_graphs.graph_count(model) == 1
    p.data = p.data.clone()  # what model.to(device) does: the captured addresses are stale
    graphs.run(x, chain, noise)
    assert cuda_graphs.graph_count(model) == 2


def test_backward_after_later_forwards_uses_its_own_states():
    """Each forward clones its states out of the static buffer: a backward after more forwards is still exact."""
    model = tiny_score_model(dtype=torch.float64)
    _, chain, graphs = _graphs(model, torch.float64, grad_mode="full", **FAST)
    noise = Noise(seed=4, sample_ids=torch.arange(2))
    x1 = (torch.rand(2, 3, 6, 5, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    out1 = graphs.differentiable(x1, chain, noise, x_user=x1)
    x2 = (torch.rand(2, 3, 6, 5, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    graphs.differentiable(x2, chain, noise, x_user=x2).sum().backward()
    (got,) = torch.autograd.grad(out1.sum(), x1)
    xe = x1.detach().clone().requires_grad_(True)
    out_e = dpf.purify(xe, model, seed=4, value_range=(-1, 1), grad_mode="full", **FAST)
    (want,) = torch.autograd.grad(out_e.sum(), xe)
    assert torch.equal(got, want)


def test_in_place_change_before_backward_is_an_error():
    model = tiny_score_model()
    _, chain, graphs = _graphs(model, grad_mode="full", **FAST)
    x = (torch.rand(2, 3, 6, 5) * 2 - 1).requires_grad_(True)
    out = graphs.differentiable(x, chain, Noise(seed=4, sample_ids=torch.arange(2)), x_user=x)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_model_is_not_kept_alive_by_its_graphs():
    model = tiny_score_model()
    _, chain, graphs = _graphs(model, **FAST)
    graphs.run(torch.zeros(1, 3, 6, 5), chain, Noise(seed=0, sample_ids=torch.arange(1)))
    ref = weakref.ref(model)
    del model, graphs
    gc.collect()
    assert ref() is None


@pytest.fixture
def no_cycle_collector():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_cleared_and_evicted_runners_are_freed_without_the_cycle_collector(no_cycle_collector):
    """A runner (its graph, memory pool and static buffers) is freed as soon as the cache drops it: nothing in it
    refers back to it, so reference counting alone frees it."""
    model = tiny_score_model()
    _, chain, graphs = _graphs(model, grad_mode="full", **FAST)
    x = torch.zeros(2, 3, 6, 5)
    graphs.run(x, chain, Noise(seed=0, sample_ids=torch.arange(2)))
    graphs.vjp_runner(x, with_levels=False)
    runners = [weakref.ref(r) for r in cuda_graphs._CACHE[model].values()]
    assert len(runners) == 2
    cuda_graphs.clear_cuda_graphs(model)
    assert [r() for r in runners] == [None, None]
    graphs.run(x, chain, Noise(seed=0, sample_ids=torch.arange(2)))
    (first,) = (weakref.ref(r) for r in cuda_graphs._CACHE[model].values())
    for seed in range(1, cuda_graphs.MAX_GRAPHS_PER_MODEL + 1):
        graphs.run(x, chain, Noise(seed=seed, sample_ids=torch.arange(2)))
    assert first() is None  # evicted, least recently used
    runners = [weakref.ref(r) for r in cuda_graphs._CACHE[model].values()]
    cuda_graphs.clear_cuda_graphs()  # every model's
    assert len(runners) == cuda_graphs.MAX_GRAPHS_PER_MODEL and all(r() is None for r in runners)


def test_capture_runs_on_the_warm_up_stream(monkeypatch):
    """The capture is given its side stream explicitly (torch.cuda.graph's default capture stream is created once,
    on whichever GPU captured first): checked on CPU with stand-ins for torch.cuda's stream and graph objects."""
    class Stream:
        def wait_stream(self, other):
            pass

    current, seen = [Stream()], {}

    @contextlib.contextmanager
    def on_stream(stream):
        before, current[0] = current[0], stream
        yield
        current[0] = before

    def graph(cuda_graph, stream=None, **kw):
        seen["graph stream"] = stream
        return on_stream(stream)

    calls = []
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current[0])
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: d.index)
    monkeypatch.setattr(cuda_graphs, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    for d in (torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 1)):
        calls.clear()
        _, out = cuda_graphs._capture(lambda: calls.append(current[0]) or "out", d, warmup=2)
        side = seen["graph stream"]
        assert isinstance(side, Stream) and calls == [side, side, side] and out == "out"
        assert cuda_graphs._SIDE_STREAMS[d.index] is side  # one side stream per device, reused
    assert len(cuda_graphs._SIDE_STREAMS) == 2


@pytest.mark.parametrize("kw, match", [
    (dict(cuda_graph=True, **FAST), "needs CUDA tensors"),
    (dict(cuda_graph=True, t_star=0.05, grad_mode="adjoint"), "cuda_graph: serves grad_mode"),
    (dict(cuda_graph=True, method="gdmp", purify_step=2, max_iter=1), "chains without a per-step term only"),
    (dict(cuda_graph=True, diffusion_type="ldsde", t_star=0.02), "chains without a per-step term only"),
    (dict(cuda_graph=True, **FAST, grad_mode="full", param_grads=True), "param_grads"),
    (dict(cuda_graph=True, **FAST, grad_mode="full", grad_cache_steps=2), "grad_cache_steps"),
    (dict(cuda_graph=1, **FAST), "cuda_graph: expected a bool"),
])
def test_cuda_graph_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dpf.purify(torch.rand(1, 3, 6, 5), tiny_score_model(), seed=0, **kw)


def test_cuda_graph_needs_an_int_seed(emulated):
    model = tiny_score_model()
    with pytest.raises(ValueError, match="needs an int seed"):
        dpf.purify(torch.rand(1, 3, 6, 5), model, **FAST, cuda_graph=True)
    with pytest.raises(ValueError, match="needs an int seed"):
        dpf.Purifier(model, **FAST, cuda_graph=True)


def test_caller_given_noise_is_refused():
    model = tiny_score_model()
    _, chain, graphs = _graphs(model, **FAST)
    x = torch.zeros(1, 3, 6, 5)
    with pytest.raises(ValueError, match="caller-given"):
        graphs.run(x, chain, Noise(seed=0, sample_ids=torch.arange(1), forward=x))
    with pytest.raises(ValueError, match="caller-given forward_noise"):
        engine._check_cuda_graph_call(_FakeCuda(), x, None)


class _FakeCuda:
    """Stands in for a CUDA tensor where only its device is read."""

    device = torch.device("cuda")


# ------------------------------------------------------------------------------------------------------------------
# Real CUDA graphs (skip without a GPU).


@pytest.fixture
def exact_cuda():
    """TF32 off: the comparisons with the CPU reference need float32 convolutions and matmuls."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _gpu_impls():
    return [pytest.param("cuda", marks=pytest.mark.cuda),
            pytest.param("triton", marks=[pytest.mark.cuda, pytest.mark.triton]),
            pytest.param("reference", marks=pytest.mark.cuda)]


@pytest.fixture
def forced():
    """forced(name): every fused step runs implementation ``name`` (ops.force_impl) until the test ends. (Setting
    DIFFPURE_FAST_IMPL inside a test does nothing: it is read once, at import.)"""
    previous = []

    def force(name):
        previous.append(ops.force_impl(name))

    yield force
    if previous:
        ops.force_impl(previous[0])


@pytest.mark.parametrize("impl", _gpu_impls())
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_cuda_purify_matches_cpu_reference(exact_cuda, forced, impl, plan):
    """Every GPU path (eager with each fused-step implementation, and its CUDA graph: Triton's kernels inside a
    captured graph too) against the CPU reference; the captured graph against eager on the same implementation, bit
    for bit."""
    if not ops.available(impl):
        pytest.skip(f"{impl} is not available")
    model = tiny_score_model()
    x = torch.rand(3, 3, 6, 5)
    kw = dict(seed=5, **PLANS[plan])
    forced("reference")
    ref = dpf.purify(x, model, **kw)
    forced(impl)
    assert ops.default_impl_name(exact_cuda) == impl
    model_gpu = tiny_score_model().to(exact_cuda)
    eager = dpf.purify(x.to(exact_cuda), model_gpu, **kw)
    graphed = [dpf.purify(x.to(exact_cuda), model_gpu, cuda_graph=True, **kw) for _ in range(2)]
    assert torch.equal(graphed[0], eager) and torch.equal(graphed[1], eager)
    torch.testing.assert_close(eager.cpu(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", _gpu_impls())
def test_cuda_eager_chain_never_synchronises(exact_cuda, forced, impl):
    """No device-to-host copy inside the chain, forward or exact backward, float32 or fp16 autocast: every step
    runs under torch.cuda.set_sync_debug_mode("error") (the ids' range check, once a sync per step, is gone)."""
    if not ops.available(impl):
        pytest.skip(f"{impl} is not available")
    forced(impl)
    cfg = dpf.PurifyConfig.build(grad_mode="full", **FAST)
    chain = cfg.chain(torch.float32)
    x = torch.rand(2, 3, 6, 5, device=exact_cuda) * 2 - 1
    noise = Noise(seed=3, sample_ids=torch.arange(2, device=exact_cuda))
    model = tiny_score_model().to(exact_cuda)
    results = []
    for net in (model, with_autocast(model, "fp16")):
        xg = x.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                y = run_chain(x, net, chain, noise)
            out = differentiable_chain(xg, net, chain, noise, cfg, x_user=xg)
            (g,) = torch.autograd.grad(out, xg, torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append((y, g))
    assert all(torch.isfinite(t).all() for pair in results for t in pair)


@pytest.mark.cuda
@pytest.mark.parametrize("grad_mode", ["bpda", "full", "surrogate"])
def test_cuda_graph_gradients_match_eager(exact_cuda, grad_mode):
    model = tiny_score_model().to(exact_cuda)
    x = torch.rand(2, 3, 6, 5, device=exact_cuda)
    w = torch.randn(x.shape, device=exact_cuda)
    results = []
    for cuda_graph in (False, True, True):
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, seed=2, **FAST, grad_mode=grad_mode, surrogate_steps=3,
                         cuda_graph=cuda_graph)
        results.append((out.detach(), torch.autograd.grad((out * w).sum(), xg)[0]))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0])
        # Not bitwise: cuDNN/cuBLAS backward kernels may accumulate in a different order from one call to the next.
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
def test_cuda_cleared_graphs_free_their_memory(exact_cuda, no_cycle_collector):
    """Clearing the cache frees the graphs' static buffers and pools at once (reference counting alone)."""
    model = tiny_score_model().to(exact_cuda)
    x = torch.rand(4, 3, 6, 5, device=exact_cuda)
    kw = dict(seed=1, **FAST, cuda_graph=True, grad_mode="full")

    def purify_and_drop():
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(dpf.purify(xg, model, **kw).sum(), xg)
        torch.cuda.synchronize()

    purify_and_drop()  # the first capture also sets up what stays (cuBLAS/cuDNN workspaces, the side stream's)
    cuda_graphs.clear_cuda_graphs(model)
    base = torch.cuda.memory_allocated(exact_cuda)
    purify_and_drop()
    assert cuda_graphs.graph_count(model) == 2 and torch.cuda.memory_allocated(exact_cuda) > base
    cuda_graphs.clear_cuda_graphs(model)
    assert torch.cuda.memory_allocated(exact_cuda) == base


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_graph_on_a_second_gpu_after_the_first():
    """A capture for cuda:1 after one for cuda:0 runs on cuda:1's own stream (it once ran on cuda:0's)."""
    x = torch.rand(2, 3, 6, 5)
    for dev in ("cuda:0", "cuda:1"):
        model = tiny_score_model().to(dev)
        eager = dpf.purify(x.to(dev), model, seed=3, **FAST)
        graphed = dpf.purify(x.to(dev), model, seed=3, **FAST, cuda_graph=True)
        assert graphed.device == torch.device(dev) and torch.equal(graphed, eager)


@pytest.mark.cuda
def test_cuda_graph_replays_new_inputs(exact_cuda):
    model = tiny_score_model().to(exact_cuda)
    purifier = dpf.Purifier(model, seed=1, **FAST, cuda_graph=True)
    for i in range(3):
        x = torch.rand(2, 3, 6, 5, device=exact_cuda)
        ids = [2 * i, 2 * i + 1]
        assert torch.equal(purifier(x, noise_ids=ids), dpf.purify(x, model, seed=1, **FAST, noise_ids=ids))
    assert cuda_graphs.graph_count(model) == 1


@pytest.mark.cuda
def test_cuda_graph_refuses_caller_noise(exact_cuda):
    model = tiny_score_model().to(exact_cuda)
    x = torch.rand(1, 3, 6, 5, device=exact_cuda)
    with pytest.raises(ValueError, match="caller-given"):
        dpf.purify(x, model, seed=0, **FAST, cuda_graph=True, forward_noise=torch.zeros_like(x))
