"""Property-based tests (hypothesis) of the input contract of ``purify``, ``Purifier``, ``load_score_model`` and the
CLI: whatever the arguments, a call returns a result of the documented form or raises ``ValueError``/``TypeError``/
``FileNotFoundError`` whose message names the offending argument; the CLI never prints a traceback and exits 0 or 2.

Small networks and few solver steps keep the suite fast; conftest.py's "ci" profile derandomizes it for CI.
"""

from __future__ import annotations

import contextlib
import io
import math
import re

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import diffpure_fast as dpf  # noqa: E402
from diffpure_fast.cli import main  # noqa: E402
from diffpure_fast.engine import GRAD_MODES  # noqa: E402
from diffpure_fast.models import NCSNpp, create_adm_model, load_score_model  # noqa: E402
from diffpure_fast.models.digits import SCORE_WEIGHTS  # noqa: E402
from diffpure_fast.models.ncsnpp import NCSNPP_CIFAR10_CONFIG  # noqa: E402
from diffpure_fast.testing.nets import TinyEpsNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONTRACT_ERRORS = (ValueError, TypeError, FileNotFoundError)
PURIFY_ARGS = ("x", "model", "t_star", "dt", "steps", "solver", "seed", "noise_ids", "forward_noise", "increments",
               "value_range", "grad_mode", "surrogate_steps", "grad_cache_steps", "param_grads")


def _names_one_of(exc: BaseException, names) -> bool:
    msg = str(exc)
    return any(re.search(rf"(^|[^\w]){re.escape(n)}([^\w]|$)", msg) for n in names)


def _assert_contract_error(exc: BaseException, names) -> None:
    event(f"{type(exc).__name__}")  # --hypothesis-show-statistics: how often each outcome was explored
    assert isinstance(exc, CONTRACT_ERRORS), f"{type(exc).__name__} is outside the contract: {exc!r}"
    assert _names_one_of(exc, names), f"the error does not name the argument: {exc}"
    assert "\n" not in str(exc).strip(), f"a multi-line error: {exc}"


# ------------------------------------------------------------------------------------------------------- purify


class _OfficialLikeNet(TinyEpsNet):
    """A tiny net with the official networks' conventions: declares ``in_channels``/``image_size`` and computes in
    its parameters' dtype, casting the input in and the output back (NCSN++ and the ADM UNet both do)."""

    def __init__(self, channels):
        super().__init__(channels, hidden=4)
        self.in_channels, self.image_size = channels, 4

    def forward(self, x, labels):
        return super().forward(x.float(), labels).to(x.dtype)


MODELS = {c: dpf.EpsModel(_OfficialLikeNet(c).eval(), time_input="continuous") for c in (1, 3)}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
WEIRD = st.sampled_from([None, "0.1", True, [0.1], float("nan"), float("inf"), -1, object()])


def _bad_fields(draw, fields):  # draw: a hypothesis draw function
    """About half the examples are fully valid; the others break one or two fields (so each field's check is
    reached instead of the first check rejecting everything)."""
    return draw(st.one_of(st.just(frozenset()), st.sets(st.sampled_from(fields), min_size=1, max_size=2)))


X_FIELDS = ("rank", "batch", "channels", "size", "dtype", "range", "nonfinite", "device")


@st.composite
def images(draw, channels=None):
    bad = _bad_fields(draw, X_FIELDS)
    b = draw(st.integers(0, 3)) if "batch" in bad else draw(st.integers(1, 3))
    c = channels if channels is not None else draw(st.sampled_from([1, 3]))
    if "channels" in bad:
        c = draw(st.sampled_from([2, 4]))
    hw = draw(st.sampled_from([5, 7])) if "size" in bad else 4
    dims = [b, c, hw, hw]
    if "rank" in bad:
        dims = draw(st.sampled_from([dims[:3], dims + [2], [], [b]]))
    dtype = (draw(st.sampled_from([torch.int64, torch.uint8, torch.bool, torch.float16, torch.bfloat16]))
             if "dtype" in bad else draw(st.sampled_from([torch.float32, torch.float64])))
    lo, hi = draw(st.sampled_from([(-3.0, 3.0), (0.0, 1e6), (-1.0, 0.0)])) if "range" in bad else (0.0, 1.0)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = torch.rand(dims, generator=g, dtype=torch.float64) * (hi - lo) + lo
    if x.numel() and "nonfinite" in bad:
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    x = x.to(dtype) if dtype != torch.bool else x > 0.5
    if "device" in bad:
        x = x.to("meta")  # a device the model is not on, and on which no value can be read
    if x.is_floating_point() and x.device.type == "cpu" and draw(st.booleans()):
        x.requires_grad_(True)
    return x


