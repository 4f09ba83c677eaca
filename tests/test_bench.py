"""``diffpure-fast bench`` and ``diffpure_fast.bench`` (issue 20, items 15 and 16): the table, JSON/CSV keys, the
plot's size, network calls counted against the solver's expected number, the torchsde row, the gradient-cost row,
bad flags named, and counting a loaded model's network calls (a forward hook on the wrapper never fires)."""

import csv
import importlib.util
import json
import sys

import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.bench import BenchConfig, count_network_calls, run_bench
from diffpure_fast.bench_report import COLUMNS, OUTPUTS
from diffpure_fast.cli import main

HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
STEPS = 3


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One tiny CLI run shared by the output tests (embedded digits model, batch 1-2, 3 steps)."""
    out = tmp_path_factory.mktemp("bench")
    n = torch.get_num_threads()
    captured = []

    class Tee:
        def write(self, s):
            captured.append(s)

        def flush(self):
            pass

    old, sys.stdout = sys.stdout, Tee()
    try:
        rc = main(["bench", "--batch-sizes", "1,2", "--steps", str(STEPS), "--grad-modes", "none,full",
                   "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(out)])
    finally:
        sys.stdout = old
        torch.set_num_threads(n)
    return rc, "".join(captured), out


def test_bench_cli_writes_table_json_csv_and_plot(bench_run):
    rc, stdout, out = bench_run
    assert rc == 0
    assert all((out / name).is_file() for name in OUTPUTS)
    assert "| engine | device | dtype | batch | steps | grad_mode | median (s) |" in stdout
    assert "torch CPU threads: 1 (--threads)" in stdout and "torch CPU threads that ran 1" in stdout
    assert "warm-up call(s) per row excluded" in stdout
    data = json.loads((out / "bench.json").read_text())
    header = data["header"]
    assert header["torch_threads"] == 1 and header["command"].startswith("diffpure-fast bench")
    assert {"cpu", "logical_cpus", "torch", "python", "diffpure_fast", "model", "t_star"} <= set(header)
    with (out / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(data["rows"]) == 2 * (2 + 1)  # batches x (none, full, official)
    assert png_size(out / "bench.png") == (1100, 440)  # figsize (10, 4) at dpi 110


def test_bench_counts_network_calls_per_solver(bench_run):
    """Counted, not computed: Euler makes one call per step; the exact adjoint recomputes each step's call once;
    torchsde's sdeint makes one extra call (it evaluates the drift at the end point too)."""
    rows = json.loads((bench_run[2] / "bench.json").read_text())["rows"]
    ours = {(r["batch"], r["grad_mode"]): r for r in rows if r["engine"] == "dpf.purify"}
    for batch in (1, 2):
        none, full = ours[(batch, "none")], ours[(batch, "full")]
        assert none["steps"] == full["steps"] == STEPS
        assert none["network_calls"] == STEPS and full["network_calls"] == 2 * STEPS
        assert none["status"] == full["status"] == "ok" and none["repeats"] == 2
        assert none["min_s"] <= none["median_s"] <= none["max_s"] and none["images_per_s"] > 0
        assert none["peak_mib"] > 0 and none["peak_extra_mib"] >= 0
        # the gradient's cost in no-grad units: over the no-grad row, and over one no-grad network call
        assert full["cost_nograd"] == pytest.approx(full["median_s"] / none["median_s"])
        assert full["cost_calls"] == pytest.approx(full["median_s"] / (full["call_ms"] / 1e3))
        assert none["cost_nograd"] == 1.0


def test_bench_official_row_same_network_and_noise(bench_run):
    pytest.importorskip("torchsde")
    official = [r for r in json.loads((bench_run[2] / "bench.json").read_text())["rows"]
                if r["engine"] == "official (torchsde)"]
    assert [r["batch"] for r in official] == [1, 2]
    for r in official:
        assert r["status"] == "ok" and r["network_calls"] == STEPS + 1 and r["max_abs_diff"] < 1e-5


