"""The benchmark scripts' machinery on tiny problems: the GPU benchmark's no-GPU exit and its rows (CUDA calls stubbed
on CPU), one scaling point, the plots, the network profile's categories, the guided benchmark's digits rows, and that
plain pytest never collects the benchmark suite."""

import csv
import functools
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.models import NCSNpp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_bench import png_size  # noqa: E402

from benchmarks import bench_gpu, bench_guided, bench_scaling, plot_results, profile_network  # noqa: E402


def test_plain_pytest_does_not_collect_the_benchmark_suite():
    # (tomllib is Python 3.11+; the package supports 3.9)
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "benchmarks" / "test_bench_suite.py").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_gpu_exits_with_a_message_without_a_gpu():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True)
    assert out.returncode != 0 and "no CUDA GPU is visible" in out.stderr and "nothing was measured" in out.stderr


@pytest.fixture
def stub_cuda(monkeypatch):
    """bench_gpu's CUDA calls stubbed on CPU; returns the log of the memory-counter calls, in order."""
    calls = []
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2 ** 20)
    monkeypatch.setattr(bench_gpu, "device_peak_gbps", lambda device: None)

    def tiny(name, device, compiled):
        torch.manual_seed(0)
        net = NCSNpp(image_size=32, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()).eval()
        return dpf.EpsModel(net, time_input="continuous")

    monkeypatch.setattr(bench_gpu, "score_model", tiny)
    return calls


def _gpu_args(tmp_path, **kw):
    return bench_gpu.argparse.Namespace(**{**dict(nets="ncsnpp", batches="1", steps="2", repeats=1, budget_s=None,
                                                  output=str(tmp_path / "gpu.md")), **kw})


