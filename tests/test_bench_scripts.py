"""The benchmark scripts' machinery on tiny problems: the GPU benchmark's no-GPU exit and its rows (CUDA calls stubbed
on CPU), one scaling point, the plots, the network profile's categories, the guided benchmark's digits rows, and that
plain pytest never collects the benchmark suite."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffpure_fast as dpf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_gpu, bench_guided, bench_scaling, plot_results, profile_network  # noqa: E402


def test_plain_pytest_does_not_collect_the_benchmark_suite():
    # (tomllib is Python 3.11+; the package supports 3.9)
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "benchmarks" / "test_bench_suite.py").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_gpu_exits_with_a_message_without_a_gpu():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True)
    assert out.returncode != 0 and "no CUDA GPU is visible" in out.stderr and "nothing was measured" in out.stderr


def test_bench_gpu_rows_and_table_with_cuda_calls_stubbed(monkeypatch, tmp_path, one_thread):
    """The row loop and the report, on CPU with a tiny network: what runs before the first GPU exists."""
    from diffpure_fast.models import NCSNpp

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2 ** 20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stub GPU")
    monkeypatch.setattr(bench_gpu, "device_peak_gbps", lambda device: None)

    def tiny(name, device, compiled):
        torch.manual_seed(0)
        net = NCSNpp(image_size=32, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()).eval()
        return dpf.EpsModel(net, time_input="continuous")

    monkeypatch.setattr(bench_gpu, "score_model", tiny)
    args = bench_gpu.argparse.Namespace(nets="ncsnpp", batches="1", variants="eager,bf16,official", steps=2,
                                        repeats=1, step_elements=0, output=str(tmp_path / "gpu.md"))
    rows = bench_gpu.purify_rows(args, torch.device("cpu"))
    assert [r["variant"] for r in rows] == ["eager", "bf16", "official"]
    assert all(r["steps"] == 2 and r["images_per_s"] > 0 and r["peak_mib"] == 1.0 for r in rows)
    bench_gpu.write(args, rows, [], torch.device("cpu"))
    table = (tmp_path / "gpu.md").read_text()
    assert "stub GPU" in table and "| ncsnpp | bf16 | 1 | 2 |" in table
    with (tmp_path / "gpu.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3


@pytest.mark.parametrize("mode", ["none", "full_cache", "adjoint"])
def test_bench_scaling_point(mode, one_thread):
    res = bench_scaling.run_point("digits", "cpu", mode, batch=1, steps=3, repeats=1, threads=None)
    assert res["steps"] == 3 and res["seconds"] > 0 and res["peak_bytes"] >= 0


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
