"""The diffpure-fast CLI end to end: purify a folder / npz / tensor, one-line errors, info, a reduced demo."""

from __future__ import annotations

import json
import sys

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
    # the images' size is checked against the config before the checkpoint is read
    rc, _, err = _run(["purify", "--model", "score_sde", "--checkpoint", tmp_path / "adm.pt", "--input",
                       tmp_path / "ok.npy", "--output", tmp_path / "o.npy"], capsys)
    _assert_one_line_error(rc, err, "images of 16x16, but --model score_sde is configured for 32x32; pass --resize")
    np.save(tmp_path / "c32.npy", np.zeros((1, 3, 32, 32), np.float32))
    rc, _, err = _run(["purify", "--model", "score_sde", "--checkpoint", tmp_path / "adm.pt", "--input",
                       tmp_path / "c32.npy", "--output", tmp_path / "o.npy"], capsys)
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


# ------------------------------------------------------------------------------- issue 17: errors in CLI words
def _api_keywords() -> set[str]:
    """Every keyword of the Python API whose name differs from its CLI flag: these must never appear in a CLI
    error (the flag, or a remedy that exists on the command line, must)."""
    from dataclasses import fields

    from diffpure_fast.demo import DemoConfig
    from diffpure_fast.eval.harness import EvalConfig
    from diffpure_fast.methods import METHODS

    names = {f.name for f in fields(dpf.PurifyConfig)} | {f.name for f in fields(EvalConfig)}
    names |= {f.name for f in fields(DemoConfig)}
    for m in METHODS.values():
        names |= set(m.Options.names())
    names |= {"family", "trust_checkpoint", "checkpoint", "classifier", "auxiliary", "data", "labels", "defense",
              "output", "overwrite", "noise_ids", "x"}
    return {n for n in names if "_" in n} | {"family=", "grad_mode=", "x:", "method="}


@needs_weights
def test_purify_float_images_in_0_255_name_the_cli_flag(tmp_path, capsys):
    x = _digits(2) * 255
    np.save(tmp_path / "in.npy", x.numpy())
    rc, _, err = _run(["purify", "--model", "digits", "--input", tmp_path / "in.npy", "--output", tmp_path / "o.npy",
                       *FAST], capsys)
    _assert_one_line_error(rc, err, "--value-range")
    assert "value_range" not in err and str(tmp_path / "in.npy") in err, err
    # the remedy exists: --value-range 0 255 purifies them in that range, as the API's value_range=(0, 255)
    rc, _, err = _run(["purify", "--model", "digits", "--input", tmp_path / "in.npy", "--output", tmp_path / "o.npy",
                       "--value-range", "0", "255", *FAST], capsys)
    assert rc == 0, err
    ref = dpf.purify(x, dpf.load_score_model("digits"), t_star=0.05, steps=3, seed=0, value_range=(0, 255))
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "o.npy")), ref, rtol=0, atol=1e-3)
    # the API names its own keyword
    with pytest.raises(ValueError, match=r"x: values must lie in value_range .*pass value_range"):
        dpf.purify(x, dpf.load_score_model("digits"), t_star=0.05, steps=3)


