"""Issue 20's command-line and output fixes: one model rule for purify and eval, defaults that fit only the digits
model, --method in eval (--defense deprecated), the model's own t*, help text, conformance on the CLI, records
without a duplicate, saved adversarial images, the plots' content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.cli import BATCH_SIZE, build_parser, main
from diffpure_fast.eval.datasets import load_data
from diffpure_fast.eval.records import read_adversarial
from diffpure_fast.models import create_adm_model, load_score_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "conformance"
ADM_SMALL = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
             "attention_resolutions": "8", "num_head_channels": 16, "learn_sigma": True, "class_cond": False,
             "resblock_updown": True, "use_scale_shift_norm": True, "diffusion_steps": 1000,
             "noise_schedule": "linear"}


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_checkpoint_without_model_names_model(capsys, tmp_path):
    ckpt = tmp_path / "checkpoint_8.pth"
    ckpt.write_bytes(b"not read")
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(ckpt), "--output", str(out)]) == 2
    err = _err(capsys)
    assert "--model: which family is --checkpoint" in err and "score_sde" in err
    assert not out.exists()
    assert main(["purify", "--checkpoint", str(ckpt), "--input", "x.npy", "--output", "y.npy"]) == 2
    assert "--model: which family is --checkpoint" in _err(capsys)


@pytest.mark.parametrize("missing, given", [("--classifier", ["--data", "digits:test"]),
                                            ("--data", ["--classifier", "digits"])])
def test_eval_digits_defaults_only_for_the_digits_model(capsys, tmp_path, missing, given):
    ckpt = tmp_path / "checkpoint_8.pth"
    ckpt.write_bytes(b"not read")
    out = tmp_path / "out"
    assert main(["eval", "--model", "score_sde", "--checkpoint", str(ckpt), *given, "--output", str(out)]) == 2
    assert _err(capsys).startswith(f"diffpure-fast eval: error: {missing}: required with --model score_sde")
    assert not out.exists()   # nothing written: the corrected command starts clean


def test_purify_without_model_uses_digits(tmp_path):
    x = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["purify", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--steps", "2",
                 "--no-progress"]) == 0
    y = np.load(tmp_path / "y.npy")
    ref = dpf.purify(torch.from_numpy(x), dpf.load_score_model("digits"), steps=2, seed=0, noise_ids=torch.arange(2))
    np.testing.assert_allclose(y, ref.numpy(), rtol=0, atol=1e-6)


def test_eval_method_flag_and_deprecated_defense(capsys):
    p = build_parser()
    assert p.parse_args(["eval", "--method", "gdmp", "--output", "o"]).method == "gdmp"
    capsys.readouterr()
    assert p.parse_args(["eval", "--defense", "none", "--output", "o"]).method == "none"
    assert "--defense is deprecated" in _err(capsys)
    # one batch size for purify and eval
    assert p.parse_args(["eval", "--output", "o"]).batch_size == BATCH_SIZE
    assert p.parse_args(["purify", "--input", "i", "--output", "o"]).batch_size == BATCH_SIZE == 16


def _subparser_help(name: str) -> str:
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name].format_help()


@pytest.mark.parametrize("name", ["demo", "eval"])
def test_help_says_95_percent_once(name):
    text = _subparser_help(name)
    assert "95% Wilson" in text and "%%" not in text


def test_eval_help_eps_and_t_star():
    text = " ".join(_subparser_help("eval").split())
    assert "a fraction such as 4/255 (default 8/255)" in text
    assert "0.15 for guided_diffusion" in text


def test_model_default_t_star():
    """DiffPure's t* follows the model (ImageNet's ADM 0.15, CIFAR-10 0.1); an explicit one, another runner's own
    default and other methods are left alone; the value used is the config's."""
    net = create_adm_model(ADM_SMALL).eval()
    adm = load_score_model("guided_diffusion", net.state_dict(), ADM_SMALL)
    assert adm.default_t_star == 0.15
    assert dpf.Purifier(adm).config.options.t_star == 0.15
    assert dpf.Purifier(adm, t_star=0.1).config.options.t_star == 0.1
    assert dpf.Purifier(adm, diffusion_type="ddpm").config.options.t_star == 0.15
    assert dpf.Purifier(adm, diffusion_type="celebahq-ddpm").config.options.t_star == 0.5
    digits = dpf.load_score_model("digits")
    assert digits.default_t_star is None and dpf.Purifier(digits).config.options.t_star == 0.1
    # purify applies the same default: identical output to an explicit t_star=0.15
    x = torch.rand(1, 3, 16, 16)
    a = dpf.purify(x, adm, steps=2, seed=3)
    b = dpf.purify(x, adm, steps=2, seed=3, t_star=0.15)
    assert torch.equal(a, b)