def test_bench_official_row_says_skipped_without_torchsde(monkeypatch, one_thread):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde raises ImportError
    model = dpf.load_score_model("digits")
    rows = run_bench(lambda dev: model, BenchConfig(batch_sizes=(1,), steps=(2,), grad_modes=("none",), repeats=1,
                                                    warmup=0))
    assert [r["engine"] for r in rows] == ["dpf.purify", "official (torchsde)"]
    assert rows[1]["status"] == "skipped: torchsde is not installed (pip install torchsde)"


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "0"], "--batch-sizes: expected an int >= 1, got 0"),
    (["--batch-sizes", "1,x"], "--batch-sizes: expected a comma-separated list of ints, got '1,x'"),
    (["--steps", "1.5"], "--steps: expected a comma-separated list of ints"),
    (["--grad-modes", "none,fast"], "--grad-modes: expected one of ('none', 'bpda', 'full', 'full_cache'"),
    (["--grad-modes", "none,none"], "--grad-modes: names a value twice"),
    (["--devices", "tpu"], "--devices: expected cpu or cuda[:N], got 'tpu'"),
    (["--dtypes", "float64"], "--dtypes: expected one of ('float32', 'bf16', 'fp16')"),
    (["--repeats", "0"], "--repeats: expected an int >= 1, got 0"),
    (["--warmup", "-1"], "--warmup: expected an int >= 0, got -1"),
    (["--t-star", "0"], "--t-star: expected a value > 0.0"),
    (["--threads", "0"], "--threads: expected an int >= 1"),
    (["--model", "score_sde"], "--checkpoint: --model score_sde needs a checkpoint path"),
    (["--config", "missing.json"], "--config: missing.json: no such file"),
])
def test_bench_bad_flags_name_themselves(argv, message, tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        assert main(["bench", *argv, "--out", str(tmp_path / "o")]) == 2
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err
    assert err.startswith("diffpure-fast bench: error: ") and message in err, err


def test_bench_out_is_required_and_never_overwritten_silently(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    (tmp_path / "bench.json").write_text("{}")
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert f"--out: {tmp_path / 'bench.json'} exists; pass --overwrite to replace it" in capsys.readouterr().err
    inside = dpf.__file__.rsplit("/", 1)[0] + "/results"
    assert main(["bench", "--out", inside]) == 2
    assert "is inside the installed package" in capsys.readouterr().err


# -- item 16: counting a loaded model's network calls ------------------------------------------------------------


def test_forward_hook_on_the_wrapper_never_fires_but_the_counter_counts(one_thread):
    """The engine calls model.eps, which calls model.net directly: a hook on the wrapper counts 0 (documented in
    ScoreModel), a hook on model.net counts every call, and count_network_calls agrees with it."""
    model = dpf.load_score_model("digits")
    x = torch.rand(1, 1, 16, 16)
    seen = {"wrapper": 0, "net": 0}
    h1 = model.register_forward_hook(lambda *a: seen.__setitem__("wrapper", seen["wrapper"] + 1))
    h2 = model.net.register_forward_hook(lambda *a: seen.__setitem__("net", seen["net"] + 1))
    try:
        with torch.no_grad(), dpf.count_network_calls(model) as calls:
            dpf.purify(x, model, t_star=0.1, dt=0.025, seed=0)
    finally:
        h1.remove()
        h2.remove()
    assert seen == {"wrapper": 0, "net": 4} and calls.calls == 4
    assert "eps" not in vars(model) and "eps_and_variance" not in vars(model)  # restored


def test_count_network_calls_under_autocast_and_on_error(one_thread):
    model = dpf.load_score_model("digits")
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad(), count_network_calls(model, timed=True) as calls:
        dpf.purify(x, model, t_star=0.1, dt=0.05, seed=0, autocast="bf16")  # wraps the model: still counted
    assert calls.calls == 2 and calls.seconds > 0
    with pytest.raises(RuntimeError, match="boom"), count_network_calls(model):
        raise RuntimeError("boom")
    assert "eps" not in vars(model)
    with pytest.raises(TypeError, match="model: expected a ScoreModel"), count_network_calls(torch.nn.Linear(1, 1)):
        pass


def test_memory_not_measured_without_proc_is_said_not_guessed(monkeypatch):
    """Without /proc/self/clear_refs (not Linux) the peak is None ("-" in the table), never a wrong number."""
    from diffpure_fast import bench
    from diffpure_fast.bench_report import markdown

    def no_proc():
        raise OSError("no /proc/self/clear_refs")

    monkeypatch.setattr(bench, "reset_peak_rss", no_proc)
    seconds, peak, extra, result = bench.measure_call(lambda: 7, torch.device("cpu"))
    assert seconds >= 0 and peak is None and extra is None and result == 7
    row = dict(engine="dpf.purify", device="cpu", dtype="float32", batch=1, steps=2, grad_mode="none", status="ok",
               median_s=1.0, min_s=1.0, max_s=1.0, images_per_s=1.0, peak_mib=None, peak_extra_mib=None,
               network_calls=2, cost_calls=2.0, cost_nograd=1.0)
    header = dpf.bench.machine_header("test")
    table = markdown({**header, "model": "digits", "t_star": 0.1}, [row], warmup=1)
    assert "| none | 1 | 1-1 | 1 | - | - | 2 | 2 | 1 |" in table


def test_bench_needs_the_image_shape_of_a_model_that_does_not_state_it(one_thread):
    from diffpure_fast._validate import OptionError

    model = dpf.EpsModel(lambda x, t: torch.zeros_like(x), time_input="unit")  # no in_channels, no image_size
    cfg = BenchConfig(batch_sizes=(1,), steps=(2,), grad_modes=("none",), repeats=1, warmup=0, official=False)
    with pytest.raises(OptionError, match="^image_shape: EpsModel does not state its input channels and size"):
        run_bench(lambda dev: model, cfg)
    rows = run_bench(lambda dev: model, cfg, image_shape=(3, 4, 4))
    assert [(r["engine"], r["network_calls"]) for r in rows] == [("dpf.purify", 2)]


def test_bench_yaml_config_without_pyyaml_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)
    (tmp_path / "cfg.yaml").write_text("model: {}\n")
    assert main(["bench", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "yaml is not installed (needed for --config with a YAML file); pip install pyyaml" in capsys.readouterr().err
