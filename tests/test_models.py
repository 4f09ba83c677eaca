"""Score networks (NCSN++ / ADM) and their checkpoint loader: shapes, configs, precision, errors, EMA order."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffpure_fast.models import EpsModel, NCSNpp, UNetModel, create_adm_model, load_score_model
from diffpure_fast.models.adm import AttentionBlock, adm_default_channel_mult
from diffpure_fast.models.ncsnpp import NCSNPP_CIFAR10_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = {"image_size": 16, "num_channels": 1, "nf": 16, "ch_mult": (1, 2, 2), "num_res_blocks": 1,
         "attn_resolutions": (8,)}


def _sde_config(**model):
    cfg = {k: dict(v) for k, v in NCSNPP_CIFAR10_CONFIG.items()}
    cfg["model"].update(nf=16, num_res_blocks=1, ch_mult=[1, 2, 2], attn_resolutions=[8])
    cfg["data"].update(image_size=16, num_channels=3)
    cfg["model"].update(model)
    return cfg


ADM_SMALL = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
             "attention_resolutions": "8",
                 "num_head_channels": 16, "learn_sigma": True, "resblock_updown": True, "use_scale_shift_norm": True,
                 "use_fp16": False, "class_cond": False, "dropout": 0.0}


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def _sd_checkpoint(net: NCSNpp, ema_offset: float = 1e-2, prefix: str = "module."):
    state = {prefix + k: v.clone() for k, v in net.state_dict().items()}
    shadow = [p.detach().clone() + ema_offset for _, p in net.ema_parameters()]
    return {"model": state, "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadow},
            "optimizer": {"state": {}, "param_groups": []}, "step": 3}


# ------------------------------------------------------------------------------------------------- NCSN++
@pytest.mark.parametrize("extra", [
    {},
    {"resblock_type": "ddpm", "num_res_blocks": 2},
    {"embedding_type": "fourier", "attn_resolutions": (16, 8)},
    {"progressive": "output_skip", "progressive_input": "input_skip"},
    {"progressive": "residual", "progressive_input": "residual", "progressive_combine": "cat"},
    {"progressive": "output_skip", "progressive_input": "input_skip", "progressive_combine": "cat"},
    {"conditional": False, "centered": False, "scale_by_sigma": True, "skip_rescale": False},
    {"resamp_with_conv": False, "resblock_type": "ddpm", "init_scale": 0.5, "nonlinearity": "elu"},
])
def test_ncsnpp_small_1channel_shapes(extra):
    net = _randomize(NCSNpp(**{**SMALL, **extra})).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        y = net(x, torch.tensor([1.0, 500.0, 998.0]))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_ncsnpp_default_is_diffpure_cifar10_structure():
    with torch.device("meta"):  # structure only, no memory
        net = NCSNpp()
    keys = list(net.state_dict())
    assert keys[0] == "sigmas" and net.sigmas.dtype == torch.float64 and net.sigmas.shape == (1000,)
    # positional embedding: two dense layers then conv_in; 8 blocks/level, attention at 16x16 only
    assert keys[1:5] == ["all_modules.0.weight", "all_modules.0.bias", "all_modules.1.weight", "all_modules.1.bias"]
    assert net.all_modules[2].weight.shape == (128, 3, 3, 3)
    attn = [i for i, m in enumerate(net.all_modules) if type(m).__name__ == "AttnBlockpp"]
    assert len(attn) == 8 + 1 + 1  # level 16x16 down, middle, level 16x16 up
    # parameters in state-dict order (buffers first), official intra-block order
    assert [n for n, _ in net.named_parameters()] == keys[1:]
    # The first down block.
    blk = [n.split(".", 2)[2] for n, _ in net.named_parameters() if n.startswith("all_modules.11.")]
    assert blk == ["GroupNorm_0.weight", "GroupNorm_0.bias", "Conv_0.weight", "Conv_0.bias", "Dense_0.weight",
                   "Dense_0.bias", "GroupNorm_1.weight", "GroupNorm_1.bias", "Conv_1.weight", "Conv_1.bias",
                   "Conv_2.weight", "Conv_2.bias"]
    assert 100e6 < sum(p.numel() for p in net.parameters()) < 115e6  # the deep model: 106.6M parameters


def test_ncsnpp_from_config_matches_kwargs():
    a = NCSNpp.from_config(_sde_config())
    b = NCSNpp(image_size=16, num_channels=3, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]


def test_ncsnpp_centered_false_maps_input():
    cfg_c, cfg_u = _sde_config(), _sde_config()
    cfg_u["data"]["centered"] = False
    a, b = NCSNpp.from_config(cfg_c), NCSNpp.from_config(cfg_u)
    _randomize(a)
    b.load_state_dict(a.state_dict())
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([10.0, 300.0])
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x, t), a.eval()(2 * x - 1, t))


def test_ncsnpp_attention_matches_einsum_reference():
    net = _randomize(NCSNpp(**SMALL)).eval()
    blk = next(m for m in net.all_modules if type(m).__name__ == "AttnBlockpp")
    x = torch.randn(2, blk.NIN_0.W.shape[0], 8, 8)
    with torch.no_grad():
        b, c, hh, ww = x.shape
        h = blk.GroupNorm_0(x)
        q, k, v = (torch.einsum("bchw,cd->bdhw", h, n.W) + n.b[:, None, None]
                   for n in (blk.NIN_0, blk.NIN_1, blk.NIN_2))
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (c ** -0.5)
        w = F.softmax(w.reshape(b, hh, ww, hh * ww), dim=-1).reshape(b, hh, ww, hh, ww)
        a = torch.einsum("bhwij,bcij->bchw", w, v)
        a = torch.einsum("bchw,cd->bdhw", a, blk.NIN_3.W) + blk.NIN_3.b[:, None, None]
        ref = (x + a) / math.sqrt(2.0)
        torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=0)


def test_ncsnpp_channels_last_and_autocast():
    net = _randomize(NCSNpp(**SMALL)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        ref = net(x, t)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
        for dt in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dt):
                y = net(x, t)
            assert y.shape == ref.shape and torch.isfinite(y).all()
            assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_ncsnpp_compiles_without_graph_breaks():
    net = _randomize(NCSNpp(**SMALL)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 700.0])
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), net(x, t))


def test_ncsnpp_rejects_bad_configs():
    with pytest.raises(ValueError, match="fir=True is not supported"):
        NCSNpp(**SMALL, fir=True)
    with pytest.raises(ValueError, match="resblock_type"):
        NCSNpp(**SMALL, resblock_type="resnet")
    with pytest.raises(ValueError, match="embedding_type"):
        NCSNpp(**SMALL, embedding_type="learned")
    with pytest.raises(ValueError, match="progressive"):
        NCSNpp(**SMALL, progressive="skip")
    with pytest.raises(ValueError, match="image_size"):
        NCSNpp(**{**SMALL, "image_size": 18})
    with pytest.raises(ValueError, match="name"):
        NCSNpp.from_config(_sde_config(name="ddpm"))
    with pytest.raises(ValueError, match="'model' section"):
        NCSNpp.from_config({"data": {}})


# ------------------------------------------------------------------------------------------------- score_sde loading
def test_score_sde_loader_applies_ema_by_position():
    cfg = _sde_config()
    net = _randomize(NCSNpp.from_config(cfg))
    ckpt = _sd_checkpoint(net, ema_offset=0.01)
    model = load_score_model("score_sde", ckpt, cfg)
    assert isinstance(model, EpsModel) and model.time_input == "continuous" and not model.training
    loaded = dict(model.net.named_parameters())
    for (name, _), s in zip(net.ema_parameters(), ckpt["ema"]["shadow_params"]):
        torch.testing.assert_close(loaded[name], s, atol=0, rtol=0)
    raw = load_score_model("score_sde", ckpt, cfg, use_ema=False)
    for name, p in net.named_parameters():
        torch.testing.assert_close(dict(raw.net.named_parameters())[name], p, atol=0, rtol=0)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert (model.eps(x, t) - raw.eps(x, t)).abs().max() > 1e-4
        # the score is -eps / std(t) with labels 999 t
        std = torch.sqrt(1 - torch.exp(-0.5 * t ** 2 * 19.9 - 0.1 * t)).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(model.score(x, t), -model.net(x, 999 * t) / std)


def test_score_sde_loader_without_module_prefix_and_bare_state_dict():
    cfg = _sde_config()
    net = _randomize(NCSNpp.from_config(cfg))
    m1 = load_score_model("score_sde", _sd_checkpoint(net, ema_offset=0.0, prefix=""), cfg)
    m2 = load_score_model("score_sde", net.state_dict(), cfg)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([0.5])
    with torch.no_grad():
        torch.testing.assert_close(m1.eps(x, t), m2.eps(x, t), atol=0, rtol=0)


def test_score_sde_fourier_ema_skips_frozen_W(tmp_path):
    cfg = _sde_config(embedding_type="fourier")
    net = _randomize(NCSNpp.from_config(cfg))
    names = [n for n, _ in net.named_parameters()]
    assert names[0] == "all_modules.0.W" and not net.all_modules[0].W.requires_grad
    assert len(net.ema_parameters()) == len(names) - 1
    ckpt = _sd_checkpoint(net)
    net.requires_grad_(False)  # a frozen model still lines up with the EMA list (by name, not by flags)
    assert len(net.ema_parameters()) == len(names) - 1
    path = tmp_path / "checkpoint_1.pth"
    torch.save(ckpt, path)
    model = load_score_model("score_sde", path, cfg)
    torch.testing.assert_close(model.net.all_modules[0].W, net.all_modules[0].W, atol=0, rtol=0)
    torch.testing.assert_close(model.net.all_modules[1].weight, ckpt["ema"]["shadow_params"][0], atol=0, rtol=0)


def test_score_sde_loader_dtype_and_device_args():
    cfg = _sde_config()
    net = _randomize(NCSNpp.from_config(cfg))
    m = load_score_model("score_sde", net.state_dict(), cfg, dtype=torch.bfloat16, device="cpu")
    assert m.net.all_modules[2].weight.dtype == torch.bfloat16
    with torch.no_grad():
        y = m.eps(torch.randn(1, 3, 16, 16), torch.tensor([0.5]))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="dtype"):
        load_score_model("score_sde", net.state_dict(), cfg, dtype=torch.int8)


def test_score_sde_loader_errors(tmp_path):
    cfg = _sde_config()
    net = NCSNpp.from_config(cfg)
    good = _sd_checkpoint(net)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_score_model("score_sde", tmp_path / "nope.pth", cfg)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="checkpoint: cannot read"):
        load_score_model("score_sde", bad, cfg)
    with pytest.raises(ValueError, match="family"):
        load_score_model("ncsn_v1", good, cfg)
    adm_sd = create_adm_model(ADM_SMALL).state_dict()
    with pytest.raises(ValueError, match="guided-diffusion.*family='guided_diffusion'"):
        load_score_model("score_sde", adm_sd, cfg)
    # missing / unexpected keys are listed
    ck = _sd_checkpoint(net)
    del ck["model"]["module.all_modules.3.Conv_0.weight"]
    ck["model"]["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['all_modules.3.Conv_0.weight'\].*unexpected keys "
                                         r"\['extra.weight'\]"):
        load_score_model("score_sde", ck, cfg)
    # a config that does not fit the checkpoint: shape mismatch names the parameter and both shapes
    other = _sde_config(nf=32)
    with pytest.raises(ValueError, match=r"shape mismatch for 'all_modules.0.weight': checkpoint has \(64, 16\), "
                                         r"the network built from the config expects \(128, 32\)"):
        load_score_model("score_sde", good, other)
    # EMA list of the wrong length / shape
    ck = _sd_checkpoint(net)
    ck["ema"]["shadow_params"] = ck["ema"]["shadow_params"][:-1]
    with pytest.raises(ValueError, match="shadow_params.*expected"):
        load_score_model("score_sde", ck, cfg)
    ck = _sd_checkpoint(net)
    ck["ema"]["shadow_params"][2] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shadow_params'\]\[2\].*all_modules.1.weight"):
        load_score_model("score_sde", ck, cfg)
    with pytest.raises(ValueError, match="fir=True is not supported"):
        load_score_model("score_sde", good, _sde_config(fir=True))
    with pytest.raises(ValueError, match="resblock_type"):
        load_score_model("score_sde", good, _sde_config(resblock_type="unknown"))
    with pytest.raises(ValueError, match="config"):
        load_score_model("score_sde", good, "cifar10.yml")


# ------------------------------------------------------------------------------------------------- ADM
def _legacy_attention(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """guided-diffusion's QKVAttentionLegacy arithmetic (q, k scaled by ch^-1/4 each, two einsums)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


