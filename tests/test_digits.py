"""The embedded default model: scikit-learn digits data, the CNN classifier, the shipped NCSN++ score model."""

from __future__ import annotations

import pytest
import torch

from diffpure_fast.data import DIGITS_RESOLUTION, load_digits_dataset
from diffpure_fast.data.digits import _split_indices
from diffpure_fast.models.base import EpsModel, ScoreModel
from diffpure_fast.models.classifier import DigitsClassifier
from diffpure_fast.models.digits import (
    CLASSIFIER_WEIGHTS,
    SCORE_WEIGHTS,
    build_digits_score_net,
    digits_dsm_loss,
    load_digits_classifier,
    load_digits_score_model,
    read_weights,
    save_weights,
)

_TRAIN = "python scripts/train_digits.py --out diffpure_fast/weights"
needs_classifier = pytest.mark.skipif(not CLASSIFIER_WEIGHTS.is_file(),
                                      reason=f"{CLASSIFIER_WEIGHTS} not shipped yet (train it: {_TRAIN})")
needs_score = pytest.mark.skipif(not SCORE_WEIGHTS.is_file(),
                                 reason=f"{SCORE_WEIGHTS} not shipped yet (train it: {_TRAIN})")


# ---- data ----
@pytest.mark.parametrize("split, n", [("train", 1437), ("test", 360)])
def test_dataset_shapes_and_ranges(split, n):
    x, y = load_digits_dataset(split)
    assert DIGITS_RESOLUTION == 16
    assert x.shape == (n, 1, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (n,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and 0.99 <= float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    # stratified: each class keeps its share of the full data set (to within one image)
    from sklearn.datasets import load_digits

    full = torch.bincount(torch.from_numpy(load_digits().target), minlength=10).double()
    counts = torch.bincount(y, minlength=10).double()
    assert (counts - full * n / 1797).abs().max() <= 1.0


def test_dataset_split_is_fixed_and_disjoint():
    a, b = load_digits_dataset("train"), load_digits_dataset("train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _, _, train_idx, test_idx = _split_indices()
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert len(train_idx) + len(test_idx) == 1797
    # the first test indices of sklearn's train_test_split(test_size=0.2, random_state=0, stratify=y), sorted
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    _, expected = train_test_split(range(1797), test_size=0.2, random_state=0, stratify=y)
    assert sorted(expected) == test_idx.tolist()


def test_dataset_native_resolution_and_upsampling():
    from sklearn.datasets import load_digits

    x8, y8 = load_digits_dataset("test", resolution=8)
    _, _, _, test_idx = _split_indices()
    raw = torch.from_numpy(load_digits().images[test_idx]).float() / 16
    assert torch.allclose(x8[:, 0], raw)
    x16, y16 = load_digits_dataset("test")
    assert torch.equal(y8, y16)
    up = torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(x16, up)
    with pytest.raises(ValueError, match="split"):
        load_digits_dataset("val")


# ---- weight files ----
def test_missing_weights_error_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits.py"):
        load_digits_classifier(path=tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="train_digits.py"):
        load_digits_score_model(path=tmp_path / "missing.safetensors")


def test_config_roundtrip_through_metadata(tmp_path):
    torch.manual_seed(0)
    clf = DigitsClassifier(channels=(4, 8), hidden=16).eval()
    path = save_weights(clf, tmp_path / "c.safetensors", clf.config, kind="classifier")
    state, config, meta = read_weights(path, kind="classifier")
    assert config == clf.config and meta["kind"] == "classifier"
    loaded = load_digits_classifier(path=path)
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(loaded(x), clf(x))
    with pytest.raises(ValueError, match="not a digits score"):
        read_weights(path, kind="score")


def test_shipped_files_fit_the_size_budget():
    files = [p for p in (CLASSIFIER_WEIGHTS, SCORE_WEIGHTS) if p.is_file()]
    if not files:
        pytest.skip(f"no shipped digits weights yet (train them: {_TRAIN})")
    assert sum(p.stat().st_size for p in files) <= 5 * 1024 * 1024


# ---- shipped classifier ----
@needs_classifier
def test_shipped_classifier_is_frozen_and_accurate():
    clf = load_digits_classifier()
    assert isinstance(clf, DigitsClassifier)
    assert not clf.training and not any(m.training for m in clf.modules())
    assert not any(p.requires_grad for p in clf.parameters())
    x, y = load_digits_dataset("test")
    with torch.no_grad():
        logits = clf(x)
    assert logits.shape == (360, 10)
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc >= 0.95, f"shipped classifier test accuracy {acc:.4f} < 0.95"


# ---- shipped score model ----
@needs_score
def test_shipped_score_model_interface():
    model = load_digits_score_model()
    assert isinstance(model, ScoreModel) and isinstance(model, EpsModel)
    assert model.time_input == "continuous"
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.schedule.beta_min == 0.1 and model.schedule.beta_max == 20.0
    x = torch.randn(4, 1, 16, 16)
    t = torch.full((4,), 0.1)
    with torch.no_grad():
        eps = model.eps(x, t)
        score = model.score(x, t)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert torch.allclose(score, -eps / model.schedule.sigma(t).reshape(-1, 1, 1, 1))
    # labels are 999 t, as score_sde's continuous VP models
    assert torch.allclose(model.labels(t, None), 999 * t)


@needs_score
def test_shipped_score_model_denoises_far_better_than_untrained():
    _, config, _ = read_weights(SCORE_WEIGHTS, kind="score")
    trained = load_digits_score_model()
    torch.manual_seed(0)
    untrained = EpsModel(build_digits_score_net(config), time_input="continuous").eval()
    x0 = load_digits_dataset("test")[0][:160] * 2 - 1
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(len(x0), generator=gen) * (1 - 1e-5) + 1e-5
    z = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        loss = digits_dsm_loss(trained, x0, t, z).item()
        base = digits_dsm_loss(untrained, x0, t, z).item()
    assert loss < 0.5 * base, f"test DSM loss {loss:.4f} vs untrained {base:.4f}"