@needs_weights
@pytest.mark.parametrize("argv, flag", [
    (["purify", "--t-star", "0"], "--t-star"),
    (["purify", "--t-star", "0.0001"], "--t-star"),
    (["purify", "--steps", "0"], "--steps"),
    (["purify", "--steps", "200", "--solver", "ddpm", "--t-star", "0.1"], "--steps"),
    (["purify", "--solver", "ddpm", "--dt", "0.01"], "--dt"),
    (["purify", "--method", "agdm", "--guidance-scale", "-1"], "--guidance-scale"),
    (["purify", "--method", "agdm", "--auxiliary", "nowhere.pt"], "--auxiliary"),
    (["purify", "--model", "guided_diffusion", "--checkpoint", "nowhere.pt"], "--checkpoint"),
    # inputs of the configured size: a wrong size is refused before the checkpoint is read
    (["purify", "--model", "score_sde", "--checkpoint", "{adm}", "--input", "{c32}"], "use --model guided_diffusion"),
    (["purify", "--model", "guided_diffusion", "--checkpoint", "{evil}", "--input", "{c256}"], "--trust-checkpoint"),
    (["purify", "--value-range", "1", "0"], "--value-range"),
    (["purify", "--input", "{u8}", "--value-range", "0", "255"], "--value-range"),
    (["eval", "--attack-steps", "-1"], "--attack-steps"),
    (["eval", "--steps", "0"], "--steps"),
    (["eval", "--eot", "0"], "--eot"),
    (["eval", "--eps", "8"], "--eps"),
    (["eval", "--n-images", "100000"], "--n-images"),
    (["eval", "--start", "100000"], "--start"),
    (["eval", "--attack", "bpda-eot", "--grad-mode", "full"], "--grad-mode bpda"),
    (["eval", "--grad-mode", "surrogate", "--surrogate-steps", "50", "--t-star", "0.02"], "--surrogate-steps"),
    (["eval", "--grad-mode", "adjoint", "--steps", "3"], "--grad-mode"),
    (["eval", "--method", "gdmp", "--guidance-grad", "straight_through"], "--guidance-grad"),
    (["eval", "--classifier", "nowhere.pt"], "--classifier"),
    (["eval", "--data", "nowhere.npz"], "--data"),
    (["eval", "--data", "{u8}"], "--labels"),
    (["eval", "--output", "{prev}", "--eps", "0.2"], "--overwrite"),
    (["demo", "--adaptive-images", "0"], "--adaptive-images"),
    (["demo", "--n-images", "10", "--guided-images", "11"], "--guided-images"),
    (["demo", "--n-images", "5000"], "--n-images"),
    (["demo", "--eot", "0"], "--eot"),
    (["demo", "--t-star", "2"], "--t-star"),
    (["demo", "--full-steps", "--dt", "0.002"], "--full-steps"),
    (["report", "{tmp}"], "config.json"),
])
def test_cli_errors_name_flags_never_api_keywords(tmp_path, capsys, argv, flag):
    torch.save(create_adm_state_dict(), tmp_path / "adm.pt")
    np.save(tmp_path / "u8.npy", np.zeros((1, 1, 16, 16), np.uint8))
    np.save(tmp_path / "ok.npy", np.zeros((1, 1, 16, 16), np.float32))
    np.save(tmp_path / "c32.npy", np.zeros((1, 3, 32, 32), np.float32))
    np.save(tmp_path / "c256.npy", np.zeros((1, 3, 256, 256), np.float32))
    torch.save({"step": _Evil()}, tmp_path / "evil.pt")
    prev = tmp_path / "prev"
    if "{prev}" in argv:
        assert main(["eval", "--output", str(prev), "--n-images", "1", "--steps", "1", "--attack-steps", "0",
                     "--eot", "1", "--n-eval", "1", "--eps", "0.1", "--quiet"]) == 0
        capsys.readouterr()
    subs = {"{adm}": tmp_path / "adm.pt", "{evil}": tmp_path / "evil.pt", "{u8}": tmp_path / "u8.npy",
            "{c32}": tmp_path / "c32.npy", "{c256}": tmp_path / "c256.npy",
            "{prev}": prev, "{tmp}": tmp_path}
    argv = [str(subs.get(a, a)) for a in argv]
    command = argv[0]
    if command == "purify":
        if "--model" not in argv:
            argv += ["--model", "digits"]
        if "--input" not in argv:
            argv += ["--input", str(tmp_path / "ok.npy")]
        argv += ["--output", str(tmp_path / "o.npy"), "--no-progress"]
    elif command == "eval":
        if "--output" not in argv:
            argv += ["--output", str(tmp_path / "e")]
        argv += ["--n-images", "1", "--quiet"] if "--n-images" not in argv else ["--quiet"]
    elif command == "demo":
        argv += ["--output", str(tmp_path / "d")]
    rc, _, err = _run(argv, capsys)
    _assert_one_line_error(rc, err, flag)
    words = set(err.replace("(", " ").replace(")", " ").replace(",", " ").replace(";", " ").split())
    leaked = {k for k in _api_keywords() if k in words or (k.endswith(("=", ":")) and k in err)}
    assert not leaked and "Python API option" not in err, (leaked, err)


class _Evil:
    def __reduce__(self):
        return (print, ("never printed",))


def create_adm_state_dict():
    from diffpure_fast.models import create_adm_model

    return create_adm_model({"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                             "attention_resolutions": "8", "num_head_channels": 16, "learn_sigma": True,
                             "use_fp16": False}).state_dict()


def test_missing_optional_packages_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from diffpure_fast.data import digits as digits_data

    digits_data._split_indices.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)             # scikit-learn is not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    rc, _, err = _run(["eval", "--output", tmp_path / "e", "--n-images", "1", "--quiet"], capsys)
    _assert_one_line_error(rc, err, "scikit-learn")
    assert "pip install scikit-learn" in err and "ModuleNotFoundError" not in err
    monkeypatch.setitem(sys.modules, "PIL", None)                 # Pillow is not installed
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")   # an image is listed; reading it needs Pillow
    rc, _, err = _run(["purify", "--model", "digits", "--input", tmp_path / "imgs", "--output", tmp_path / "o",
                       "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "pip install pillow")
    digits_data._split_indices.cache_clear()
    # a forced kernel implementation that cannot run here fails before the work, not at the first solver step
    from diffpure_fast import ops

    monkeypatch.setattr(ops, "forced_impl", lambda: "triton")
    monkeypatch.setattr(ops, "available", lambda name: False)
    rc, _, err = _run(["purify", "--model", "digits", "--input", tmp_path / "imgs", "--output", tmp_path / "o"],
                      capsys)
    _assert_one_line_error(rc, err, "DIFFPURE_FAST_IMPL=triton: that implementation is not available")


@needs_weights
def test_demo_options_are_honoured(tmp_path, capsys, monkeypatch):
    """--dt was dropped (the demo ran dt = 1e-3) and --adaptive-images 0 meant all images."""
    import diffpure_fast.demo as demo

    seen = {}

    def fake_run_demo(output, cfg, **kw):
        seen["cfg"] = cfg
        (tmp_path / "report.md").write_text("ok")
        return {"timings_s": {"total": 0.0}}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    rc, _, err = _run(["demo", "--output", tmp_path, "--dt", "0.005", "--adaptive-images", "7"], capsys)
    assert rc == 0, err
    cfg = seen["cfg"]
    assert cfg.purify_kwargs == {"t_star": 0.1, "steps": None, "dt": 0.005} and cfg.adaptive_images == 7
    rc, _, err = _run(["demo", "--output", tmp_path, "--full-steps"], capsys)
    assert rc == 0 and seen["cfg"].purify_kwargs["dt"] == 1e-3 and seen["cfg"].purify_kwargs["steps"] is None
