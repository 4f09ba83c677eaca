"""scripts/gpu_check.sh's arguments and its one-screen summary (scripts/gpu_check_summary.py), on made-up stage
results: what can be checked before the GPU machine runs it."""

import csv
import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments():
    bad = subprocess.run(["bash", str(SCRIPT), "--full"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--full' (expected --quick or nothing)" in bad.stderr
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "scripts/gpu_check.sh --quick" in usage.stdout and "set -uo" not in usage.stdout


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def results(tmp_path):
    """A run's folder as the stages leave it: machine.md, tests.xml, gpu.csv, gpu_step.csv, and the stages' table."""
    (tmp_path / "machine.md").write_text("# Machine\n\n- Commit: abc1234\n- Host: h, Python 3.12.3, torch 2.11.0\n"
                                         "- Triton 3.6.0\n- torchsde 0.2.6\n- GPU 0: NVIDIA H200, 132 SMs\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_ops" name="test_a"/>'
        '<testcase classname="tests.test_ops" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_cuda_graphs" name="test_c"><skipped message="needs two CUDA GPUs"/>'
        '</testcase></testsuite></testsuites>')
    row = dict(net="ncsnpp", batch=1, steps=100, full_steps=100, images_per_s="", status="ok")
    _write_csv(tmp_path / "gpu.csv", [
        {**row, "variant": "official", "ms_per_step": 8.0, "images_per_s": 1.25},
        {**row, "variant": "cuda_graph", "ms_per_step": 2.0, "images_per_s": 5.0},
        {**row, "variant": "eager", "ms_per_step": 4.0, "images_per_s": 2.5},
        {**row, "variant": "full", "ms_per_step": 14.0},
        {**row, "variant": "compiled", "ms_per_step": "", "status": "skipped: 20 s left of --budget-s 300"},
    ])
    _write_csv(tmp_path / "gpu_step.csv", [
        {"provider": "copy", "elements": 1 << 26, "beyond_l2": "True", "GB/s": 4300.0, "% peak": 89.6,
         "% copy": 100.0},
        {"provider": "cuda", "elements": 1 << 26, "beyond_l2": "True", "GB/s": 3870.0, "% peak": 80.6,
         "% copy": 90.0},
    ])
    stages = tmp_path / "stages.tsv"
    stages.write_text("wheels\tok\t2\ttorchsde 0.2.6 from the carried wheels\nmachine\tok\t3\tGPU 0: NVIDIA H200\n"
                      "build\tok\t70\textension: CPU kernels built, CUDA kernels built\ntests\tFAIL rc 1\t50\t\n"
                      "bench\tok\t200\t\n")
    return tmp_path, stages


def test_summary_of_a_run(results, capsys):
    out, stages = results
    rc = _summary_module().main(["--mode", "full", "--stages", str(stages), "--out", str(out), "--seconds", "330",
                                 "--budget", "460"])
    text = capsys.readouterr().out
    assert rc == 1 and text == (out / "summary.md").read_text()
    assert text.startswith("# gpu_check.sh full: FAIL (tests), 330 s of a 460 s budget")
    assert "- GPU 0: NVIDIA H200, 132 SMs" in text and "| tests | FAIL rc 1 | 50 |  |" in text
    assert "1 passed, 1 failed, 1 skipped, of 3" in text and "FAILED tests.test_ops::test_b" in text
    assert "skipped x1: needs two CUDA GPUs" in text
    # No-grad rows: speed-up over the official pipeline; the gradient row: its cost in eager no-grad purifications.
    assert ("ncsnpp B=1 (100/100 steps): official 8.00, cuda_graph 2.00 4.0x off., eager 4.00 2.0x off., "
            "full 14.00 3.5x eager, compiled skipped: 20 s left of --budget-s 300; best 5.0 img/s (cuda_graph)") in text
    assert "64M elements (beyond L2): copy 4300 (90%, 100%), cuda 3870 (81%, 90%)" in text
    assert len(text.splitlines()) < 40  # one screen


def test_summary_passes_skips_for_want_of_a_gpu_not_of_time(results, capsys):
    out, stages = results
    args = ["--mode", "quick", "--stages", str(stages), "--out", str(out), "--seconds", "100", "--budget", "165"]
    stages.write_text("build\tok\t20\t\ntests\tok\t40\t\nbench\tskipped\t1\tbench: no CUDA GPU visible: skipped\n")
    assert _summary_module().main(args) == 0
    stages.write_text("build\tok\t20\t\ntests\tok\t40\t\nbench\tskipped\t0\tno time left in the 165 s budget\n")
    assert _summary_module().main(args) == 1
    assert "FAIL (bench)" in capsys.readouterr().out