@pytest.mark.skipif(not (SHARED / "adm_small.pt").is_file(), reason="shared conformance vectors not present")
def test_conformance_subcommand_with_threads(capsys):
    n = torch.get_num_threads()
    try:
        assert main(["conformance", "--threads", "1", "--no-purify", str(SHARED / "adm_small.pt")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "score_call.expected_model_output" in out and " ok" in out and "FAIL" not in out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_eval_records_once_saved_adversarials_and_plots(tmp_path):
    """One records file for one process (no merged duplicate), every judged image saved with
    --save-adversarial (equal to what the records measured), and the plots drawn with their labels."""
    out = tmp_path / "ev"
    args = ["eval", "--n-images", "3", "--batch-size", "2", "--steps", "1", "--t-star", "0.05", "--attack-steps", "2",
            "--eot", "1", "--n-eval", "2", "--eps", "0.1", "--quiet", "--save-adversarial", "--output", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("records*.jsonl")) == ["records-000.jsonl"]
    recs = [json.loads(line) for line in (out / "records-000.jsonl").read_text().splitlines()]
    adv = read_adversarial(out)
    assert adv["index"].tolist() == [0, 1, 2] and adv["x_adv"].shape == (3, 1, 16, 16)
    assert adv["label"].tolist() == [r["label"] for r in recs]
    x = load_data("digits:test").get([0, 1, 2])[0].numpy()
    linf = np.abs(adv["x_adv"] - x).reshape(3, -1).max(axis=1)
    np.testing.assert_allclose(linf, [r["linf"] for r in recs], rtol=0, atol=1e-6)
    w, h = _png_size(out / "curve.png")
    assert w >= 600 and h >= 400
    w, h = _png_size(out / "grid.png")
    assert w > 200 and h > 300   # three rows with titles and labels
    # the undefended classifier's grid has no purified row
    out2 = tmp_path / "none"
    assert main(["eval", "--method", "none", "--n-images", "2", "--attack-steps", "1", "--eot", "1", "--n-eval", "1",
                 "--eps", "0.1", "--quiet", "--output", str(out2)]) == 0
    assert _png_size(out2 / "grid.png")[1] < _png_size(out / "grid.png")[1]


def test_failed_start_leaves_a_folder_the_corrected_command_resumes(tmp_path, capsys):
    """A classifier that does not fit the data is refused before anything is written; a folder whose earlier run
    finished no sample (a config.json, no records) takes the corrected configuration."""
    out = tmp_path / "ev"
    bad = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval())
    bad.save(str(tmp_path / "cifar_clf.pt"))
    base = ["eval", "--n-images", "1", "--steps", "1", "--t-star", "0.05", "--attack-steps", "1", "--eot", "1",
            "--n-eval", "1", "--eps", "0.1", "--quiet", "--output", str(out)]
    assert main([*base, "--classifier", str(tmp_path / "cifar_clf.pt")]) == 2
    assert "--classifier: fails on digits" in _err(capsys)
    assert not (out / "config.json").exists()
    # an earlier run that died before its first sample: its config.json alone does not block the corrected run
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({"eval": {"attack": "something else"}}))
    assert main(base) == 0
    assert json.loads((out / "config.json").read_text())["eval"]["attack"] == "pgd-eot"