def _ids(draw, b, bad: bool):
    if not bad:
        return draw(st.one_of(
            st.none(), st.lists(st.integers(0, 2 ** 32 - 1), min_size=b, max_size=b),
            st.lists(st.integers(0, 100), min_size=b, max_size=b).map(tuple),
            st.lists(st.integers(0, 100), min_size=b, max_size=b).map(lambda v: np.asarray(v, np.int32)),
            st.lists(st.integers(0, 100), min_size=b, max_size=b).map(lambda v: torch.tensor(v, dtype=torch.int64))))
    return draw(st.one_of(
        st.lists(st.integers(-2, 2 ** 33), min_size=b, max_size=b).filter(lambda v: any(not 0 <= i < 2 ** 32
                                                                                         for i in v)),
        st.lists(st.integers(0, 100), min_size=b + 1, max_size=b + 2).map(tuple),
        st.lists(st.floats(0, 5), min_size=b, max_size=b), st.lists(st.booleans(), min_size=b, max_size=b),
        st.sampled_from([3, "0", torch.zeros(b, 1, dtype=torch.int64), np.zeros(b, np.float32), {0: 1}])))


KW_FIELDS = ("t_star", "solver", "seed", "value_range", "grad_mode", "surrogate_steps", "grad_cache_steps",
             "param_grads", "dt", "steps", "both", "noise_ids", "forward_noise", "increments")
WEIRD = st.sampled_from([None, "0.1", True, [0.1], float("nan"), float("inf"), -1, object()])


@st.composite
def purify_kwargs(draw, b):
    bad = _bad_fields(draw, KW_FIELDS)

    def pick(name, good, wrong):
        return draw(wrong if name in bad else good)

    kw = dict(
        t_star=pick("t_star", st.sampled_from([0.01, 0.05, 0.1, 1.0]),
                    st.one_of(st.sampled_from([0.0, 1e-5, 1.5, -0.1]), WEIRD)),
        solver=pick("solver", st.sampled_from(["euler", "euler", "ddpm"]), st.sampled_from(["heun", None, 1])),
        seed=pick("seed", st.one_of(st.none(), st.integers(0, 2 ** 63 - 1)),
                  st.one_of(st.integers(-5, -1), st.integers(2 ** 64, 2 ** 70), st.sampled_from([1.5, "1", True]))),
        value_range=pick("value_range", st.sampled_from([(0.0, 1.0), (0, 1), (-1.0, 2.0)]),
                         st.sampled_from([(1, 0), (0.0,), "01", (0.0, math.nan), (-math.inf, math.inf), None])),
        grad_mode=pick("grad_mode", st.sampled_from(GRAD_MODES), st.sampled_from(["magic", None, 1])),
        surrogate_steps=pick("surrogate_steps", st.integers(1, 2), st.sampled_from([0, -1, 2.0, True])),
        grad_cache_steps=pick("grad_cache_steps", st.integers(0, 2), st.sampled_from([-1, 1.0, None])),
        param_grads=pick("param_grads", st.booleans(), st.sampled_from([1, "yes", None])),
    )
    # dt or steps, bounded so that a valid call stays a few network evaluations
    if "both" in bad:
        kw.update(dt=0.05, steps=2)
    elif "steps" in bad:
        kw.update(dt=None, steps=draw(st.sampled_from([0, -1, 2.5, "3", True])))
    elif "dt" in bad:
        kw.update(dt=draw(st.one_of(st.sampled_from([0.0, -1e-3, math.nan, math.inf]), WEIRD)))
    elif draw(st.booleans()):
        kw.update(dt=None, steps=draw(st.integers(1, 3)))
    elif isinstance(kw["t_star"], float):
        kw.update(dt=kw["t_star"] / draw(st.sampled_from([1.0, 2.5, 3.0])))
    if kw["solver"] == "ddpm" and kw.get("steps") is None and isinstance(kw["t_star"], float):
        kw["t_star"] = min(kw["t_star"], 0.003)  # one DDPM step per level: keep the levels few
    kw["noise_ids"] = _ids(draw, b, "noise_ids" in bad)
    if "forward_noise" in bad:
        kw["forward_noise"] = draw(st.sampled_from(["shape", "dtype", "nan", "list"]))
    elif draw(st.booleans()):
        kw["forward_noise"] = "like"
    if "increments" in bad:
        kw["increments"] = draw(st.sampled_from(["short", "list", "nan"]))
    elif draw(st.integers(0, 3)) == 0:
        kw["increments"] = "plan"
    return kw


