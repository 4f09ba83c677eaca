"""DiffPure's classifiers from their official checkpoints (``models.classifiers``), the library specs, ``normalize``.

The shared classifier vectors (``../shared/classifiers/``, see its README) hold each family's checkpoint in the
official layout with seeded random weights, an input batch and the logits of DiffPure's own pipeline. Each is saved
here under the real file's name and loaded through ``dpf.load_classifier(name, checkpoint=path)`` alone. The two
families without a shared vector (DiffPure's CIFAR-10 ResNet-50 and the CelebA-HQ attribute network) are checked
against plain-functional transcriptions of the official code, on state dicts built here in the official layout.
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffpure_fast as dpf
from diffpure_fast._optional import MissingDependency
from diffpure_fast._validate import OptionError
from diffpure_fast.models.classifiers import ImageClassifier
from diffpure_fast.models.classifiers.resnet import ResNet

REPO = Path(__file__).resolve().parents[1]
VEC_DIR = Path(os.environ.get("DIFFPURE_FAST_CLASSIFIER_DIR", REPO.parent / "shared" / "classifiers"))
FILES = sorted(VEC_DIR.glob("*.pt")) if VEC_DIR.is_dir() else []
# the README's tolerance for an independent float32 CPU implementation, scaled by the logits' size
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
    err = float((got - want).abs().max())
    assert err <= tol * max(1.0, float(want.abs().max())), err
    return err


@pytest.fixture(scope="module", params=FILES, ids=[f.name for f in FILES])
def vector(request):
    return torch.load(request.param, weights_only=True)


def _saved(vec: dict, tmp_path: Path, checkpoint=None) -> Path:
    path = tmp_path / vec["checkpoint_filename"]
    torch.save(vec["checkpoint"] if checkpoint is None else checkpoint, path)
    return path


@pytest.mark.skipif(not FILES, reason=f"no classifier vectors in {VEC_DIR} (set DIFFPURE_FAST_CLASSIFIER_DIR)")
def test_shared_vector_gives_the_official_logits(vector, tmp_path):
    clf = dpf.load_classifier(vector["name"], checkpoint=_saved(vector, tmp_path))
    assert not any(m.training for m in clf.modules())
    assert not any(p.requires_grad for p in clf.parameters())
    assert tuple(clf.input_size[:1]) == tuple(vector["input_size"][:1])
    with torch.no_grad():
        _close(clf(vector["x"]), vector["expected_logits"])
    # gradients reach the input (attacks differentiate through the classifier)
    x = vector["x"][:1].clone().requires_grad_(True)
    clf(x).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def _vector(name: str) -> dict:
    f = next((f for f in FILES if torch.load(f, weights_only=True)["name"] == name), None)
    if f is None:
        pytest.skip(f"no {name} vector in {VEC_DIR}")
    return torch.load(f, weights_only=True)


def test_wrong_prefix_and_missing_key_name_the_file_and_the_key(tmp_path):
    vec = _vector("cifar10-wideresnet-28-10")
    sd = vec["checkpoint"]["state_dict"]
    bad = _saved(vec, tmp_path, {"state_dict": {"net." + k: v for k, v in sd.items()}})
    with pytest.raises(OptionError, match=r"checkpoint '.*Standard\.pt'.*'block1\.layer\.0\.conv1\.weight'"):
        dpf.load_classifier(vec["name"], checkpoint=bad)
    missing = dict(sd)
    del missing["block2.layer.1.bn2.running_mean"]
    path = _saved(vec, tmp_path, {"state_dict": missing})
    with pytest.raises(OptionError, match=r"Standard\.pt.*missing keys \['block2\.layer\.1\.bn2\.running_mean'\]"):
        dpf.load_classifier(vec["name"], checkpoint=path)
    # a size given that the file does not have: the mismatch names the file and the keys
    with pytest.raises(OptionError, match=r"Standard\.pt.*(missing|unexpected) keys"):
        dpf.load_classifier(vec["name"], checkpoint=_saved(vec, tmp_path), depth=28)
    with pytest.raises(OptionError, match=r"^width: not an architecture option of cifar10-wideresnet-28-10"):
        dpf.load_classifier(vec["name"], checkpoint=_saved(vec, tmp_path), width=3)


def test_wrappers_and_prefixes_of_every_kind_load_alike(tmp_path):
    vec = _vector("cifar10-wideresnet-28-10")
    sd = vec["checkpoint"]["state_dict"]
    for layout in (sd, {"module." + k: v for k, v in sd.items()}, {"model_state_dict": {"module.0." + k: v
                                                                                         for k, v in sd.items()}}):
        clf = dpf.load_classifier(vec["name"], checkpoint=_saved(vec, tmp_path, layout))
        with torch.no_grad():
            _close(clf(vec["x"]), vec["expected_logits"])


def test_dm_wideresnet_reads_the_averaged_weights(tmp_path):
    """weights-best.pt from train-wa.py holds the averaged weights as model_state_dict and the raw ones beside."""
    vec = _vector("cifar10-wideresnet-70-16")
    sd = vec["checkpoint"]["model_state_dict"]
    both = {"model_state_dict": sd, "unaveraged_model_state_dict": {k: v + 0.5 if v.is_floating_point() else v
                                                                    for k, v in sd.items()}}
    clf = dpf.load_classifier(vec["name"], checkpoint=_saved(vec, tmp_path, both))
    with torch.no_grad():
        _close(clf(vec["x"]), vec["expected_logits"])


def test_input_size_and_normalize_are_checked(tmp_path):
    vec = _vector("cifar10-wideresnet-28-10")
    clf = dpf.load_classifier(vec["name"], checkpoint=_saved(vec, tmp_path))
    with pytest.raises(OptionError, match=r"^x: the classifier cifar10-wideresnet-28-10 takes \(B, 3, 32x32\)"):
        clf(torch.rand(1, 3, 64, 64))
    with pytest.raises(OptionError, match=r"^normalize: cifar10-wideresnet-28-10 applies its official"):
        dpf.load_classifier(vec["name"], checkpoint=_saved(vec, tmp_path), normalize=(0.5, 0.5))
    with pytest.raises(OptionError, match=r"^checkpoint: cifar10-wideresnet-28-10 needs a checkpoint path"):
        dpf.load_classifier(vec["name"])


# ---------------------------------------------------------------------------------------------------------------
# DiffPure's CIFAR-10 ResNet-50 (classifiers/cifar10_resnet.py), real size, in weights.pt's layout


def _bn(sd, prefix, c, g):
    sd[prefix + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[prefix + ".bias"] = 0.1 * torch.randn(c, generator=g)
    sd[prefix + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[prefix + ".running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
    sd[prefix + ".num_batches_tracked"] = torch.tensor(7)


def _conv(sd, key, cout, cin, k, g):
    sd[key] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(1.0 / (cin * k * k))


def _cifar_resnet50_state(g) -> dict:
    """The keys and shapes of ResNet(Bottleneck, [3, 4, 6, 3]) as the official class builds them."""
    sd: dict = {}
    _conv(sd, "conv1.weight", 64, 3, 3, g)
    _bn(sd, "bn1", 64, g)
    cin = 64
    for li, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)), 1):
        for i in range(n):
            p = f"layer{li}.{i}"
            _conv(sd, p + ".conv1.weight", planes, cin, 1, g)
            _bn(sd, p + ".bn1", planes, g)
            _conv(sd, p + ".conv2.weight", planes, planes, 3, g)
            _bn(sd, p + ".bn2", planes, g)
            _conv(sd, p + ".conv3.weight", 4 * planes, planes, 1, g)
            _bn(sd, p + ".bn3", 4 * planes, g)
            if (stride if i == 0 else 1) != 1 or cin != 4 * planes:
                _conv(sd, p + ".shortcut.0.weight", 4 * planes, cin, 1, g)
                _bn(sd, p + ".shortcut.1", 4 * planes, g)
            cin = 4 * planes
    sd["linear.weight"] = torch.randn(10, 2048, generator=g) * 0.02
    sd["linear.bias"] = 0.1 * torch.randn(10, generator=g)
    return sd


def _bnf(sd, p, x):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _cifar_resnet50_reference(sd, x):
    """ResNet.forward of classifiers/cifar10_resnet.py, transcribed with torch.nn.functional."""
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2471, 0.2435, 0.2616)).view(3, 1, 1)
    out = F.relu(_bnf(sd, "bn1", F.conv2d((x - mean) / std, sd["conv1.weight"], padding=1)))
    for li, (n, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), 1):
        for i in range(n):
            p, s = f"layer{li}.{i}", stride if i == 0 else 1
            y = F.relu(_bnf(sd, p + ".bn1", F.conv2d(out, sd[p + ".conv1.weight"])))
            y = F.relu(_bnf(sd, p + ".bn2", F.conv2d(y, sd[p + ".conv2.weight"], stride=s, padding=1)))
            y = _bnf(sd, p + ".bn3", F.conv2d(y, sd[p + ".conv3.weight"]))
            sc = out if p + ".shortcut.0.weight" not in sd else _bnf(
                sd, p + ".shortcut.1", F.conv2d(out, sd[p + ".shortcut.0.weight"], stride=s))
            out = F.relu(y + sc)
    out = F.avg_pool2d(out, 4).view(out.shape[0], -1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def test_cifar10_resnet50_from_its_official_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = _cifar_resnet50_state(g)
    params = sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert len(sd) == 320 and params == 23_520_842    # the README's 320 entries and 23.52 M parameters
    path = tmp_path / "weights.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, path)   # saved from DataParallel
    clf = dpf.load_classifier("cifar10-resnet-50", checkpoint=path)
    assert clf.net.architecture["layers"] == [3, 4, 6, 3] and clf.net.architecture["block"] == "bottleneck"
    x = torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = _cifar_resnet50_reference(sd, x)
        assert float(want.std()) > 0.1  # logits that tell the images apart
        _close(clf(x), want)


# ---------------------------------------------------------------------------------------------------------------
# The CelebA-HQ attribute classifier (classifiers/attribute_net.py D, attribute_classifier.py ClassifierWrapper)


def _nf(stage):
    return min(int(8192 / (2.0 ** stage)), 512)


def _attribute_state(resolution: int, g) -> dict:
    """D(num_channels=3, resolution, fixed_size=True, use_mbstd=False)'s keys and shapes, as the official class
    registers them."""
    log2 = int(math.log2(resolution))
    sd = {"lod_in": torch.tensor(0.0, dtype=torch.float64)}

    def wconv(prefix, cin, cout, k):
        sd[prefix + ".conv.weight"] = torch.randn(cout, cin, k, k, generator=g)
        sd[prefix + ".wscale.b"] = 0.1 * torch.randn(cout, generator=g)

    wconv("fromrgb_lod0.conv", 3, _nf(log2 - 1), 1)
    for r in range(log2, 2, -1):
        wconv(f"{2 ** r}x{2 ** r}.conv0", _nf(r - 1), _nf(r - 1), 3)
        wconv(f"{2 ** r}x{2 ** r}.conv1", _nf(r - 1), _nf(r - 2), 3)
    wconv("4x4.conv", _nf(1), _nf(1), 3)
    sd["4x4.dense0.linear.weight"] = torch.randn(_nf(0), _nf(1) * 16, generator=g)
    sd["4x4.dense0.wscale.b"] = 0.1 * torch.randn(_nf(0), generator=g)
    sd["4x4.dense1.linear.weight"] = torch.randn(1, _nf(0), generator=g)
    sd["4x4.dense1.wscale.b"] = 0.1 * torch.randn(1, generator=g)
    return sd


def _attribute_reference(sd, ims, resolution):
    """ClassifierWrapper.forward: (ims - 0.5) / 0.5, downsample, D, cat([l, -l])."""
    x = (ims - 0.5) / 0.5
    if x.shape[2] > resolution:
        f = x.shape[2] // resolution
        x = x.view(-1, 3, x.shape[2] // f, f, x.shape[3] // f, f).mean(dim=[3, 5])

    def wconv(p, x, pad):
        w = sd[p + ".conv.weight"]
        scale = math.sqrt(2) / math.sqrt(w.shape[1] * w.shape[2] * w.shape[3])
        return F.conv2d(x, w, padding=pad) * scale + sd[p + ".wscale.b"].view(1, -1, 1, 1)

    def wlin(p, x, gain):
        w = sd[p + ".linear.weight"]
        return F.linear(x, w) * (gain / math.sqrt(w.shape[1])) + sd[p + ".wscale.b"].view(1, -1)

    act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    x = act(wconv("fromrgb_lod0.conv", x, 0))
    for r in range(int(math.log2(resolution)), 2, -1):
        p = f"{2 ** r}x{2 ** r}"
        x = act(F.avg_pool2d(wconv(p + ".conv1", act(wconv(p + ".conv0", x, 1)), 1), 2))
    x = act(wconv("4x4.conv", x, 1)).view(x.shape[0], -1)
    logit = wlin("4x4.dense1", act(wlin("4x4.dense0", x, math.sqrt(2))), 1.0)
    return torch.cat([logit, -logit], dim=1)


def test_attribute_classifier_from_its_official_layout(tmp_path):
    g = torch.Generator().manual_seed(1)
    # the real size: 33 entries, 23.04 M parameters, resolution 256 read from the keys (no forward: 60 GFLOP/image)
    real = _attribute_state(256, g)
    assert len(real) == 33 and round(sum(v.numel() for v in real.values()) / 1e6, 2) == 23.04
    path = tmp_path / "Smiling" / "net_best.pth"
    path.parent.mkdir()
    adam = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]}
    torch.save({"state_dict": real, "optimizer": adam, "epoch": 12, "valacc": 0.93}, path)
    clf = dpf.load_classifier("celebahq__Smiling", checkpoint=path)
    assert clf.net.resolution == 256 and clf.input_size == (3, 256, 256)
    # logits at a small resolution of the same layout, 2x larger inputs block-averaged as DiffPure's downsample
    sd = _attribute_state(16, g)
    torch.save({"state_dict": sd, "optimizer": adam, "epoch": 1, "valacc": 0.5}, path)
    clf = dpf.load_classifier("celebahq__Eyeglasses", checkpoint=path)
    for size in (16, 32):
        x = torch.rand(3, 3, size, size, generator=g)
        with torch.no_grad():
            got, want = clf(x), _attribute_reference(sd, x, 16)
        assert got.shape == (3, 2) and torch.equal(got[:, 0], -got[:, 1])
        _close(got, want)
    with pytest.raises(OptionError, match=r"^x: .*takes \(B, 3, 16x16\) \(or a whole multiple"):
        clf(torch.rand(1, 3, 24, 24))


# ---------------------------------------------------------------------------------------------------------------
# normalize=, library specs


def _tiny_resnet() -> ResNet:
    torch.manual_seed(0)
    net = ResNet(block="basic", layers=(1, 1, 1, 1), num_classes=5)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    return net.eval()


def test_normalize_wraps_a_classifier_of_ones_own():
    net = _tiny_resnet()
    clf = dpf.load_classifier(net, normalize=((0.5, 0.4, 0.3), 0.25))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clf(x), net((x - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.25))
    for bad in ((0.5,), (0.5, 0.0), ((0.1, 0.2), (0.3, 0.3, 0.3)), "0.5 0.5", (0.5, float("nan"))):
        with pytest.raises(OptionError, match=r"^normalize: "):
            dpf.load_classifier(net, normalize=bad)
    with pytest.raises(OptionError, match=r"^checkpoint: is for DiffPure's classifier names"):
        dpf.load_classifier(net, checkpoint="weights.pt")


@pytest.mark.parametrize("library", ["torchvision", "timm", "robustbench"])
def test_library_spec_without_the_library_names_the_extra(library, monkeypatch, tmp_path):
    for mod in [m for m in sys.modules if m == library or m.startswith(library + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, library, None)   # import fails as if not installed
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    (tmp_path / "cifar10" / "Linf" / "Net.pt").write_bytes(b"")
    ckpt = tmp_path if library == "robustbench" else tmp_path / "cifar10" / "Linf" / "Net.pt"
    with pytest.raises(MissingDependency, match=rf"pip install 'diffpure_fast\[{library}\]'"):
        dpf.load_classifier(f"{library}:Net", checkpoint=ckpt)


def _stand_in(monkeypatch, name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_torchvision_and_timm_specs_load_local_weights(monkeypatch, tmp_path):
    net = _tiny_resnet()
    path = tmp_path / "tiny.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    calls = []

    def get_model(name, weights=None, **kw):
        calls.append((name, weights, kw))
        return ResNet(block="basic", layers=(1, 1, 1, 1), num_classes=kw.get("num_classes", 1000))

    tv = _stand_in(monkeypatch, "torchvision")
    tv.models = _stand_in(monkeypatch, "torchvision.models", get_model=get_model)
    x = torch.rand(2, 3, 40, 40)
    clf = dpf.load_classifier("torchvision:tiny", checkpoint=path, num_classes=5)
    assert calls == [("tiny", None, {"num_classes": 5})]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        assert torch.equal(clf(x), net((x - mean) / std))
        clf = dpf.load_classifier("torchvision:tiny", checkpoint=path, num_classes=5, normalize=(0.5, 0.5))
        assert torch.equal(clf(x), net((x - 0.5) / 0.5))
    with pytest.raises(OptionError, match=r"^checkpoint: torchvision:tiny needs a checkpoint path"):
        dpf.load_classifier("torchvision:tiny")

    def create_model(name, pretrained=False, **kw):
        assert pretrained is False
        m = ResNet(block="basic", layers=(1, 1, 1, 1), num_classes=5)
        m.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}
        return m

    _stand_in(monkeypatch, "timm", create_model=create_model)
    clf = dpf.load_classifier("timm:tiny", checkpoint=path)
    with torch.no_grad():
        assert torch.equal(clf(x), net((x - 0.5) / 0.2))


def test_robustbench_spec_uses_a_local_model_folder_only(monkeypatch, tmp_path):
    calls = []

    def load_model(model_name, model_dir, dataset, threat_model):
        calls.append((model_name, model_dir, dataset, threat_model))
        return _tiny_resnet()

    rb = _stand_in(monkeypatch, "robustbench")
    rb.utils = _stand_in(monkeypatch, "robustbench.utils", load_model=load_model)
    with pytest.raises(OptionError, match=r"^checkpoint: no Standard\.pt in .*cifar10/Linf.* nothing is downloaded"):
        dpf.load_classifier("robustbench:Standard", checkpoint=tmp_path)
    assert calls == []
    f = tmp_path / "cifar10" / "L2" / "Standard.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")
    clf = dpf.load_classifier("robustbench:Standard", checkpoint=tmp_path, threat_model="L2")
    clf2 = dpf.load_classifier("robustbench:Standard", checkpoint=f)
    assert calls == [("Standard", str(tmp_path), "cifar10", "L2")] * 2
    assert isinstance(clf, ImageClassifier) and clf.mean is None and not clf2.training
    with pytest.raises(OptionError, match=r"^threat_model: 'Linf' contradicts the file's folder 'L2'"):
        dpf.load_classifier("robustbench:Standard", checkpoint=f, threat_model="Linf")
