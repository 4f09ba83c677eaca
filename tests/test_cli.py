"""The diffpure-fast CLI end to end: purify a folder / npz / tensor, one-line errors, info, a reduced demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffpure_fast as dpf
from diffpure_fast.cli import main
from diffpure_fast.models.digits import CLASSIFIER_WEIGHTS, SCORE_WEIGHTS

needs_weights = pytest.mark.skipif(not (SCORE_WEIGHTS.is_file() and CLASSIFIER_WEIGHTS.is_file()),
                                   reason="the digits weights are not shipped (python scripts/train_digits.py)")
FAST = ["--steps", "3", "--t-star", "0.05", "--no-progress"]


def _digits(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 16, 16), generator=g)


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_one_line_error(rc, err, match):
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match in err, err


@needs_weights
def test_purify_folder_of_pngs(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    x = (_digits(3) * 255).round().to(torch.uint8)
    for i in range(3):
        Image.fromarray(x[i, 0].numpy()).save(src / f"img{i}.png")
    rc, _, err = _run(["purify", "--model", "digits", "--input", src, "--output", tmp_path / "out", *FAST], capsys)
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["img0.png", "img1.png", "img2.png"]
    with Image.open(tmp_path / "out" / "img1.png") as im:
        assert im.mode == "L" and im.size == (16, 16)


@needs_weights
def test_purify_npz_matches_the_python_api_and_keeps_key_and_dtype(tmp_path, capsys):
    x = _digits(5)
    np.savez(tmp_path / "in.npz", x=x.numpy())
    rc, _, err = _run(["purify", "--model", "digits", "--input", tmp_path / "in.npz", "--output",
                       tmp_path / "out.npz", "--batch-size", "2", *FAST], capsys)
    assert rc == 0, err
    with np.load(tmp_path / "out.npz") as z:
        assert list(z.keys()) == ["x"] and z["x"].dtype == np.float32 and z["x"].shape == (5, 1, 16, 16)
        got = torch.from_numpy(z["x"])
    # Batches of 2 in the CLI, one batch here: a sample's noise depends on its index only.
    model = dpf.load_score_model("digits")
    ref = dpf.purify(x, model, t_star=0.05, steps=3, dt=None, seed=0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@needs_weights
def test_purify_uint8_tensor_round_trips_as_uint8(tmp_path, capsys):
    torch.save((_digits(2) * 255).to(torch.uint8), tmp_path / "in.pt")
    rc, _, err = _run(["purify", "--model", "digits", "--input", tmp_path / "in.pt", "--output",
                       tmp_path / "out.pt", *FAST], capsys)
    assert rc == 0, err
    out = torch.load(tmp_path / "out.pt")
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 16, 16)


@needs_weights
def test_purify_errors_are_one_line(tmp_path, capsys):
    np.save(tmp_path / "rank3.npy", np.zeros((2, 16, 16), np.float32))
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 16, 16), np.float32))
    np.save(tmp_path / "small.npy", np.zeros((2, 1, 8, 8), np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((2, 1, 16, 16), np.float32))
    np.save(tmp_path / "exists.npy", np.zeros(1))
    (tmp_path / "broken.pt").write_bytes(b"not a tensor")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.png").write_bytes(b"nope")
    torch.save({"input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "adm.pt")
    base = ["purify", "--model", "digits", *FAST]
    cases = [
        (["--input", tmp_path / "missing.npy", "--output", tmp_path / "o.npy"], "no such file"),
        (["--input", tmp_path / "rank3.npy", "--output", tmp_path / "o.npy"], "(N, C, H, W)"),
        (["--input", tmp_path / "rgb.npy", "--output", tmp_path / "o.npy"], "takes 1 channels"),
        (["--input", tmp_path / "small.npy", "--output", tmp_path / "o.npy"], "16x16"),
        (["--input", tmp_path / "ok.npy", "--output", tmp_path / "exists.npy"], "--overwrite"),
        (["--input", tmp_path / "ok.npy", "--output", tmp_path / "o.pt"], "must be one too"),
        (["--input", tmp_path / "broken.pt", "--output", tmp_path / "o.pt"], "not a readable"),
        (["--input", tmp_path / "imgs", "--output", tmp_path / "o"], "takes 1 channels"),
        (["--input", tmp_path / "bad", "--output", tmp_path / "o2"], "not a readable image"),
    ]
    for extra, match in cases:
        rc, _, err = _run(base + extra, capsys)
        _assert_one_line_error(rc, err, match)
    rc, _, err = _run(["purify", "--model", "score_sde", "--input", tmp_path / "ok.npy", "--output",
                       tmp_path / "o.npy"], capsys)
    _assert_one_line_error(rc, err, "--checkpoint")
    rc, _, err = _run(["purify", "--model", "score_sde", "--checkpoint", tmp_path / "adm.pt", "--input",
                       tmp_path / "ok.npy", "--output", tmp_path / "o.npy"], capsys)
    assert rc == 2 and "Traceback" not in err and "guided" in err.lower(), err


def test_info_json(capsys):
    rc, out, _ = _run(["info", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["active_implementation"]["cpu"] in ("cpp", "reference")


def test_every_option_has_help():
    from diffpure_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


@needs_weights
def test_reduced_demo_report_is_consistent(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", out, "--n-images", "6", "--adaptive-images", "4", "--steps", "3", "--t-star", "0.05",
            "--pgd-steps", "2", "--adaptive-steps", "1", "--eot", "2", "--batch-size", "4", "--guided-images", "2",
            "--guided-eot", "1", "--n-eval", "2", "--ode-images", "3"]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and (out / "grid.png").is_file()
    r, s = report["results"], report["settings"]
    for key in ("clean_undefended", "clean_defended", "pgd_undefended", "pgd_transfer_defended", "adaptive_defended"):
        a = r[key].get("single_shot", r[key])
        assert 0 <= a["correct"] <= a["total"] and a["wilson95"][0] <= a["accuracy"] <= a["wilson95"][1]
    ad = r["adaptive_defended"]
    assert ad["single_shot"]["total"] == 4 and r["clean_undefended"]["total"] == 6
    assert ad["worst_of_n"]["correct"] <= ad["single_shot"]["correct"] and ad["mean"]["total"] == 4 * s["n_eval"]
    assert r["linf_check"]["pgd"] <= s["eps"] + 1e-6 and r["linf_check"]["adaptive"] <= s["eps"] + 1e-6
    # The ODE against the SDE on the first 3 images: the SDE's rows are its main rows' first 3 images.
    ode = r["ode_vs_sde"]
    assert ode["images"] == 3 and ode["settings"]["diffusion_type"] == "ode"
    for kind in ("sde", "ode"):
        assert ode[kind]["clean_defended"]["total"] == 3 and ode[kind]["adaptive"]["single_shot"]["total"] == 3
        assert ode[kind]["adaptive"]["linf"] <= s["eps"] + 1e-6
    assert ode["sde"]["adaptive"]["single_shot"]["correct"] <= ad["single_shot"]["correct"]
    assert "## Noise injection: the probability-flow ODE" in (out / "report.md").read_text()
    # One section per guided method, every adaptive row within the budget.
    from diffpure_fast.demo import GUIDED_ATTACKS

    assert set(r["guided"]) == set(GUIDED_ATTACKS)
    for method, g in r["guided"].items():
        assert g["clean_defended"]["total"] == 2
        for key, _ in GUIDED_ATTACKS[method]:
            a = g[f"adaptive_{key}"]
            assert a["single_shot"]["total"] == 2 and a["linf"] <= s["eps"] + 1e-6
        assert f"## {method}" in (out / "report.md").read_text()
    # Defended clean accuracy is the classifier's accuracy on purified images: recompute it.
    from diffpure_fast.data import load_digits_dataset

    x, y = load_digits_dataset("test")
    x = x[:6]
    model, clf = dpf.load_score_model("digits"), dpf.load_classifier("digits")
    # One batch here, batches of 4 in the demo: the noise follows the image index, so the result is the same.
    pur = dpf.purify(x, model, t_star=0.05, steps=3, dt=None, seed=report["seeds"]["purify_clean"])
    with torch.no_grad():
        correct = int((clf(pur).argmax(1) == y[:6]).sum())
    assert correct == r["clean_defended"]["correct"]
    assert "Wilson" in (out / "report.md").read_text() and "report.md" in stdout
    # An existing report is not overwritten without --overwrite.
    rc, _, err = _run(argv, capsys)
    _assert_one_line_error(rc, err, "--overwrite")


def test_wilson_interval_known_values():
    from diffpure_fast.eval import wilson_interval

    # Reference values: Wilson score interval, z = 1.96 (e.g. Newcombe 1998, table I: 81/263 -> 0.2553, 0.3662).
    lo, hi = wilson_interval(81, 263)
    assert abs(lo - 0.2553) < 5e-4 and abs(hi - 0.3662) < 5e-4
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="correct, total"):
        wilson_interval(3, 2)


@needs_weights
def test_purify_with_a_guided_method_matches_the_python_api(tmp_path, capsys):
    x = _digits(2)
    torch.save(x, tmp_path / "in.pt")
    rc, _, err = _run(["purify", "--model", "digits", "--method", "mimic", "--input", tmp_path / "in.pt",
                       "--output", tmp_path / "out.pt", "--seed", "3", "--no-progress"], capsys)
    assert rc == 0, err
    ref = dpf.purify(x, dpf.load_score_model("digits"), method="mimic", seed=3)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), ref, atol=1e-6)
    # DiffPure's options with another method: a one-line error naming the option.
    rc, _, err = _run(["purify", "--model", "digits", "--method", "gdmp", "--input", tmp_path / "in.pt",
                       "--output", tmp_path / "out2.pt", "--t-star", "0.2"], capsys)
    _assert_one_line_error(rc, err, "--t-star")