def _materialize(kw, x):
    """Noise tensors that depend on x: right or wrong in shape, dtype or finiteness."""
    shape = tuple(x.shape)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    fn = kw.get("forward_noise")
    if fn is not None:
        kw["forward_noise"] = {"like": lambda: torch.zeros(shape, dtype=dtype, device=x.device),
                               "shape": lambda: torch.zeros((1, *shape), dtype=dtype),
                               "dtype": lambda: torch.zeros(shape, dtype=torch.float64 if dtype != torch.float64
                                                            else torch.float32),
                               "nan": lambda: torch.full(shape, math.nan, dtype=dtype, device=x.device),
                               "list": lambda: [0.0]}[fn]()
    inc = kw.get("increments")
    if inc is not None:
        try:
            n = len(dpf.PurifyConfig(**{k: kw[k] for k in ("t_star", "dt", "steps", "solver") if k in kw}).plan(
                dtype))
        except (ValueError, TypeError):
            n = 2
        kw["increments"] = {"plan": lambda: torch.zeros((n, *shape), dtype=dtype, device=x.device),
                            "short": lambda: torch.zeros((max(n - 1, 0), *shape), dtype=dtype),
                            "nan": lambda: torch.full((n, *shape), math.nan, dtype=dtype, device=x.device),
                            "list": lambda: [[0.0]]}[inc]()
    return kw


def _check_purify_result(y, x, kw):
    event("result")
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype, (y.shape, y.dtype)
    assert bool(torch.isfinite(y.detach()).all()), "a finite input gave a non-finite output"
    # (no range check: with a random network and one step over [0, 1] the reverse SDE lands anywhere; nothing is
    # clipped, by design)


@settings(max_examples=120)
@given(x=images(), data=st.data())
def test_purify_contract(x, data):
    b = x.shape[0] if x.dim() > 0 else 1
    kw = _materialize(data.draw(purify_kwargs(b)), x)
    model = MODELS[x.shape[1] if x.dim() == 4 and x.shape[1] in MODELS else 1]
    try:
        y = dpf.purify(x, model, **kw)
    except Exception as exc:  # noqa: BLE001 - the property: every failure is a contract error naming its argument
        _assert_contract_error(exc, PURIFY_ARGS)
        return
    _check_purify_result(y, x, kw)


@settings(max_examples=50)
@given(x=images(), data=st.data())
def test_purifier_contract(x, data):
    kw = data.draw(purify_kwargs(x.shape[0] if x.dim() > 0 else 1))
    ids = kw.pop("noise_ids")
    for k in ("forward_noise", "increments"):
        kw.pop(k, None)
    model = MODELS[x.shape[1] if x.dim() == 4 and x.shape[1] in MODELS else 1]
    try:
        pur = dpf.Purifier(model, **kw)
        y = pur(x, noise_ids=ids)
    except Exception as exc:  # noqa: BLE001
        _assert_contract_error(exc, PURIFY_ARGS)
        return
    _check_purify_result(y, x, kw)


# ------------------------------------------------------------------------------------------------------ loading
def _sde_config():
    cfg = {k: dict(v) for k, v in NCSNPP_CIFAR10_CONFIG.items()}
    cfg["model"].update(nf=16, num_res_blocks=1, ch_mult=[1, 2, 2], attn_resolutions=[8])
    cfg["data"].update(image_size=16, num_channels=3)
    return cfg


ADM_CONFIG = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
              "attention_resolutions": "8", "num_head_channels": 16, "learn_sigma": True, "resblock_updown": True,
              "use_scale_shift_norm": True, "use_fp16": False, "class_cond": False, "dropout": 0.0}
LOAD_ARGS = ("family", "checkpoint", "config", "dtype", "device", "use_ema", "trust_checkpoint")


