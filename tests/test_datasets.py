"""Data layouts that evaluate and purify share (``eval.datasets``): torchvision's CIFAR-10 root, ImageNet-style class
folders (sorted as torchvision's ImageFolder, or mapped by a class-index file), flat folders with labels.txt,
source names, and DiffPure's seeded random subset; on the command line, in purify and eval alike, and DiffPure's
ImageNet workflow (224-pixel data, a 256 score model, --resize bilinear) end to end."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffpure_fast._validate import OptionError
from diffpure_fast.eval.datasets import load_data, select_indices

SYNSETS = ("n01443537", "n01440764", "n01484850")   # deliberately not in sorted order


def _png(path, value, size=4, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if channels == 1 else (size, size, channels)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def cifar_root(tmp_path, n=6):
    """torchvision's CIFAR10(root) layout: ROOT/cifar-10-batches-py/test_batch."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing", b"data": data, b"labels": list(range(n))}, f)
    return tmp_path / "cifar", data


def synset_folder(tmp_path, size=4, channels=1):
    """Three synset folders (one with a nested sub-folder, as ImageFolder walks them), two images each."""
    root = tmp_path / "val"
    for k, s in enumerate(SYNSETS):
        _png(root / s / "b.png", 10 * k + 1, size, channels)
        _png(root / s / ("sub" if k == 0 else "") / "a.png", 10 * k + 2, size, channels)
    return root


def test_cifar10_accepts_torchvision_root_and_names_the_samples(tmp_path):
    root, data = cifar_root(tmp_path)
    for spec in (f"cifar10:{root}", f"cifar10:{root / 'cifar-10-batches-py'}", f"cifar10:{root}:test"):
        src = load_data(spec)
        x, y = src.get([4, 1])
        assert y.tolist() == [4, 1] and torch.equal(x[0], torch.from_numpy(data[4].reshape(3, 32, 32)) / 255.0)
        assert src.names[4] == "test_batch[4]"
    with pytest.raises(FileNotFoundError, match=r"lacks CIFAR-10's data_batch_1.*ROOT/cifar-10-batches-py"):
        load_data(f"cifar10:{root}:train")


def test_synset_folders_sort_as_imagefolder_and_map_by_a_class_index(tmp_path):
    root = synset_folder(tmp_path)
    src = load_data(str(root))
    # classes sorted (n01440764 < n01443537 < n01484850), files sorted within each class, sub-folders walked
    assert src.names == ["n01440764/a.png", "n01440764/b.png", "n01443537/b.png", "n01443537/sub/a.png",
                         "n01484850/a.png", "n01484850/b.png"]
    x, y = src.get(range(6))
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    assert (x[:, 0, 0, 0] * 255).round().tolist() == [12, 11, 1, 2, 22, 21]
    assert "sorted as torchvision's ImageFolder" in src.description
    # a class-index file: ImageNet's real indices for a folder holding three of the 1000 classes
    index = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"], "2": ["n01484850", "great_white_shark"],
             "3": ["n01491361", "tiger_shark"]}
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps({str(int(k) + 5): v for k, v in index.items()}))
    y = load_data(str(root), class_index=tmp_path / "imagenet_class_index.json").get(range(6))[1]
    assert y.tolist() == [5, 5, 6, 6, 7, 7]
    (tmp_path / "synsets.txt").write_text("n01491361 tiger shark\nn01484850 great white shark\n\nn01440764 tench\n"
                                          "n01443537 goldfish\n")
    assert load_data(str(root), class_index=tmp_path / "synsets.txt").get(range(6))[1].tolist() == [2, 2, 3, 3, 1, 1]
    (tmp_path / "two.txt").write_text("n01440764\nn01443537\n")
    with pytest.raises(OptionError, match=r"^class_index: .*two\.txt has no class named 'n01484850'"):
        load_data(str(root), class_index=tmp_path / "two.txt")
    # integer folder names keep their numbers as labels
    _png(tmp_path / "ints" / "7" / "a.png", 3)
    _png(tmp_path / "ints" / "10" / "a.png", 4)
    assert load_data(str(tmp_path / "ints")).get([0, 1])[1].tolist() == [10, 7]


def test_flat_folder_with_labels_txt_and_mixed_layouts(tmp_path):
    for i, name in enumerate(("c.png", "a.png", "b.png")):
        _png(tmp_path / "flat" / name, 40 * i)
    (tmp_path / "flat" / "labels.txt").write_text("3\n1\n\n2\n")   # for a, b, c (sorted names); blank lines skipped
    src = load_data(str(tmp_path / "flat"))
    assert src.names == ["a.png", "b.png", "c.png"] and src.get([0, 2])[1].tolist() == [3, 2]
    (tmp_path / "flat" / "labels.txt").unlink()
    with pytest.raises(OptionError, match=r"labels\.txt beside the images \(one integer per line"):
        load_data(str(tmp_path / "flat"))
    src = load_data(str(tmp_path / "flat"), need_labels=False)   # purify takes unlabelled images
    assert not src.has_labels and src.get([1])[1] is None
    _png(tmp_path / "flat" / "cls" / "x.png", 0)
    with pytest.raises(OptionError, match=r"holds both images and sub-folders"):
        load_data(str(tmp_path / "flat"))


