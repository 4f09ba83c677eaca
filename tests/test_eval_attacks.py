"""The attack suite through the harness (``eval.attacks``): every attack from the API and the CLI with records and a
report naming its attack, gradient, noise mode and bound; fixed-noise mode by the noise the purifier receives;
targeted runs over the top-k classes; the study folder's combined report."""

from __future__ import annotations

import json

import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.attacks import DefendedClassifier
from diffpure_fast.attacks.randomness import derive_seed, eot_noise_ids
from diffpure_fast.eval.attacks import ATTACKS
from diffpure_fast.eval.datasets import load_data
from diffpure_fast.eval.defenses import build_defense
from diffpure_fast.eval.harness import EvalConfig, evaluate, evaluate_batch
from diffpure_fast.eval.records import read_records

TINY = dict(attack_steps=2, eot=2, n_eval=2, n_images=2, batch_size=2, progress=False)
OWN = {"diffattack": dict(eps=0.1), "diffhammer": dict(eps=0.1, restarts=1), "lf": dict(lpips="digits", bound=1.0),
       "ppgd": dict(lpips="digits", bound=1.0), "stadv": dict(bound=0.05), "apgd-eot": dict(eps=0.1),
       "pgd-eot": dict(eps=0.1)}


class RecordingPurifier(dpf.Purifier):
    """A Purifier that records (seed, noise ids) of every purification it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def forward(self, x, *, noise_ids=None):
        self.calls.append((self.seed, tuple(noise_ids.tolist())))
        return super().forward(x, noise_ids=noise_ids)

    def trajectory(self, x, *, noise_ids=None, every=1):
        self.calls.append((self.seed, tuple(noise_ids.tolist())))
        return super().trajectory(x, noise_ids=noise_ids, every=every)


@pytest.fixture(scope="module")
def digits():
    x, y = load_data("digits:test").get([0, 1])
    return x, y, dpf.load_score_model("digits"), dpf.load_classifier("digits")


@pytest.mark.parametrize("attack", ["pgd-eot", "apgd-eot", "diffattack", "diffhammer", "lf", "ppgd", "stadv"])
def test_fixed_noise_one_set_of_draws_for_the_attack_fresh_for_the_judge(digits, attack, one_thread):
    # Every purification the attack runs uses the one fixed seed and the noise ids of the eot draws of its samples;
    # the selection and the judge run with seeds the attack never used.
    x, y, model, clf = digits
    pur = RecordingPurifier(model, grad_mode="full", t_star=0.1, steps=1, dt=None)
    cfg = EvalConfig(attack=attack, fixed_noise=True, attack_steps=2, eot=2, n_eval=2, seed=7, **OWN[attack])
    ids = torch.tensor([4, 9])
    recs = evaluate_batch(DefendedClassifier(pur, clf), x, y, ids, cfg)
    fixed = derive_seed(7, "fixed-noise")
    judge = {derive_seed(7, "eval", e) for e in range(2)}
    select = {derive_seed(7, "select", e) for e in range(2)}
    attack_calls = [c for c in pur.calls if c[0] not in judge | select]
    assert attack_calls and {s for s, _ in attack_calls} == {fixed}
    draws = {(s, i) for s, batch in attack_calls for i in batch}
    assert draws == {(fixed, int(i)) for i in eot_noise_ids(ids, 2)}   # one fixed set of eot draws per sample
    assert fixed not in judge | select and all(r["seeds"]["fixed_noise"] == fixed for r in recs)
    assert [c for c in pur.calls if c[0] in judge][-2:] == [(s, (4, 9)) for s in sorted(judge, key=lambda s: [
        derive_seed(7, "eval", e) for e in range(2)].index(s))]
    # without it, every step of the attack draws its own noise
    pur.calls.clear()
    evaluate_batch(DefendedClassifier(pur, clf), x, y, ids, EvalConfig(attack=attack, attack_steps=2, eot=2, n_eval=2,
                                                                         seed=7, **OWN[attack]))
    seeds = {s for s, _ in pur.calls if s not in judge | select}
    assert fixed not in seeds and len(seeds) >= 3


@pytest.mark.parametrize("attack", ["diffattack", "diffhammer", "lf", "ppgd", "stadv"])
def test_each_attack_through_the_api_records_and_report(tmp_path, digits, attack, one_thread):
    _, _, model, _ = digits
    pur = build_defense(model, grad_mode="full", t_star=0.1, steps=1, dt=None)
    rep = evaluate(pur, "digits", "digits:test", tmp_path / attack, attack=attack, **TINY, **OWN[attack])
    recs = list(read_records(tmp_path / attack).values())
    assert rep["n_samples"] == 2 and rep["not_attacked"]["count"] == 0 and rep["warnings"] == []
    assert rep["attack"].startswith(attack) and "grad_mode='full'" in rep["gradient"] and "fresh" in rep["noise"]
    assert len(rep["attack_curve"]) == 3 and all(r["linf"] > 0 for r in recs)
    md = (tmp_path / attack / "report.md").read_text()
    assert f"Bound: {rep['bound']}" in md
    if attack in ("lf", "ppgd"):
        assert "LPIPS" in rep["bound"] and "no L-p bound" in rep["bound"]
        assert all(0 < r["lpips"] <= 1.0 for r in recs) and rep["perturbation"]["max_lpips"] <= 1.0
    elif attack == "stadv":
        assert "flow" in rep["bound"] and all(0 < r["flow_linf"] <= 0.05 for r in recs)
    else:
        assert rep["bound"] == "linf eps = 0.1" and all(r["linf"] <= 0.1 + 1e-6 for r in recs)


def test_targeted_runs_over_the_top_k_classes(tmp_path, digits, one_thread):
    _, _, model, _ = digits
    pur = build_defense(model, grad_mode="full", t_star=0.1, steps=1, dt=None)
    rep = evaluate(pur, "digits", "digits:test", tmp_path / "t", attack="apgd-eot", loss="dlr-targeted", n_targets=2,
                   eps=0.1, **TINY)
    recs = list(read_records(tmp_path / "t").values())
    assert all(set(r["selection"]) == {"apgd-eot:t1", "apgd-eot:t2"} for r in recs)
    assert "over the top 2 target classes" in rep["attack"] and rep["configuration"]["eval"]["n_targets"] == 2
    assert len(recs[0]["attack_pred_trace"]) == 2
    # more targets than K - 1 = 9 classes is an error naming the option, not a cap
    with pytest.raises(ValueError, match="n_targets: 10 target classes .* at most K - 1 = 9"):
        evaluate(pur, "digits", "digits:test", tmp_path / "t10", attack="pgd-eot", loss="cw-targeted", n_targets=10,
                 eps=0.1, **TINY)


def test_attack_options_refused_and_defaults():
    for kw, name in ((dict(attack="apgd-eot", n_targets=3), "n_targets"),
                     (dict(attack="stadv", eps=0.1), "eps"), (dict(attack="lf", norm="l2"), "norm"),
                     (dict(attack="lf"), "lpips"), (dict(attack="pgd-eot", bound=0.5), "bound"),
                     (dict(attack="diffhammer", dev_weight=1.0), "dev_weight"),
                     (dict(attack="autoattack", fixed_noise=True), "fixed_noise"),
                     (dict(attack="autoattack", loss="dlr-targeted"), "loss"),
                     (dict(attack="stadv", attack_steps=0), "attack_steps"),
                     (dict(attack="diffattack", dev_every=0), "dev_every"),
                     (dict(attack="apgd-eot", loss="dlr-targeted", n_targets=0), "n_targets")):
        with pytest.raises(ValueError, match=name):
            EvalConfig(**kw)
    assert set(ATTACKS) >= {"pgd-eot", "apgd-eot", "diffattack", "diffhammer", "lf", "ppgd", "stadv"}
    cfg = EvalConfig(attack="stadv")
    assert (cfg.bound, cfg.attack_steps, cfg.eot, cfg.loss, cfg.eps, cfg.norm, cfg.fixed_noise) == (
        0.05, 100, 20, "cw", None, None, False)
    d = EvalConfig(attack="pgd-eot").deciding()
    assert "fixed_noise" not in d and "n_targets" not in d and d["eps"] == 8 / 255   # earlier folders still resume
    assert EvalConfig(attack="apgd-eot", loss="dlr-targeted").n_targets == 9
    assert EvalConfig(attack="diffattack", fixed_noise=True).deciding()["fixed_noise"] is True


def test_cli_attacks_and_the_study_report(tmp_path, capsys, one_thread):
    # Two attacks from the command line (in-process: main() is what the console script runs) into one study folder,
    # then `diffpure-fast report STUDY`: one table row per evaluation and every curve on one plot.
    from diffpure_fast.cli import main

    base = ["eval", "--n-images", "2", "--steps", "1", "--attack-steps", "2", "--eot", "2", "--n-eval", "2", "--quiet"]
    for name, extra in (("diffhammer", ["--attack", "diffhammer", "--restarts", "1", "--eps", "0.1",
                                        "--fixed-noise"]),
                        ("stadv", ["--attack", "stadv", "--bound", "0.05", "--loss", "cw-targeted", "--n-targets",
                                   "1"])):
        assert main(base + extra + ["--output", str(tmp_path / "study" / name)]) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "study" / "diffhammer" / "report.json").read_text())
    assert "FIXED" in rep["noise"] and rep["configuration"]["eval"]["fixed_noise"] is True
    (tmp_path / "study" / "running").mkdir()   # an evaluation that has written its configuration, no sample yet
    (tmp_path / "study" / "running" / "config.json").write_text(
        (tmp_path / "study" / "stadv" / "config.json").read_text())
    assert main(["report", str(tmp_path / "study"), "--quiet"]) == 0
    assert "No finished samples yet in: running." in (tmp_path / "study" / "report.md").read_text()
    md = (tmp_path / "study" / "report.md").read_text()
    assert "| diffhammer | diffpure | diffhammer | fixed | linf eps = 0.1 | 2 |" in md
    assert "| stadv | diffpure | stadv | fresh | spatial: flow field" in md
    assert (tmp_path / "study" / "curve.png").is_file()
    study = json.loads((tmp_path / "study" / "report.json").read_text())
    assert [r["folder"] for r in study["evaluations"]] == ["diffhammer", "stadv"]
    capsys.readouterr()
    # the new options' errors name their flags on the command line
    for args, flag in ((["--attack", "lf"], "--lpips:"),
                       (["--attack", "stadv", "--attack-steps", "0"], "--attack-steps:"),
                       (["--attack", "apgd-eot", "--n-targets", "3"], "--n-targets:"),
                       (["--attack", "diffattack", "--dev-weight", "-1"], "--dev-weight:"),
                       (["--attack", "pgd-eot", "--bound", "0.5"], "--bound:")):
        assert main(["eval", *args, "--output", str(tmp_path / "x"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert flag in err and "_" not in err.split(":")[0], (args, err)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no config.json" in capsys.readouterr().err