def _new_order_attention(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", (q * scale).reshape(bs * n_heads, ch, length),
                     (k * scale).reshape(bs * n_heads, ch, length))
    w = torch.softmax(w.float(), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v.reshape(bs * n_heads, ch, length)).reshape(bs, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_adm_attention_matches_official_arithmetic(new_order):
    torch.manual_seed(0)
    blk = _randomize(AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order)).eval()
    x = torch.randn(2, 64, 8, 8) * 3
    with torch.no_grad():
        qkv = blk.qkv(blk.norm(x.reshape(2, 64, -1)))
        ref_attn = (_new_order_attention if new_order else _legacy_attention)(qkv, 4)
        ref = (x.reshape(2, 64, -1) + blk.proj_out(ref_attn)).reshape(x.shape)
        torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [
    {},
    {"resblock_updown": False, "use_scale_shift_norm": False, "num_head_channels": -1, "num_heads": 2},
    {"use_new_attention_order": True, "learn_sigma": False, "attention_resolutions": "16,8"},
    {"num_res_blocks": 2, "channel_mult": "1,1,2", "dropout": 0.1, "num_heads_upsample": 4,
     "num_head_channels": -1, "num_heads": 1},
])
def test_adm_shapes(extra):
    cfg = {**ADM_SMALL, **extra}
    net = _randomize(create_adm_model(cfg)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = net(x, torch.tensor([3, 999]))
    assert y.shape == (2, 6 if cfg["learn_sigma"] else 3, 16, 16) and torch.isfinite(y).all()


def test_adm_default_channel_mult_and_structure():
    assert adm_default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert adm_default_channel_mult(64) == (1, 2, 3, 4)
    with torch.device("meta"):  # structure only, no memory
        net = create_adm_model()  # DiffPure's ImageNet 256 uncond config
    assert net.channel_mult == (1, 1, 2, 2, 4, 4) and net.attention_resolutions == (8, 16, 32)
    assert net.out_channels == 6 and net.use_fp16 and net.dtype == torch.float32
    n = sum(p.numel() for p in net.parameters())
    assert 540e6 < n < 560e6  # 256x256_diffusion_uncond.pt has ~552.8M parameters
    keys = list(net.state_dict())
    assert keys[:4] == ["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias"]
    assert "input_blocks.3.0.h_upd" not in keys and "output_blocks.2.2.in_layers.0.weight" in keys
    with pytest.raises(ValueError, match="image_size"):
        create_adm_model({**ADM_SMALL, "channel_mult": ""})
    with pytest.raises(ValueError, match="unknown guided-diffusion keys"):
        create_adm_model({**ADM_SMALL, "num_chanels": 8})
    with pytest.raises(ValueError, match="divisible"):
        create_adm_model({**ADM_SMALL, "num_channels": 48})


def test_adm_fp16_torso_and_autocast():
    net = _randomize(create_adm_model(ADM_SMALL)).eval()
    x, ts = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        ref = net(x, ts)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), ts)
        torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
        for dt in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dt):
                y = net(x, ts)
            assert y.shape == ref.shape and torch.isfinite(y).all()
        net.convert_to_fp16(torch.bfloat16)
        assert net.input_blocks[0][0].weight.dtype == torch.bfloat16
        assert net.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # norms stay float32
        assert net.time_embed[0].weight.dtype == torch.float32 and net.out[2].weight.dtype == torch.float32
        y = net(x, ts)
        assert y.dtype == torch.float32 and (y - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2
        net.convert_to_fp32()
        torch.testing.assert_close(net(x, ts), ref, atol=1e-2, rtol=0)  # bf16 round trip of the weights


def test_adm_compiles_without_graph_breaks():
    net = _randomize(create_adm_model(ADM_SMALL)).eval()
    x, ts = torch.randn(2, 3, 16, 16), torch.tensor([3, 999])
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ts), net(x, ts))