@pytest.fixture(scope="module")
def ckpt_files(tmp_path_factory):
    """Official-format files of both families (small configs), and their corrupted and foreign variants."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ckpts")
    sde = NCSNpp.from_config(_sde_config())
    sde_ckpt = {"model": {"module." + k: v for k, v in sde.state_dict().items()},
                "ema": {"decay": 0.999, "num_updates": 1,
                        "shadow_params": [p.detach().clone() for _, p in sde.ema_parameters()]},
                "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(2e-4)}]}, "step": 1}
    adm_sd = create_adm_model(ADM_CONFIG).state_dict()
    files = {"score_sde.pth": sde_ckpt, "adm.pt": adm_sd}
    for name, obj in files.items():
        torch.save(obj, d / name)
    data = (d / "score_sde.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 3])
    (d / "empty.pt").write_bytes(b"")
    (d / "text.pt").write_text("hello")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save(torch.zeros(3), d / "tensor.pt")
    save_file({k: v.contiguous() for k, v in adm_sd.items()}, str(d / "adm.safetensors"))
    bad = {k: v.contiguous() for k, v in adm_sd.items()}
    bad["extra.weight"] = torch.zeros(2)
    save_file(bad, str(d / "adm_extra_key.safetensors"))
    shape = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.dim() else v) for k, v in adm_sd.items()}
    save_file({k: v.contiguous() for k, v in shape.items()}, str(d / "adm_bad_shape.safetensors"))
    save_file({k.removeprefix("module."): v.contiguous() for k, v in sde_ckpt["model"].items()},
              str(d / "sde_bare.safetensors"))
    (d / "trunc.safetensors").write_bytes((d / "adm.safetensors").read_bytes()[:1000])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "folder.pt").mkdir()
    return d


FILE_NAMES = ["score_sde.pth", "adm.pt", "truncated.pth", "empty.pt", "text.pt", "list.pt", "tensor.pt",
              "adm.safetensors", "adm_extra_key.safetensors", "adm_bad_shape.safetensors", "sde_bare.safetensors",
              "trunc.safetensors", "empty.safetensors", "folder.pt", "missing.pt"]


@settings(max_examples=80)
@given(data=st.data())
def test_load_score_model_contract(ckpt_files, data):
    bad = _bad_fields(data.draw, ("family", "file", "config", "dtype", "device", "use_ema", "trust"))
    family = data.draw(st.sampled_from(["score_sde", "guided_diffusion"]))
    good_files = {"score_sde": ["score_sde.pth", "sde_bare.safetensors"],
                  "guided_diffusion": ["adm.pt", "adm.safetensors"]}
    source = data.draw(st.sampled_from(good_files[family]))
    config = _sde_config() if family == "score_sde" else ADM_CONFIG
    if "family" in bad:  # includes the wrong family: ADM weights given as score_sde and back
        family = data.draw(st.sampled_from(["adm" if family == "score_sde" else "ncsnpp", "digits", "ddim", None, 3]))
    if "file" in bad:
        source = data.draw(st.sampled_from(FILE_NAMES + ["<dict>", "<int>", "<none>"]))
    if family == "digits" and source == "<none>":
        assume(SCORE_WEIGHTS.is_file())
    checkpoint = {"<dict>": {"a": torch.zeros(1)}, "<int>": 7, "<none>": None}.get(source, ckpt_files / source)
    if "config" in bad:
        config = data.draw(st.sampled_from([_sde_config(), ADM_CONFIG, [1], "cifar10",
                                            {**ADM_CONFIG, "num_channels": -3, "channel_mult": "x"}]))
    kw = dict(dtype=data.draw(st.sampled_from([torch.int8, "float32", torch.float64] if "dtype" in bad
                                              else [None, torch.float32, torch.bfloat16])),
              device=data.draw(st.sampled_from(["cuda", "meta", "nonsense", 3] if "device" in bad else [None, "cpu"])),
              use_ema=data.draw(st.sampled_from(["no", None] if "use_ema" in bad else [True, False])),
              trust_checkpoint=data.draw(st.sampled_from(["yes", 1] if "trust" in bad else [False, True])))
    try:
        model = load_score_model(family, checkpoint, config, **kw)
    except Exception as exc:  # noqa: BLE001
        # a bad config value is named by its key (``channel_mult: ...``), as the official config files spell it
        keys = [k for v in (config.values() if isinstance(config, dict) else []) if isinstance(v, dict) for k in v]
        _assert_contract_error(exc, (*LOAD_ARGS, *(config if isinstance(config, dict) else ()), *keys))
        return
    event("result")
    assert isinstance(model, dpf.EpsModel) and not model.training
    assert model.family in ("score_sde", "guided_diffusion", "digits")


# ---------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g)
    np.save(d / "ok.npy", x.numpy())
    np.save(d / "u8.npy", (x.numpy() * 255).astype(np.uint8))
    np.save(d / "rgb.npy", np.zeros((2, 3, 16, 16), np.float32))
    np.save(d / "big.npy", x.numpy() * 3)
    np.save(d / "nan.npy", np.full((1, 1, 16, 16), np.nan, np.float32))
    np.save(d / "rank3.npy", np.zeros((1, 16, 16), np.float32))
    np.save(d / "int.npy", np.zeros((1, 1, 16, 16), np.int32))
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(d / "ok.npz", x=x.numpy())
    np.savez(d / "two.npz", a=x.numpy(), b=x.numpy())
    torch.save(x, d / "ok.pt")
    torch.save({"x": x}, d / "dict.pt")
    (d / "empty.npy").write_bytes(b"")
    (d / "text.pt").write_text("no")
    (d / "imgs").mkdir()
    for i in range(2):
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).save(d / "imgs" / f"{i}.png")
    (d / "empty_dir").mkdir()
    (d / "notes.txt").write_text("x")
    return d


CLI_INPUTS = ["ok.npy", "u8.npy", "rgb.npy", "big.npy", "nan.npy", "rank3.npy", "int.npy", "obj.npy", "ok.npz",
              "two.npz", "ok.pt", "dict.pt", "empty.npy", "text.pt", "imgs", "empty_dir", "notes.txt", "missing.npy"]


@pytest.mark.skipif(not SCORE_WEIGHTS.is_file(), reason="the digits weights are not shipped")
@settings(max_examples=40)
@given(data=st.data())
def test_cli_contract(cli_inputs, tmp_path_factory, data):
    bad = _bad_fields(data.draw, ("model", "input", "output", "steps", "dt", "t_star", "batch", "seed", "device",
                                  "threads", "solver", "checkpoint", "existing"))
    out_dir = tmp_path_factory.mktemp("out")
    pick = lambda name, good, wrong: data.draw(st.sampled_from(wrong if name in bad else good))  # noqa: E731
    src = pick("input", ["ok.npy", "u8.npy", "ok.npz", "ok.pt", "imgs"], CLI_INPUTS)
    same = "out" + (("." + src.split(".")[-1]) if "." in src else "")
    dst = out_dir / pick("output", [same], ["out.npy", "out.npz", "out.pt", "out", "out.png"])
    argv = ["purify", "--model", pick("model", ["digits"], ["score_sde", "guided_diffusion"]),
            "--input", str(cli_inputs / src), "--output", str(dst), "--no-progress",
            "--t-star", pick("t_star", ["0.05", "0.1"], ["0", "2", "nan", "-1", "x"])]
    if "dt" in bad:
        argv += ["--dt", data.draw(st.sampled_from(["0", "-1", "nan", "inf", "x"]))]
    elif "steps" in bad:
        argv += ["--steps", data.draw(st.sampled_from(["0", "-3", "x", "2.5"]))]
    elif data.draw(st.booleans()):
        argv += ["--steps", data.draw(st.sampled_from(["1", "2"]))]
    else:
        argv += ["--dt", "0.05"]
    for opt, name, good, wrong in (("--batch-size", "batch", ["1", "2"], ["0", "-1"]),
                                   ("--seed", "seed", ["0", "7"], ["-1", "99999999999999999999"]),
                                   ("--device", "device", ["cpu"], ["cuda", "meta", "gpu"]),
                                   ("--threads", "threads", ["1"], ["0", "-2"]),
                                   ("--solver", "solver", ["euler"], ["ddpm", "heun"]),
                                   ("--checkpoint", "checkpoint", [], [str(cli_inputs / "text.pt")])):
        if name in bad or (good and data.draw(st.booleans())):
            argv += [opt, pick(name, good, wrong)]
    if "--solver" in argv and argv[argv.index("--solver") + 1] == "ddpm" and "--steps" not in argv:
        argv[argv.index("--t-star") + 1] = "0.01"  # ddpm without --steps: one step per level
    for flag in ("--overwrite", "--trust-checkpoint"):
        if data.draw(st.booleans()):
            argv.append(flag)
    if "existing" in bad:
        dst.write_bytes(b"existing")
    before = dst.read_bytes() if dst.is_file() else None
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse rejects malformed option values with status 2 and a usage line
            rc = e.code
    err = err.getvalue()
    event(f"exit status {rc}")
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert err.strip(), "exit status 2 without a message"
        lines = err.strip().splitlines()  # one line; argparse's own errors: a usage line (wrapped) and one line
        assert len(lines) == 1 or lines[0].startswith("usage:"), err
        if before is not None:
            assert dst.read_bytes() == before, "a failed run changed an existing output"
    else:
        assert dst.exists()
    # never a temporary file left behind
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")], list(out_dir.iterdir())
