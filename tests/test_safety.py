"""Hostile files and interrupted runs: checkpoints never run code unless the caller opts in, the official formats
still load without the opt-in, CLI outputs are written atomically, and noise_ids takes any 1-D integer sequence."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast import conformance
from diffpure_fast.cli import main
from diffpure_fast.image_io import ImageBatch, atomic_write, read_images, write_images
from diffpure_fast.models import NCSNpp, load_score_model
from diffpure_fast.models.loading import read_checkpoint
from diffpure_fast.models.ncsnpp import NCSNPP_CIFAR10_CONFIG
from diffpure_fast.testing.nets import tiny_score_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
VEC_DIR = Path(os.environ.get("DIFFPURE_FAST_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
VECTORS = sorted(VEC_DIR.glob("*.pt")) if VEC_DIR.is_dir() else []


def _sde_config():
    cfg = {k: dict(v) for k, v in NCSNPP_CIFAR10_CONFIG.items()}
    cfg["model"].update(nf=16, num_res_blocks=1, ch_mult=[1, 2, 2], attn_resolutions=[8])
    cfg["data"].update(image_size=16, num_channels=3)
    return cfg


def _score_sde_checkpoint(lr=2e-4):
    """A checkpoint in score_sde's format, with the optimizer state dict of a real Adam (as run_lib saves it)."""
    net = NCSNpp.from_config(_sde_config())
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    for g in opt.param_groups:
        g["lr"] = lr
    shadow = [p.detach().clone() + 1e-2 for _, p in net.ema_parameters()]
    return net, {"optimizer": opt.state_dict(), "model": {"module." + k: v for k, v in net.state_dict().items()},
                 "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadow}, "step": 3}


class _Payload:
    """Unpickling this calls a function chosen by the file's author: the attack a downloaded checkpoint can carry."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path):
    touch = f"touch {marker}"
    return {"os.system": _Payload(os.system, touch),
            "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
            "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()")}


@pytest.mark.parametrize("kind", ["os.system", "subprocess.call", "builtins.exec"])
@pytest.mark.parametrize("family", ["score_sde", "guided_diffusion"])
def test_pickle_payload_never_runs_through_the_api(tmp_path, kind, family, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    _, ckpt = _score_sde_checkpoint()
    ckpt["step"] = _payloads(marker)[kind]      # hidden among legitimate entries
    torch.save(ckpt, evil)
    for load in (lambda: load_score_model(family, evil), lambda: read_checkpoint(evil)):
        with pytest.raises(ValueError, match=r"refused to unpickle.*trust_checkpoint=True.*arbitrary code") as info:
            load()
        assert "\n" not in str(info.value) and "--trust-checkpoint" not in str(info.value)  # the API's words
        assert not marker.exists(), "the pickle payload ran"
    # the same file through the other readers of .pt files
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_images(evil)
    capsys.readouterr()
    assert conformance.main([str(evil)]) == 2
    err = capsys.readouterr().err      # the conformance command line names its own flag
    assert "--trust-checkpoint" in err and "trust_checkpoint" not in err, err
    assert not marker.exists(), "the pickle payload ran"


def test_pickle_payload_never_runs_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _payloads(marker)["os.system"]}, evil)
    np.save(tmp_path / "in.npy", np.zeros((1, 3, 32, 32), np.float32))   # the size score_sde is configured for
    rc = main(["purify", "--model", "score_sde", "--checkpoint", str(evil), "--input", str(tmp_path / "in.npy"),
               "--output", str(tmp_path / "out.npy"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--trust-checkpoint" in err and "arbitrary code" in err and "posix.system" in err, err
    assert not marker.exists() and not (tmp_path / "out.npy").exists()
    # an input .pt with a payload is refused the same way
    rc = main(["purify", "--model", "digits", "--input", str(evil), "--output", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "refused to unpickle" in err and not marker.exists(), err


def test_trust_checkpoint_is_the_explicit_opt_in(tmp_path, capsys):
    """A harmless object outside the allow-list: refused by default, read with trust_checkpoint=True."""
    from fractions import Fraction

    net, ckpt = _score_sde_checkpoint()
    ckpt["step"] = Fraction(3, 1)
    path = tmp_path / "custom.pth"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="fractions.Fraction.*trust_checkpoint=True"):
        load_score_model("score_sde", path, _sde_config())
    model = load_score_model("score_sde", path, _sde_config(), trust_checkpoint=True)
    shadow = ckpt["ema"]["shadow_params"]
    for (_, p), s in zip(model.net.ema_parameters(), shadow):
        torch.testing.assert_close(p, s, atol=0, rtol=0)
    with pytest.raises(TypeError, match="trust_checkpoint"):
        load_score_model("score_sde", path, _sde_config(), trust_checkpoint="yes")
    # the CLI flag reaches the loader (the small config does not match the default CIFAR-10 network: a one-line
    # state dict error instead of the refusal proves the file was unpickled)
    np.save(tmp_path / "in.npy", np.zeros((1, 3, 32, 32), np.float32))
    argv = ["purify", "--model", "score_sde", "--checkpoint", str(path), "--input", str(tmp_path / "in.npy"),
            "--output", str(tmp_path / "out.npy"), "--no-progress"]
    assert main(argv) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert main([*argv, "--trust-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert "state dict does not match" in err and "refused" not in err, err


def _with_old_numpy_names(src: Path, dst: Path) -> None:
    """Rewrite a legacy-format torch file so its NumPy scalars are pickled under NumPy 1.x's module name, as in
    checkpoints written before NumPy 2 (the real checkpoint_8.pth)."""
    data = src.read_bytes()
    new = b"numpy._core.multiarray\nscalar"
    assert new in data
    dst.write_bytes(data.replace(new, b"numpy.core.multiarray\nscalar"))


def test_official_score_sde_checkpoint_with_numpy_lr_loads_without_opt_in(tmp_path):
    """score_sde's warm-up writes ``lr * np.minimum(step / warmup, 1.0)``, a NumPy float64, into the optimizer's
    param_groups: the one allow-listed object kind. Both the zip and the legacy format, both NumPy module names."""
    lr = 2e-4 * np.minimum(3 / 5000, 1.0)
    assert isinstance(lr, np.float64)
    net, ckpt = _score_sde_checkpoint(lr=lr)
    torch.save(ckpt, tmp_path / "zip.pth")
    torch.save(ckpt, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _with_old_numpy_names(tmp_path / "legacy.pth", tmp_path / "numpy1.pth")
    for name in ("zip.pth", "legacy.pth", "numpy1.pth"):
        raw = read_checkpoint(tmp_path / name)
        got = raw["optimizer"]["param_groups"][0]["lr"]
        assert isinstance(got, np.float64) and got == lr
        model = load_score_model("score_sde", tmp_path / name, _sde_config())
        for (_, p), s in zip(model.net.ema_parameters(), ckpt["ema"]["shadow_params"]):
            torch.testing.assert_close(p, s, atol=0, rtol=0)
    # the allow-list is exact: a NumPy array (not in score_sde's checkpoints) is still refused
    ckpt["step"] = np.arange(3)
    torch.save(ckpt, tmp_path / "array.pth")
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_checkpoint(tmp_path / "array.pth")


@pytest.mark.skipif(not VECTORS, reason=f"no conformance vectors in {VEC_DIR}")
def test_official_formats_in_the_conformance_vectors_load_without_opt_in(tmp_path):
    for f in VECTORS:
        vec = conformance.load_vector(str(f))          # restricted unpickler: no opt-in needed
        family, key = conformance.KINDS[vec["kind"]]
        path = tmp_path / f"{family}.pth"
        torch.save(vec[key], path)                      # the checkpoint alone, as the official file holds it
        model = load_score_model(family, path, vec["config"])
        assert model.family == family


def test_unreadable_checkpoints_are_named(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    _, ckpt = _score_sde_checkpoint()
    torch.save(ckpt, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    for name in ("empty.pt", "garbage.pt", "truncated.pt"):
        with pytest.raises(ValueError, match=r"^checkpoint: cannot read .*" + name) as info:
            load_score_model("score_sde", tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_score_model("score_sde", tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------ atomic outputs
def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out.npy"

    def half_then_interrupt(f):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_interrupt)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_interrupt, overwrite=True)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(FileExistsError, match="--overwrite"):
        atomic_write(target, lambda f: f.write(b"new"))
    atomic_write(target, lambda f: f.write(b"new"), overwrite=True)
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("kind", ["npy", "npz", "pt", "folder"])
def test_write_images_is_atomic_for_every_kind(tmp_path, kind, monkeypatch):
    x = torch.rand(2, 1, 4, 4)
    batch = ImageBatch(x, kind, names=["a.png", "b.png"], key="x", uint8=kind == "folder")
    out = tmp_path / ("out" if kind == "folder" else f"out.{kind}")
    write_images(out, batch, x)
    back = read_images(out).x
    torch.testing.assert_close(back, x, atol=0.5 / 255 if kind == "folder" else 0, rtol=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_images(out, batch, x)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    # interrupt the serializer after it started writing: the old output is intact, no temporary file remains
    def boom(*args, **kwargs):
        f = args[1] if kind in ("pt", "folder") else args[0]
        if hasattr(f, "write"):
            f.write(b"partial")
        raise KeyboardInterrupt

    if kind == "folder":
        from PIL import Image
        monkeypatch.setattr(Image.Image, "save", lambda self, f, **kw: boom(self, f))
    else:
        monkeypatch.setattr({"npy": np, "npz": np, "pt": torch}[kind], {"npy": "save", "npz": "savez",
                                                                      "pt": "save"}[kind], boom)
    with pytest.raises(KeyboardInterrupt):
        write_images(out, batch, torch.zeros_like(x), overwrite=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    if kind == "folder":  # a new folder is built aside and renamed: an interrupted one leaves nothing
        with pytest.raises(KeyboardInterrupt):
            write_images(tmp_path / "new", batch, x)
        assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_folder_overwrite_keeps_unrelated_files(tmp_path):
    x = torch.rand(1, 1, 4, 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    write_images(out, ImageBatch(x, "folder", names=["a.png"], uint8=True), x, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------------ noise_ids
def test_noise_ids_accept_any_1d_integer_sequence():
    model = tiny_score_model(channels=1)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(t_star=0.05, steps=2, seed=3)
    ref = dpf.purify(x, model, noise_ids=torch.tensor([3, 9]), **kw)
    for ids in ([3, 9], (3, 9), range(3, 10, 6), np.array([3, 9], np.int32), np.array([3, 9], np.uint64),
                [np.int64(3), 9], torch.tensor([3, 9], dtype=torch.int16)):
        torch.testing.assert_close(dpf.purify(x, model, noise_ids=ids, **kw), ref, atol=0, rtol=0)
    pur = dpf.Purifier(model, **kw)
    torch.testing.assert_close(pur(x, noise_ids=[3, 9]), ref, atol=0, rtol=0)
    assert not torch.equal(dpf.purify(x, model, noise_ids=[3, 8], **kw), ref)


@pytest.mark.parametrize("ids, err", [
    ([3.0, 9.0], TypeError), ([True, False], TypeError), (np.array([3.0, 9.0]), TypeError),
    (torch.tensor([True, False]), TypeError), (torch.tensor([3.0, 9.0]), TypeError), ("39", TypeError),
    (3, TypeError), ({3, 9}, TypeError), ([[3, 9]], TypeError), (np.array([[3, 9]]), ValueError),
    (torch.tensor(3), ValueError), ([3], ValueError), ([3, -1], ValueError), ([3, 2 ** 32], ValueError),
    (np.array([3, 2 ** 63 + 1], np.uint64), ValueError),
])
def test_noise_ids_rejects_everything_else(ids, err):
    model = tiny_score_model(channels=1)
    with pytest.raises(err, match="noise_ids"):
        dpf.purify(torch.rand(2, 1, 8, 8), model, t_star=0.05, steps=2, seed=0, noise_ids=ids)