def test_guided_loader(tmp_path):
    net = _randomize(create_adm_model(ADM_SMALL))
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    model = load_score_model("guided_diffusion", path, ADM_SMALL)
    assert isinstance(model.net, UNetModel) and model.time_input == "discrete" and model.learned_sigma
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.1234, 0.9])
    with torch.no_grad():
        out = net.eval()(x, (t * 1000).long())
        torch.testing.assert_close(model.eps(x, t), out[:, :3], atol=0, rtol=0)
    # use_fp16 on CPU stays float32 by default; dtype forces the official torso conversion
    m16 = load_score_model("guided_diffusion", net.state_dict(), {**ADM_SMALL, "use_fp16": True})
    assert m16.net.dtype == torch.float32
    mbf = load_score_model("guided_diffusion", net.state_dict(), ADM_SMALL, dtype=torch.bfloat16)
    assert mbf.net.dtype == torch.bfloat16 and mbf.net.input_blocks[0][0].weight.dtype == torch.bfloat16


def test_guided_loader_errors():
    net = create_adm_model(ADM_SMALL)
    sd = net.state_dict()
    sde = NCSNpp.from_config(_sde_config())
    with pytest.raises(ValueError, match="score_sde.*family='score_sde'"):
        load_score_model("guided_diffusion", _sd_checkpoint(sde), ADM_SMALL)
    with pytest.raises(ValueError, match="score_sde.*family='score_sde'"):
        load_score_model("guided_diffusion", sde.state_dict(), ADM_SMALL)
    bad = dict(sd)
    bad.pop("out.2.bias")
    with pytest.raises(ValueError, match=r"missing keys \['out.2.bias'\]"):
        load_score_model("guided_diffusion", bad, ADM_SMALL)
    with pytest.raises(ValueError, match=r"shape mismatch for 'out.2.weight'.*\(6, 32, 3, 3\).*\(3, 32, 3, 3\)"):
        load_score_model("guided_diffusion", sd, {**ADM_SMALL, "learn_sigma": False})
    with pytest.raises(ValueError, match="class_cond"):
        load_score_model("guided_diffusion", sd, {**ADM_SMALL, "class_cond": True})
    with pytest.raises(ValueError, match="num_head_channels"):
        load_score_model("guided_diffusion", sd, {**ADM_SMALL, "num_head_channels": 24})