def test_module_function_specs_are_found_in_the_current_directory(tmp_path, monkeypatch):
    """The installed diffpure-fast script does not put the current directory on sys.path (python -m does): a
    module:function classifier next to the user's data is found all the same, and sys.path is left as it was."""
    import sys

    from diffpure_fast.eval.classifiers import load_classifier_spec

    (tmp_path / "my_digits_clf.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    clf = load_classifier_spec("my_digits_clf:make")
    assert clf(torch.rand(2, 1, 16, 16)).shape == (2, 10) and not clf.training
    assert sys.path == before
    with pytest.raises(ValueError, match=r"classifier: cannot import module 'no_such_module_here' .*current "
                                         r"directory"):
        load_classifier_spec("no_such_module_here:make")


def test_purify_outputs_png_by_default_keeps_npz_arrays_and_takes_the_output_extension(tmp_path):
    """Folders: PNG by default (a JPEG input is not re-encoded lossily), JPEG kept only on request; .npz: every other
    array of the input written back (the selected rows of per-image ones); an array input written as the kind the
    output's extension names; a kind that would drop arrays is refused."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    src = tmp_path / "imgs"
    src.mkdir()
    for name in ("a.jpg", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(src / name)
    common = ["--steps", "1", "--t-star", "0.05", "--no-progress"]
    assert main(["purify", "--input", str(src), "--output", str(tmp_path / "png"), *common]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["a.png", "b.png"]
    assert main(["purify", "--input", str(src), "--output", str(tmp_path / "keep"), "--image-format", "keep",
                 "--jpeg-quality", "90", *common]) == 0
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["a.jpg", "b.png"]
    with Image.open(tmp_path / "keep" / "a.jpg") as im:
        assert im.format == "JPEG"
    # an .npz with labels and metadata: all kept, per-image arrays follow the selection
    x = rng.random((4, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(4), meta=np.array([7.0]))
    assert main(["purify", "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"),
                 "--start", "1", "--n-images", "2", *common]) == 0
    with np.load(tmp_path / "out.npz") as z:
        assert sorted(z.keys()) == ["index", "meta", "x", "y"]
        assert z["y"].tolist() == [1, 2] and z["index"].tolist() == [1, 2] and z["meta"].tolist() == [7.0]
        assert z["x"].shape == (2, 1, 16, 16)
    assert main(["purify", "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npy"), *common]) == 2
    # an .npy input written as .pt because the output says so
    np.save(tmp_path / "in.npy", x)
    assert main(["purify", "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.pt"), *common]) == 0
    assert torch.load(tmp_path / "out.pt").shape == (4, 1, 16, 16)


def test_attack_steps_is_one_name_and_steps_its_deprecated_alias(tmp_path):
    """evaluate's attack iterations are attack_steps (steps is the solver's everywhere else); steps= still works
    for one release with a DeprecationWarning, both together is an error, and a folder written under the old
    name resumes."""
    from diffpure_fast.eval.harness import EvalConfig

    assert EvalConfig(attack_steps=3).attack_steps == 3
    with pytest.warns(DeprecationWarning, match="attack_steps"):
        assert EvalConfig(steps=4).attack_steps == 4
    with pytest.raises(ValueError, match="steps: the deprecated name of attack_steps"):
        EvalConfig(steps=4, attack_steps=4)
    out = tmp_path / "ev"
    kw = dict(attack_steps=1, eot=1, n_eval=1, eps=0.1, n_images=1, progress=False)
    dpf.evaluate(None, "digits", "digits:test", out, **kw)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eval"]["attack_steps"] == 1 and "steps" not in cfg["eval"]
    cfg["eval"]["steps"] = cfg["eval"].pop("attack_steps")   # as an earlier release wrote it
    (out / "config.json").write_text(json.dumps(cfg))
    rep = dpf.evaluate(None, "digits", "digits:test", out, **kw)   # resumes, no refusal
    assert rep["n_samples"] == 1 and json.loads((out / "config.json").read_text())["eval"]["attack_steps"] == 1