def test_bench_gpu_rows_and_table_with_cuda_calls_stubbed(stub_cuda, tmp_path, one_thread):
    """The row loop and the report, on CPU with a tiny network: what runs before the first GPU exists."""
    args = _gpu_args(tmp_path, variants="eager,bf16,official,full")
    out = tmp_path / "gpu.md"
    rows = bench_gpu.purify_rows(args, torch.device("cpu"), on_row=functools.partial(
        bench_gpu._written, out.with_suffix(".csv"), bench_gpu.PURIFY_COLUMNS, out, "test"))
    assert [r["variant"] for r in rows] == ["eager", "bf16", "official", "full"]
    # Without torchsde (the GPU machine unless its wheels travel) the official row is reported as skipped.
    official = "ok" if importlib.util.find_spec("torchsde") else "skipped: torchsde is not installed"
    assert [r["status"] for r in rows] == ["ok", "ok", official, "ok"]
    measured = [r for r in rows if r["status"] == "ok"]
    assert all(r["steps"] == 2 and r["full_steps"] == 100 and r["images_per_s"] > 0 and r["peak_mib"] == 1.0
               for r in measured)
    # The peak counter is reset once per measured row, after its first (compiling, capturing) call.
    assert stub_cuda == ["reset"] * len(measured)
    table = out.read_text()
    assert "| ncsnpp | bf16 | 1 | 2 |" in table and "| ncsnpp | official | 1 | 2 |" in table
    with (tmp_path / "gpu.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == [r["status"] for r in rows]


def test_bench_gpu_peak_excludes_the_first_call(stub_cuda):
    """The peak counter is reset after the first call (compilation, capture) and before the timed ones."""
    bench_gpu.measure(lambda: stub_cuda.append("call"), repeats=2)
    assert stub_cuda == ["call", "reset", "call", "call"]


@pytest.mark.cuda
def test_cuda_step_providers_time_kernels_alone():
    """The fused-step rows of bench_sde_step / bench_gpu: no provider synchronises inside a timed call (the CUDA
    op's per-call check of the ids did, Triton's launcher never did: their rows were not comparable)."""
    from benchmarks.bench_sde_step import providers

    x, eps, z = (torch.randn(4, 4096, device="cuda") for _ in range(3))
    calls = providers(x, eps, z, torch.arange(4, device="cuda"), with_reference=True)
    assert {"cuda", "cuda_z"} <= set(calls)
    for fn, _ in calls.values():
        fn()  # warm-up: Triton compiles here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_bench_gpu_budget_skips_and_reports_rows(stub_cuda, tmp_path, monkeypatch, one_thread):
    args = _gpu_args(tmp_path, variants="compiled,eager", batches="1,2", steps="1:2,2:1", budget_s=60.0)
    monkeypatch.setattr(bench_gpu, "_START", time.monotonic() - 45.0)  # 15 s left: too little for a compile
    rows = bench_gpu.purify_rows(args, torch.device("cpu"))
    assert [(r["batch"], r["variant"], r["steps"]) for r in rows] == [
        (1, "eager", 2), (2, "eager", 1), (1, "compiled", 2), (2, "compiled", 1)]  # compiles last
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert all(r["status"].startswith("skipped: 1") and r["status"].endswith("s left of --budget-s 60")
               and "ms_per_step" not in r for r in rows[2:])
    with pytest.raises(SystemExit, match="--steps: names no step count for batch sizes \\[2\\]"):
        bench_gpu.parse_steps("1:5", [1, 2])


def test_beyond_l2_sizes_stream_from_dram():
    from benchmarks import bench_sde_step

    class H200:
        L2_cache_size = 60 * 2 ** 20

    def sizes(props, element_size=4):
        import unittest.mock

        with unittest.mock.patch.object(torch.cuda, "get_device_properties", lambda d: props):
            return bench_sde_step.beyond_l2_sizes(torch.device("cuda"), element_size)

    assert sizes(H200) == [64 * 2 ** 20, 256 * 2 ** 20]  # 256 MiB and 1 GiB per float32 tensor, > 60 MB
    assert all(n * 4 >= 4 * H200.L2_cache_size for n in sizes(H200))
    assert bench_sde_step.parse_sizes("64K,1M,7") == [65536, 1 << 20, 7]


@pytest.mark.parametrize("mode", ["none", "full_cache", "adjoint"])
def test_bench_scaling_point(mode, one_thread):
    res = bench_scaling.run_point("digits", "cpu", mode, batch=1, steps=3, repeats=1, threads=None)
    assert res["steps"] == 3 and res["median_s"] > 0 and res["peak_extra_mib"] >= 0 and res["threads"] == 1
    # counted, not computed: the exact adjoint recomputes each step's call; a cached graph needs no recompute
    assert res["network_calls"] == {"none": 3, "full_cache": 3, "adjoint": 6}[mode]


def test_plot_results_renders_every_plot(tmp_path):
    rows = [dict(sweep="batch", grad_mode="none", batch=b, steps=100, seconds=0.5 * b, seconds_per_image=0.5)
            for b in (1, 2, 4)]
    rows += [dict(sweep="steps", grad_mode=m, batch=4, steps=s, seconds=0.01 * s, seconds_per_image=0.0025 * s)
             for m in bench_scaling.MODES for s in (10, 20)]
    with (tmp_path / "scaling_cpu.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench_scaling.COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "net": "digits", "device": "cpu", "peak_mib": 10.0, "machine": "test",
                        "load_1min": 1.0})
    (tmp_path / "sde_step_cpu.csv").write_text((ROOT / "benchmarks" / "results" / "sde_step_cpu.csv").read_text())
    with (tmp_path / "gpu.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["net", "variant", "batch", "steps", "ms_per_purification", "images_per_s"])
        w.writeheader()
        w.writerows(dict(net="ncsnpp", variant=v, batch=b, steps=100, ms_per_purification=1, images_per_s=b)
                    for v in ("eager", "cuda_graph") for b in (1, 8))
    written = plot_results.main(["--results", str(tmp_path)])
    names = sorted(p.name for p in written)
    assert names == ["gpu_throughput.png", "memory_vs_steps_cpu.png", "purify_vs_batch_cpu.png",
                     "purify_vs_steps_cpu.png", "sde_step_cpu.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    # figure size x dpi 110: the memory plot gains a panel without full_cache (flat modes were hidden under it)
    sizes = {p.name: png_size(p) for p in written}
    assert sizes["purify_vs_batch_cpu.png"] == (990, 396) and sizes["purify_vs_steps_cpu.png"] == (660, 440)
    assert sizes["memory_vs_steps_cpu.png"] == (1320, 440)


def test_scaling_plots_are_linear_from_zero(tmp_path, monkeypatch):
    """bench_scaling's plots: no log axis, every y axis from 0, the threads that ran in the title (issue 20.11)."""
    rows = [dict(sweep="batch", grad_mode="none", batch=b, steps=10, seconds=1 + 0.5 * b, seconds_per_image=0.5,
                 threads=1) for b in (1, 2, 4)]
    rows += [dict(sweep="steps", grad_mode=m, batch=4, steps=s, seconds=1 + 0.01 * s, seconds_per_image=0.1,
                  threads=1) for m in ("none", "full") for s in (10, 20)]
    with (tmp_path / "scaling_cpu.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench_scaling.COLUMNS)
        w.writeheader()
        w.writerows({**r, "net": "digits", "device": "cpu", "peak_mib": 10.0, "machine": "test", "load_1min": 1.0}
                    for r in rows)
    axes = []
    monkeypatch.setattr(plot_results, "_save", lambda fig, path: axes.extend(fig.axes) or path)
    plot_results.plot_scaling(tmp_path / "scaling_cpu.csv")
    assert len(axes) == 4
    for ax in axes:
        assert ax.get_xscale() == ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0
    assert "1 torch thread(s)" in axes[0].figure._suptitle.get_text()


def test_profile_network_sorts_operators_into_categories(one_thread):
    """Convolution and matrix-product time land in their own rows, attention gets none here, and the rest (relu,
    views) lands in the last row."""
    conv, lin, x = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(16, 16), torch.randn(2, 3, 20, 20)

    def fn():
        with torch.no_grad():
            lin(conv(x).relu().flatten(2)[..., :16])

    ms = profile_network.breakdown(fn, calls=3)
    assert [name for name, _ in profile_network.CATEGORIES] == list(ms)
    rest = profile_network.CATEGORIES[-1][0]
    assert ms["convolutions"] > 0 and ms["matrix products"] > 0 and ms[rest] > 0
    assert ms["attention"] == 0 and ms["dynamo guard check"] == 0


def test_bench_guided_digits_rows_cover_every_demo_method(one_thread):
    """One row per (guided method, non-exact gradient) the demo runs, AGDM included (its auxiliary network comes from
    the demo's own keyword arguments: without it the script crashed once the demo gained AGDM)."""
    from diffpure_fast.demo import GUIDED_SETTINGS

    rows = [line for line in bench_guided.digits_gradients(n=2) if line.startswith("| ") and "---" not in line][1:]
    methods = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert set(GUIDED_SETTINGS) <= set(methods)
    assert methods.count("mimic") == 2 and "gdmp (norm_batch=1)" in methods and "agdm" in methods


def test_bench_attacks_counts_diffhammer_against_plain_eot(one_thread):
    """Per attack step at N = 2 paths and one solver step: plain EOT runs 2 purifications with the gradient (forward
    and recompute: 4 network forwards, 2 VJPs per sample); DiffHammer 2 without a graph and 1 with it (4 forwards,
    1 VJP). At N the counts are 2N + 2N and N + 2 + 1 (the claim of its benchmark row)."""
    from benchmarks import bench_attacks

    lines = bench_attacks.main(["--quick", "--attacks", "pgd-eot,diffhammer"])
    rows = {r.split(" | ")[1]: r.split(" | ") for r in lines if r.startswith("| diffpure |")}
    assert [float(v) for v in rows["pgd-eot"][4:7]] == [4.0, 2.0, 2.0]
    assert [float(v) for v in rows["diffhammer"][4:7]] == [4.0, 1.0, 2.0]


def test_attack_study_settings_are_valid_configurations():
    from benchmarks.attack_study import PROTOCOL, STUDY_ATTACKS, STUDY_DEFENSES
    from diffpure_fast.eval.harness import EvalConfig

    for opts in STUDY_ATTACKS.values():
        EvalConfig(**opts, **PROTOCOL)
    assert {s["method"] for s in STUDY_DEFENSES.values()} == {"diffpure", "gdmp"}
    assert len(STUDY_ATTACKS) == 7