def test_configs_as_namespaces():
    import argparse

    def ns(d):
        return argparse.Namespace(**{k: ns(v) if isinstance(v, dict) else v for k, v in d.items()})

    cfg = _sde_config()
    net = _randomize(NCSNpp.from_config(cfg))
    m = load_score_model("score_sde", net.state_dict(), ns(cfg))
    assert m.net.nf == 16
    adm = create_adm_model(ADM_SMALL)
    m = load_score_model("guided_diffusion", adm.state_dict(), argparse.Namespace(**ADM_SMALL))
    assert m.net.model_channels == 32


# ------------------------------------------------------------------------------------------- issue 17: configs
def test_score_sde_beta_range_from_the_config_is_the_models_schedule():
    import diffpure_fast as dpf

    cfg = _sde_config(beta_max=10.0)
    net = _randomize(NCSNpp.from_config(cfg), seed=2).eval()
    model = load_score_model("score_sde", net.state_dict(), cfg)
    assert model.schedule == dpf.VPSchedule(0.1, 10.0, 1000)
    hand = EpsModel(net, time_input="continuous", schedule=dpf.VPSchedule(0.1, 10.0))
    x = torch.rand(2, 3, 16, 16)
    kw = dict(t_star=0.2, steps=3, seed=1)
    ours = dpf.purify(x, model, **kw)
    torch.testing.assert_close(ours, dpf.purify(x, hand, **kw), rtol=0, atol=0)
    # it matters: DiffPure's 0.1..20 schedule (what the config was silently run with) gives another result
    plain = EpsModel(net, time_input="continuous")
    assert (ours - dpf.purify(x, plain, **kw)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="schedule: .*contradicts"):
        dpf.purify(x, model, schedule=dpf.DIFFPURE_SCHEDULE, **kw)
    # continuous models take labels 999 t whatever num_scales says (score_sde's get_score_fn)
    net2000 = _randomize(NCSNpp.from_config(_sde_config(num_scales=2000)), seed=2).eval()
    m2000 = load_score_model("score_sde", net2000.state_dict(), _sde_config(num_scales=2000))
    assert m2000.schedule.num_levels == 2000
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(m2000.eps(x, t), net2000(x, 999 * t), rtol=0, atol=0)


