"""The evaluation harness end to end on the embedded digits models: records, report, resume after a kill, torchrun
sharding, AutoAttack through the PyPI package, data and classifier sources, and clear errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.eval import protocol_metrics
from diffpure_fast.eval.classifiers import load_classifier_spec
from diffpure_fast.eval.datasets import load_data, read_cifar10_batch
from diffpure_fast.eval.defenses import build_defense
from diffpure_fast.eval.harness import PAUSE_ENV, STOP_ENV, EvalConfig, evaluate
from diffpure_fast.eval.records import comparable, read_records
from diffpure_fast.eval.report import write_report

ROOT = Path(__file__).resolve().parents[1]
# 6 digits in blocks of 2, 2 solver steps, 2 PGD steps x 2 EOT, judged twice: seconds, yet every stage runs
CLI_ARGS = ["eval", "--n-images", "6", "--batch-size", "2", "--steps", "2", "--attack-steps", "2", "--eot", "2",
            "--n-eval", "2", "--eps", "0.1", "--seed", "3", "--threads", "1", "--quiet"]


def _run(args, env_extra=None, torchrun=False):
    env = dict(os.environ, **(env_extra or {}))
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
            "diffpure_fast"] if torchrun else [sys.executable, "-m", "diffpure_fast"]
    return subprocess.run(head + args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _records(folder):
    return [comparable(r) for _, r in sorted(read_records(folder).items())]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted single-process CLI run, the reference of the resume and torchrun tests."""
    out = tmp_path_factory.mktemp("ref")
    p = _run(CLI_ARGS + ["--output", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_cli_eval_writes_records_report_and_plots(reference_run):
    out = reference_run
    assert not (out / "records.jsonl").exists()   # one records file per process, no merged duplicate
    for name in ("config.json", "environment.json", "records-000.jsonl", "report.md",
                 "report.json", "curve.png", "grid.png"):
        assert (out / name).is_file(), name
    recs = _records(out)
    assert [r["index"] for r in recs] == list(range(6))
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_samples"] == 6 and rep["complete"] and rep["n_eval"] == 2
    assert "grad_mode='full'" in rep["gradient"]
    # the report's numbers are the protocol metrics of the records
    m = protocol_metrics([r["label"] for r in recs], [r["adv_pred"] for r in recs])
    for k, a in m.items():
        assert rep["robust"][k]["correct"] == a.correct and rep["robust"][k]["total"] == a.total
    assert len(rep["attack_curve"]) == 3 and all(r["linf"] <= 0.1 + 1e-6 for r in recs)
    assert sum("images" in r for r in recs) == 6
    # `diffpure-fast report` rebuilds the same report from the records alone
    before = (out / "report.md").read_text()
    for name in ("report.md", "report.json", "curve.png", "grid.png"):
        (out / name).unlink()
    p = _run(["report", str(out), "--quiet"])
    assert p.returncode == 0, p.stderr
    assert (out / "report.md").read_text() == before and (out / "grid.png").is_file()


def test_killed_run_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    out = tmp_path / "killed"
    p = _run(CLI_ARGS + ["--output", str(out)], {STOP_ENV: "1"})   # dies hard after its first block
    assert p.returncode == 17, p.stderr[-2000:]
    assert len(read_records(out)) == 2
    with open(out / "records-000.jsonl", "a") as f:               # and as if killed in the middle of a line
        f.write('{"index": 4, "label": 4, "clean_pr')
    p = _run(CLI_ARGS + ["--output", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = (out / "records-000.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(x)["index"] for x in lines}) == 6   # none lost, none twice
    assert _records(out) == _records(reference_run)
    a, b = (json.loads((d / "report.json").read_text()) for d in (out, reference_run))
    assert a["robust"] == b["robust"] and a["clean"] == b["clean"] and a["attack_curve"] == b["attack_curve"]
    # a rerun of a finished evaluation computes nothing and changes nothing
    p = _run(CLI_ARGS + ["--output", str(out)])
    assert p.returncode == 0 and len((out / "records-000.jsonl").read_text().splitlines()) == 6


def test_sigkilled_run_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    """A real SIGKILL mid-run (the run pauses 60 s after each block, so the kill lands after the first one)."""
    import signal
    import time

    out = tmp_path / "sigkill"
    env = dict(os.environ, **{PAUSE_ENV: "60"})
    proc = subprocess.Popen([sys.executable, "-m", "diffpure_fast", *CLI_ARGS, "--output", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        records_file, deadline = out / "records-000.jsonl", time.monotonic() + 300
        while not (records_file.is_file() and records_file.read_text().strip()):
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no record written in 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(read_records(out)) == 2
    p = _run(CLI_ARGS + ["--output", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert _records(out) == _records(reference_run)


def test_torchrun_two_processes_equal_one(reference_run, tmp_path):
    out = tmp_path / "sharded"
    p = _run(CLI_ARGS + ["--output", str(out)], torchrun=True)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert (out / "records-000.jsonl").is_file() and (out / "records-001.jsonl").is_file()
    ranks = {json.loads(x)["rank"] for f in out.glob("records-*.jsonl") for x in f.read_text().splitlines()}
    assert ranks == {0, 1}
    assert _records(out) == _records(reference_run)
    assert json.loads((out / "environment.json").read_text())["world_size"] == 2


def test_autoattack_pypi_package_as_released_through_the_harness(tmp_path):
    pytest.importorskip("pyautoattack")
    clf = dpf.load_classifier("digits")
    # The defended model (BPDA gradients, one solver step) under AutoAttack 'standard' as the package ships it. At
    # eps = 1 APGD-CE fools both images and AutoAttack skips its other attacks.
    pur = build_defense(dpf.load_score_model("digits"), grad_mode="bpda", t_star=0.1, steps=1, dt=None)
    rep = evaluate(pur, clf, "digits:test", tmp_path / "aa_def", attack="autoattack", aa_version="standard",
                   aa_mode="as-released", aa_package="pyautoattack", eps=1.0, n_images=2, n_eval=2, batch_size=2,
                   progress=False)
    assert rep["n_samples"] == 2 and rep["attack_curve"] is None
    assert rep["perturbation"]["max_linf"] <= 1.0 + 1e-6
    assert rep["environment"]["packages"]["pyautoattack"] == "0.2.0"
    assert rep["configuration"]["eval"]["aa_version"] == "standard"
    assert "bpda" in rep["gradient"] and "AS RELEASED" in rep["attack"]
    assert any("AS RELEASED" in w for w in rep["warnings"])


def test_autoattack_native_rand_attacks_every_sample_issue_reproduction(tmp_path, monkeypatch):
    # The reported instance (AutoAttack's "random escape"): digits, BPDA, t* = 0.1, one solver step, AutoAttack rand
    # through the harness, eps 0.1, 3 images, n_eval 3. As released, every judged x_adv was the clean image (L-inf 0)
    # and robust single-shot accuracy (3/3) was above clean (2/3). Natively: every sample attacked, APGD-CE and
    # APGD-DLR (100 iterations x 20 EOT) each leave their best iterate, fresh-noise evaluations choose between them.
    # The native rand version runs no package code: it works with neither package installed.
    monkeypatch.setitem(sys.modules, "autoattack", None)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    pur = build_defense(dpf.load_score_model("digits"), grad_mode="bpda", t_star=0.1, steps=1, dt=None)
    rep = evaluate(pur, "digits", "digits:test", tmp_path / "aa", attack="autoattack", aa_version="rand",
                   aa_package="pyautoattack", eps=0.1, n_images=3, n_eval=3, batch_size=3, progress=False)
    recs = read_records(tmp_path / "aa")
    assert all(0.1 - 1e-6 <= r["linf"] <= 0.1 + 1e-6 for r in recs.values())  # at the budget, never 0
    assert rep["not_attacked"]["count"] == 0 and rep["warnings"] == []
    for m in ("single_shot", "mean", "worst_of_n", "majority_vote"):
        assert rep["robust"][m]["correct"] <= rep["clean"][m]["correct"], m
    assert all(set(r["selection"]) == {"apgd-ce", "apgd-dlr"} and r["candidate"] in r["selection"]
               for r in recs.values())
    assert sum(rep["chosen_candidates"].values()) == 3
    assert len(rep["attack_curve"]) == 101  # the APGD runs' iterates 0..100
    assert "native protocol" in rep["attack"] and "20 EOT" in rep["attack"]
    assert "aa_package" not in rep["configuration"]["eval"]  # recorded as what it is: unused


def test_autoattack_native_standard_runs_every_member(tmp_path):
    # standard: APGD-CE, APGD-T (9 targets), FAB-T (9 targets, the package's class) and Square (the package's
    # class), a few iterations each; every run is a candidate of every sample, FAB-T only where it found one.
    pytest.importorskip("pyautoattack")
    pur = build_defense(dpf.load_score_model("digits"), grad_mode="full", t_star=0.1, steps=1, dt=None)
    rep = evaluate(pur, "digits", "digits:test", tmp_path / "std", attack="autoattack", aa_version="standard",
                   aa_package="pyautoattack", eps=0.1, attack_steps=2, aa_queries=5, n_eval=2, n_images=2, batch_size=2,
                   progress=False)
    recs = list(read_records(tmp_path / "std").values())
    names = {"apgd-ce", "square", *(f"apgd-t:{j}" for j in range(1, 10)), *(f"fab-t:{j}" for j in range(1, 10))}
    assert all(set(r["selection"]) == names for r in recs)
    assert all(0 < r["linf"] <= 0.1 + 1e-6 for r in recs)
    ev = rep["configuration"]["eval"]
    assert (ev["attack_steps"], ev["eot"], ev["aa_queries"], ev["batch_size"]) == (2, 1, 5, 2)
    # not found: FAB-T's -1 entries, never chosen
    assert all(r["selection"][r["candidate"]][0] >= 0 for r in recs)


def test_autoattack_as_released_zero_norm_samples_flagged(tmp_path, monkeypatch):
    """The git package's API (positional model, bs=, returns x_adv) through a stand-in module that, as AutoAttack
    does on a randomized defense, returns the clean input for one sample: the report flags it as not attacked."""
    import types

    calls = {}

    class AutoAttack:
        def __init__(self, model, norm="Linf", eps=0.3, version="standard", verbose=True, seed=None, device="cuda",
                     **kw):
            calls.update(norm=norm, eps=eps, version=version, verbose=verbose, device=device)
            self.model = model

        def run_standard_evaluation(self, x, y, bs=250, return_labels=False):
            calls["bs"] = bs
            out = (x + 0.05).clamp(0, 1)
            out[1] = x[1]
            return out

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=AutoAttack))
    rep = evaluate(None, dpf.load_classifier("digits"), "digits:test", tmp_path / "git", attack="autoattack",
                   aa_mode="as-released", aa_package="autoattack", aa_version="rand", eps=0.05, n_images=3,
                   n_eval=1, batch_size=3, progress=False)
    assert calls == dict(norm="Linf", eps=0.05, version="rand", verbose=False, device="cpu", bs=3)
    assert rep["configuration"]["eval"]["aa_package"] == "autoattack"
    assert rep["not_attacked"] == {"count": 1, "indices": [1]}
    assert rep["robust_attacked_only"]["single_shot"]["total"] == 2
    md = (tmp_path / "git" / "report.md").read_text()
    assert "1 of 3 samples were judged at distance 0" in md and "AS RELEASED" in md


def test_missing_autoattack_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "autoattack", None)   # import fails
    for kw in (dict(aa_mode="as-released"), dict(aa_version="standard")):
        with pytest.raises(ImportError, match="fra31/auto-attack"):
            evaluate(None, "digits", "digits:test", tmp_path, attack="autoattack", aa_package="autoattack",
                     n_images=1, **kw)


def test_apgd_eot_through_the_harness(tmp_path):
    pur = build_defense(dpf.load_score_model("digits"), grad_mode="full", t_star=0.1, steps=2, dt=None)
    rep = evaluate(pur, "digits", "digits:test", tmp_path / "apgd", attack="apgd-eot", eps=0.1, attack_steps=3, eot=2,
                   restarts=2, n_eval=2, n_images=3, batch_size=3, progress=False)
    recs = list(read_records(tmp_path / "apgd").values())
    assert all(set(r["selection"]) == {"apgd-eot:r0", "apgd-eot:r1"} and 0 < r["linf"] <= 0.1 + 1e-6
               for r in recs)
    assert len(rep["attack_curve"]) == 4 and all(len(r["attack_pred_trace"]) == 2 for r in recs)
    assert rep["configuration"]["eval"]["n_select"] == 2 and "step_size" not in rep["configuration"]["eval"]


def test_attack_options_an_attack_does_not_take_are_refused():
    for kw, name in ((dict(attack="autoattack", loss="dlr"), "loss"),
                     (dict(attack="autoattack", step_size=0.01), "step_size"),
                     (dict(attack="autoattack", aa_mode="as-released", attack_steps=10), "attack_steps"),
                     (dict(attack="autoattack", aa_mode="as-released", eot=5), "eot"),
                     (dict(attack="autoattack", aa_queries=100), "aa_queries"),
                     (dict(attack="apgd-eot", step_size=0.01), "step_size"),
                     (dict(attack="apgd-eot", random_start=False), "random_start"),
                     (dict(attack="pgd-eot", aa_mode="native"), "aa_mode"),
                     (dict(attack="pgd-eot", aa_version="rand"), "aa_version"),
                     (dict(attack="autoattack", aa_mode="patched"), "aa_mode")):
        with pytest.raises(ValueError, match=name):
            EvalConfig(**kw)
    cfg = EvalConfig(attack="autoattack", aa_version="standard")
    assert (cfg.attack_steps, cfg.eot, cfg.restarts, cfg.aa_queries, cfg.n_select) == (100, 1, 1, 5000, 10)
    assert EvalConfig(attack="pgd-eot", n_eval=4).deciding()["n_select"] == 4


def test_bad_arguments_are_named(tmp_path):
    clf = dpf.load_classifier("digits")
    for kw, name in ((dict(attack="fgsm"), "attack"), (dict(norm="l1"), "norm"), (dict(eps=8), "eps"),
                     (dict(n_eval=0), "n_eval"), (dict(eot=0), "eot"), (dict(batch_size=0), "batch_size"),
                     (dict(loss="mse"), "loss"), (dict(aa_version="plus", attack="autoattack"), "aa_version"),
                     (dict(n_select=0), "n_select")):
        with pytest.raises(ValueError, match=name):
            EvalConfig(**kw)
    with pytest.raises(ValueError, match="n_images"):
        evaluate(None, clf, "digits:test", tmp_path / "a", n_images=10_000)
    pur = build_defense(dpf.load_score_model("digits"), grad_mode="full", steps=1, dt=None)
    with pytest.raises(ValueError, match="bpda"):
        evaluate(pur, clf, "digits:test", tmp_path / "b", attack="bpda-eot", n_images=1)
    with pytest.raises(ValueError, match="method"):
        build_defense(dpf.load_score_model("digits"), method="nope")
    # another configuration in the same folder is refused, naming the option that differs
    kw = dict(n_images=1, attack_steps=0, n_eval=1, progress=False)
    evaluate(None, clf, "digits:test", tmp_path / "c", eps=0.1, **kw)
    with pytest.raises(ValueError, match="eps"):
        evaluate(None, clf, "digits:test", tmp_path / "c", eps=0.2, **kw)
    evaluate(None, clf, "digits:test", tmp_path / "c", eps=0.2, overwrite=True, **kw)
    p = _run(["eval", "--output", str(tmp_path / "d"), "--data", "nowhere.npz", "--quiet"])
    assert p.returncode == 2 and "nowhere.npz" in p.stderr and "Traceback" not in p.stderr


def test_data_sources(tmp_path):
    # CIFAR-10 python batches, read with the restricted unpickler
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing", b"data": data, b"labels": [0, 1, 2, 3, 9]}, f)
    src = load_data(f"cifar10:{tmp_path}")
    x, y = src.get([1, 4])
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 9]
    assert torch.equal(x[0], torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(ValueError, match="refusing"):
        read_cifar10_batch(tmp_path / "evil")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_data(f"cifar10:{tmp_path}:train")
    # .npz, .npy with labels, image folder by class, Dataset, tensors
    np.savez(tmp_path / "d.npz", x=data.reshape(5, 3, 32, 32), y=np.arange(5))
    assert load_data(str(tmp_path / "d.npz")).get([2])[1].tolist() == [2]
    np.save(tmp_path / "x.npy", np.full((2, 1, 4, 4), 0.5, np.float32))
    np.save(tmp_path / "y.npy", np.array([3, 4]))
    assert load_data(str(tmp_path / "x.npy"), labels=tmp_path / "y.npy").get([1])[1].tolist() == [4]
    with pytest.raises(ValueError, match="labels"):
        load_data(str(tmp_path / "x.npy"))
    from PIL import Image

    for label in (0, 7):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 30 * label, np.uint8)).save(tmp_path / "imgs" / str(label) / "a.png")
    src = load_data(str(tmp_path / "imgs"))
    assert len(src) == 2 and src.get([0, 1])[1].tolist() == [0, 7]
    ds = torch.utils.data.TensorDataset(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]))
    assert load_data(ds).get([2])[1].tolist() == [2]
    bad = load_data((torch.full((1, 1, 2, 2), 2.0), torch.tensor([0])))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        bad.get([0])


def test_classifier_sources(tmp_path):
    clf = dpf.load_classifier("digits")
    scripted = torch.jit.trace(clf, torch.rand(1, 1, 16, 16))
    scripted.save(str(tmp_path / "clf.pt"))
    x = torch.rand(2, 1, 16, 16)
    loaded = load_classifier_spec(str(tmp_path / "clf.pt"))
    torch.testing.assert_close(loaded(x), clf(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    m = load_classifier_spec("diffpure_fast.models.digits:load_digits_classifier")
    torch.testing.assert_close(m(x), clf(x))
    with pytest.raises(ValueError, match="cannot import"):
        load_classifier_spec("no_such_module_xyz:f")
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_classifier_spec("missing.pt")


def test_report_rebuild_needs_an_eval_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_report(tmp_path)


def test_cli_autoattack_native_takes_iterations_and_eot(tmp_path):
    # --attack-steps and --eot are AutoAttack's iterations and EOT draws in the native mode, recorded as used
    p = _run(["eval", "--attack", "autoattack", "--attack-steps", "2", "--eot", "2", "--n-images", "2", "--steps", "1",
              "--n-eval", "2", "--eps", "0.1", "--threads", "1", "--quiet", "--output", str(tmp_path / "aa")])
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "aa" / "report.json").read_text())
    ev = rep["configuration"]["eval"]
    assert (ev["attack_steps"], ev["eot"], ev["aa_mode"], ev["aa_version"]) == (2, 2, "native", "rand")
    assert "2 iterations, 2 EOT" in rep["attack"] and rep["not_attacked"]["count"] == 0
    p = _run(["eval", "--attack", "autoattack", "--loss", "dlr", "--output", str(tmp_path / "x"), "--quiet"])
    assert p.returncode == 2 and "loss" in p.stderr and "Traceback" not in p.stderr


def test_resume_with_other_score_weights_or_classifier_is_refused(tmp_path):
    # Issue 20's instance: the stored configuration named only the score model's class, so a rerun with another
    # checkpoint "resumed" the old model's records. Now the weights' fingerprint decides.
    kw = dict(n_images=1, attack_steps=0, n_eval=1, eps=0.1, progress=False)
    model = dpf.load_score_model("digits")
    pur = build_defense(model, grad_mode="full", steps=1, dt=None)
    evaluate(pur, "digits", "digits:test", tmp_path / "r", **kw)
    other = dpf.load_score_model("digits")
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="defense"):
        evaluate(build_defense(other, grad_mode="full", steps=1, dt=None), "digits", "digits:test", tmp_path / "r",
                 **kw)
    clf = dpf.load_classifier("digits")
    with torch.no_grad():
        next(clf.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="classifier"):
        evaluate(pur, clf, "digits:test", tmp_path / "r", **kw)
    evaluate(pur, "digits", "digits:test", tmp_path / "r", **kw)  # the same again resumes


def test_report_without_matplotlib_is_written_and_says_so(tmp_path, monkeypatch, capsys):
    """Issue 17: without matplotlib, evaluate computed everything and then died in the plots, with no report."""
    from diffpure_fast.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # matplotlib is not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    (tmp_path / "curve.png").write_bytes(b"an earlier run's plot")
    rep = evaluate(None, dpf.load_classifier("digits"), "digits:test", tmp_path, eps=0.1, attack_steps=1, eot=1,
                   n_eval=1, n_images=2, batch_size=2, progress=False)
    md = (tmp_path / "report.md").read_text()
    assert rep["n_samples"] == 2 and "Plots not written: matplotlib is not installed; pip install matplotlib" in md
    assert "curve.png" not in md and "grid.png" not in md and not (tmp_path / "curve.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["plots"]["skipped"].startswith("Plots not written")
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path), "--quiet"]) == 0       # the CLI too: the report, no traceback
    assert "Plots not written" in (tmp_path / "report.md").read_text() and capsys.readouterr().err == ""