def test_random_subset_is_diffpures(tmp_path):
    # DiffPure's data/datasets.py: np.random.RandomState(data_seed).choice(len, num_sub, replace=False), in order
    assert select_indices(10000, subset=64, data_seed=3) == np.random.RandomState(3).choice(10000, 64,
                                                                                             replace=False).tolist()
    assert select_indices(100, subset=5) == np.random.RandomState(0).choice(100, 5, replace=False).tolist()
    assert select_indices(10, start=2, n_images=3) == [2, 3, 4]
    with pytest.raises(OptionError, match=r"^subset: a seeded random subset replaces the range of start"):
        select_indices(10, start=1, subset=2)
    with pytest.raises(OptionError, match=r"^subset: the data has 10 samples, got a subset of 11"):
        select_indices(10, subset=11)
    with pytest.raises(OptionError, match=r"^data_seed: seeds the random subset; give subset too"):
        select_indices(10, data_seed=1)
    with pytest.raises(OptionError, match=r"^n_images: .*asks for indices up to 11"):
        select_indices(10, start=5, n_images=7)


# ---------------------------------------------------------------------------------------------------------------
# purify and eval on the command line read the same layouts

from diffpure_fast.cli import main  # noqa: E402
from diffpure_fast.models.digits import CLASSIFIER_WEIGHTS, SCORE_WEIGHTS  # noqa: E402

needs_weights = pytest.mark.skipif(not (SCORE_WEIGHTS.is_file() and CLASSIFIER_WEIGHTS.is_file()),
                                   reason="the digits weights are not shipped (python scripts/train_digits.py)")

EVAL_FAST = ["--steps", "1", "--t-star", "0.05", "--attack-steps", "0", "--eot", "1", "--n-eval", "1", "--eps", "0.1",
             "--quiet"]
PURIFY_FAST = ["--model", "digits", "--steps", "1", "--t-star", "0.05", "--no-progress"]


def _records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def _digit_folders(tmp_path):
    """Synset folders and a flat folder with labels.txt, of 1x16x16 images the digits model takes."""
    root = synset_folder(tmp_path, size=16)
    flat = tmp_path / "flat"
    for i, name in enumerate(("c.png", "a.png", "b.png")):
        _png(flat / name, 60 * i + 10, 16)
    (flat / "labels.txt").write_text("3\n1\n2\n")
    return root, flat


@needs_weights
def test_purify_and_eval_read_class_folders_labels_txt_and_a_random_subset(tmp_path):
    root, flat = _digit_folders(tmp_path)
    # purify keeps the relative names (and labels.txt for what it wrote); a subset writes the chosen samples only
    assert main(["purify", "--input", str(root), "--output", str(tmp_path / "p1"), *PURIFY_FAST]) == 0
    written = sorted(str(p.relative_to(tmp_path / "p1")) for p in (tmp_path / "p1").rglob("*.png"))
    assert written == sorted(load_data(str(root)).names)
    assert main(["purify", "--input", str(flat), "--output", str(tmp_path / "p2"), "--subset", "2", "--data-seed",
                 "4", *PURIFY_FAST]) == 0
    chosen = select_indices(3, subset=2, data_seed=4)
    names = [["a.png", "b.png", "c.png"][i] for i in chosen]
    assert sorted(p.name for p in (tmp_path / "p2").glob("*.png")) == sorted(names)
    labels = dict(zip(sorted(names), (tmp_path / "p2" / "labels.txt").read_text().split()))
    assert labels == {n: {"a.png": "3", "b.png": "1", "c.png": "2"}[n] for n in names}
    # eval: the same folders; records keep each sample's source name; the subset is DiffPure's
    assert main(["eval", "--data", str(root), "--class-index", str(_class_index(tmp_path)), "--subset", "3",
                 "--data-seed", "2", "--output", str(tmp_path / "e1"), *EVAL_FAST]) == 0
    recs = _records(tmp_path / "e1")
    src = load_data(str(root))
    assert sorted(r["index"] for r in recs) == sorted(select_indices(6, subset=3, data_seed=2))
    assert all(r["source"] == src.names[r["index"]] for r in recs)
    assert all(r["label"] == 5 + ["n01440764", "n01443537", "n01484850"].index(r["source"].split("/")[0])
               for r in recs)
    assert main(["eval", "--data", str(flat), "--output", str(tmp_path / "e2"), *EVAL_FAST]) == 0
    assert [(r["source"], r["label"]) for r in _records(tmp_path / "e2")] == [("a.png", 3), ("b.png", 1), ("c.png", 2)]


def _class_index(tmp_path):
    path = tmp_path / "imagenet_class_index.json"
    path.write_text(json.dumps({"5": ["n01440764", "tench"], "6": ["n01443537", "goldfish"],
                                "7": ["n01484850", "great_white_shark"]}))
    return path