@pytest.mark.parametrize("training, match", [
    ({"sde": "vesde"}, "config: training.sde is 'vesde': only 'vpsde'"),
    ({"sde": "subvpsde"}, "config: training.sde is 'subvpsde'"),
    ({"continuous": False}, "config: training.continuous is False"),
])
def test_score_sde_configs_of_other_sdes_are_refused(training, match):
    cfg = _sde_config()
    cfg["training"].update(training)
    net = NCSNpp.from_config(_sde_config())
    with pytest.raises(ValueError, match=match):
        load_score_model("score_sde", net.state_dict(), cfg)
    with pytest.raises(ValueError, match="config: model.beta_max: expected a value > beta_min"):
        load_score_model("score_sde", net.state_dict(), _sde_config(beta_max=0.05))


@pytest.mark.parametrize("extra, match", [
    ({"noise_schedule": "cosine"}, "config: noise_schedule is 'cosine'"),
    ({"predict_xstart": True}, "config: predict_xstart is True"),
    ({"diffusion_steps": 4000, "rescale_timesteps": True}, "config: rescale_timesteps with diffusion_steps = 4000"),
    ({"diffusion_steps": 4000.0}, "config: diffusion_steps: expected an int"),
])
def test_guided_configs_that_change_the_output_are_refused(extra, match):
    sd = create_adm_model(ADM_SMALL).state_dict()
    with pytest.raises(ValueError, match=match):
        load_score_model("guided_diffusion", sd, {**ADM_SMALL, **extra})