def test_numpy_integers_are_integers_for_every_option(tmp_path):
    """Issue 17: one integer rule (NumPy integers accepted, bool and floats refused, never rounded) everywhere."""
    ints = dict(attack_steps=1, restarts=1, eot=1, n_eval=1, n_images=2, start=0, seed=0, batch_size=2, chunk_size=2,
                grid_images=0)
    a = EvalConfig(**ints)
    b = EvalConfig(**{k: np.int64(v) for k, v in ints.items()})
    assert a == b and all(type(getattr(b, k)) is int for k in ints)
    json.dumps(b.deciding())
    for k in ints:
        for bad in (True, float(ints[k]) + 0.0, 2.5):
            with pytest.raises((ValueError, TypeError), match=k):
                EvalConfig(**{**ints, k: bad})
    clf = dpf.load_classifier("digits")
    pur = build_defense(dpf.load_score_model("digits"), grad_mode="full", t_star=0.05, steps=np.int64(1),
                        surrogate_steps=np.int32(3))
    r1 = evaluate(pur, clf, "digits:test", tmp_path / "np", progress=False, eps=0.05,
                  **{k: np.int64(v) for k, v in ints.items()})
    pur = build_defense(dpf.load_score_model("digits"), grad_mode="full", t_star=0.05, steps=1, surrogate_steps=3)
    r2 = evaluate(pur, clf, "digits:test", tmp_path / "py", progress=False, eps=0.05, **ints)
    assert r1["robust"] == r2["robust"] and r1["configuration"] == r2["configuration"]