def _tiny_adm(tmp_path, image_size=16):
    """A random ADM (guided-diffusion's UNet) configured for image_size, its checkpoint and its --config file."""
    from diffpure_fast.models import create_adm_model

    cfg = {"image_size": image_size, "num_channels": 32, "num_res_blocks": 1,
           "channel_mult": ",".join(["1"] * max(2, image_size.bit_length() - 3)), "attention_resolutions": "",
           "num_head_channels": 32, "learn_sigma": True, "use_fp16": False}
    torch.manual_seed(0)
    torch.save(create_adm_model(cfg).state_dict(), tmp_path / "adm.pt")
    (tmp_path / "adm.json").write_text(json.dumps(cfg))
    return ["--model", "guided_diffusion", "--checkpoint", str(tmp_path / "adm.pt"), "--config",
            str(tmp_path / "adm.json")]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_purify_and_eval_read_torchvisions_cifar_root(tmp_path, capsys):
    root, data = cifar_root(tmp_path)
    adm = _tiny_adm(tmp_path)   # 16x16: CIFAR's 32x32 images resized inside the defense
    fast = PURIFY_FAST[2:]
    assert main(["purify", *adm, "--input", f"cifar10:{root}", "--resize", "bilinear", "--subset", "2",
                 "--output", str(tmp_path / "p.npz"), *fast]) == 0
    out = np.load(tmp_path / "p.npz")
    chosen = select_indices(6, subset=2)
    assert out["x"].shape == (2, 3, 32, 32) and out["index"].tolist() == chosen and out["y"].tolist() == chosen
    # the output of a cifar10: input says which samples it holds: an .npz
    assert main(["purify", *adm, "--input", f"cifar10:{root}", "--resize", "bilinear", "--output", str(tmp_path / "p"),
                 *fast]) == 2
    assert "--output: cifar10:" in capsys.readouterr().err
    clf = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval())
    clf.save(str(tmp_path / "clf.pt"))
    assert main(["eval", *adm, "--resize", "bilinear", "--classifier", str(tmp_path / "clf.pt"),
                 "--data", f"cifar10:{root}", "--n-images", "2", "--start", "3", "--output", str(tmp_path / "e"),
                 *EVAL_FAST]) == 0
    assert [(r["index"], r["source"], r["label"]) for r in _records(tmp_path / "e")] == [
        (3, "test_batch[3]", 3), (4, "test_batch[4]", 4)]


def test_imagenet_workflow_end_to_end_with_the_resize_in_the_defense(tmp_path, capsys):
    """DiffPure's ImageNet pipeline: 224-pixel synset folders, a score model configured for 256 (small, random), a
    classifier in torchvision's ResNet layout under its official file name, --resize bilinear: the report names the
    resize as part of the defense and measures the perturbation at 224, where the attack's budget is."""
    from diffpure_fast.models.classifiers.resnet import ResNet

    rng = np.random.default_rng(0)
    for s in SYNSETS:
        (tmp_path / "val" / s).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(tmp_path / "val" / s / "a.png")
    adm = _tiny_adm(tmp_path, 256)
    torch.manual_seed(0)
    torch.save(ResNet(block="basic", layers=(1, 1, 1, 1), num_classes=3).state_dict(),
               tmp_path / "resnet18-f37072fd.pth")
    eps = 4 / 255
    argv = ["eval", *adm, "--classifier", "imagenet-resnet18", "--classifier-checkpoint",
            str(tmp_path / "resnet18-f37072fd.pth"), "--data", str(tmp_path / "val"), "--subset", "1",
            "--data-seed", "1", "--steps", "1", "--t-star", "0.02", "--attack-steps", "1", "--eot", "1", "--n-eval",
            "1", "--eps", str(eps), "--output", str(tmp_path / "out"), "--quiet"]
    assert main(argv[:-3] + ["--output", str(tmp_path / "no"), "--quiet"]) == 2   # without --resize: refused
    assert "images of 224x224, but --model guided_diffusion is configured for 256x256; pass --resize bilinear" in (
        capsys.readouterr().err)
    assert main(argv + ["--resize", "bilinear"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["defense"]["resize"] == "bilinear" and config["defense"]["resize_to"] == 256
    assert config["input_size"] == [3, 224, 224]
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# Evaluation: diffpure, inputs resized (bilinear) to 256x256 and back on image folder")
    assert "Largest perturbation (on the 3x224x224 inputs, where the budget is)" in md
    # measured at 224: within the L-inf budget, and an L2 a 224-pixel perturbation of that budget can have
    p = rep["perturbation"]
    assert 0 < p["max_linf"] <= eps + 1e-6 and p["max_l2"] <= eps * (3 * 224 * 224) ** 0.5 + 1e-4
    (rec,) = _records(tmp_path / "out")
    assert rec["index"] == select_indices(3, subset=1, data_seed=1)[0] and rec["source"].endswith("/a.png")
