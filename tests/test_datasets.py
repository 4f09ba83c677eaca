"""Data layouts that evaluate and purify share (``eval.datasets``): torchvision's CIFAR-10 root, ImageNet-style class
folders (sorted as torchvision's ImageFolder, or mapped by a class-index file), flat folders with labels.txt,
source names, and DiffPure's seeded random subset."""

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