def test_guided_linear_schedule_of_other_lengths_is_supported():
    import diffpure_fast as dpf

    net = _randomize(create_adm_model(ADM_SMALL)).eval()
    m = load_score_model("guided_diffusion", net.state_dict(), {**ADM_SMALL, "diffusion_steps": 500,
                                                                "rescale_timesteps": False, "use_kl": True,
                                                                "timestep_respacing": "250"})
    # guided-diffusion's linear betas for T steps: linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    assert m.schedule == dpf.VPSchedule(0.1, 20.0, 500)
    betas = torch.linspace(1e-4 * 2, 0.02 * 2, 500, dtype=torch.float64)
    torch.testing.assert_close(m.schedule.discrete_betas(), betas)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([0.5])
    with torch.no_grad():
        torch.testing.assert_close(m.eps(x, t), net(x, torch.tensor([250]))[:, :3], rtol=0, atol=0)


# ------------------------------------------------------------------------------ issue 17: one state-dict normaliser
@pytest.mark.parametrize("wrap", [
    lambda sd: {"module." + k: v for k, v in sd.items()},                        # nn.DataParallel
    lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},                     # torch.compile
    lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},              # both
    lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}},          # PyTorch Lightning
    lambda sd: {"model_state_dict": sd, "epoch": 3},
    lambda sd: {"ema": {"module." + k: v for k, v in sd.items()}},
])
def test_wrapped_state_dicts_load_alike_for_every_family(tmp_path, wrap):
    net = _randomize(create_adm_model(ADM_SMALL)).eval()
    path = tmp_path / "adm.pt"
    torch.save(wrap(net.state_dict()), path)
    adm = load_score_model("guided_diffusion", path, ADM_SMALL)
    ref = load_score_model("guided_diffusion", net.state_dict(), ADM_SMALL)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(adm.eps(x, t), ref.eps(x, t), rtol=0, atol=0)
    cfg = _sde_config()
    sde = _randomize(NCSNpp.from_config(cfg), seed=3).eval()
    torch.save(wrap(sde.state_dict()), tmp_path / "sde.pt")
    got = load_score_model("score_sde", tmp_path / "sde.pt", cfg)
    with torch.no_grad():
        torch.testing.assert_close(got.eps(x, t), sde(x, 999 * t), rtol=0, atol=0)


def test_digits_weights_with_wrapper_prefixes_load(tmp_path):
    from diffpure_fast.models.classifier import DigitsClassifier
    from diffpure_fast.models.digits import load_digits_classifier, save_weights

    clf = DigitsClassifier(channels=(4, 8), hidden=16).eval()
    wrapped = torch.nn.DataParallel(clf)                       # keys "module.features.0.weight", ...
    path = save_weights(wrapped, tmp_path / "c.safetensors", clf.config, kind="classifier")
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(load_digits_classifier(path=path)(x), clf(x))


def test_a_key_missing_after_normalisation_names_the_file_and_the_key(tmp_path):
    sd = {"module." + k: v for k, v in create_adm_model(ADM_SMALL).state_dict().items()}
    del sd["module.out.2.bias"]
    path = tmp_path / "dp.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"checkpoint '{path}': state dict does not match the network: missing "
                                         rf"keys \['out.2.bias'\]"):
        load_score_model("guided_diffusion", path, ADM_SMALL)
    with pytest.raises(ValueError, match=r"checkpoint: holds several state dicts \('model', 'ema'\)"):
        load_score_model("guided_diffusion", {"model": dict(sd), "ema": dict(sd)}, ADM_SMALL)
