"""``evaluate``: attack a purification defense and judge it with an explicit protocol, resumable and sharded.

For each sample (global index i of the data set):

1. clean: the defense classifies x ``n_eval`` times with fresh noise (seed ``derive_seed(seed, 'eval-clean', e)``,
   noise id i);
2. attack: PGD-EOT (``pgd-eot``), DiffPure's BPDA+EOT (``bpda-eot``: PGD-EOT through ``grad_mode="bpda"``, 50
   steps of 2/255, 15 EOT draws averaged in logits) or AutoAttack (``autoattack``, either package) produces x_adv;
3. judge: the defense classifies x_adv ``n_eval`` times with noise the attack never saw (``'eval-adv'`` seeds).

Samples go in blocks of ``batch_size`` consecutive indices; under ``torchrun`` rank r takes blocks r, r + W, ...
Each finished block is appended to the rank's records file at once, so a killed run restarted with the same
arguments skips finished samples (``records``), and rank 0 merges every file into ``report.md``/``report.json``.
All randomness derives from (seed, global index), so the numbers do not depend on the batch size, the resume
point or the process count (AutoAttack excepted: it draws from its own batches, so its blocks are part of the
configuration).
"""

from __future__ import annotations

import base64
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .._validate import OptionError, check_float, check_int
from ..attacks import DefendedClassifier, derive_seed, pgd_eot
from ..attacks.pgd import EOT_REDUCTIONS, LOSSES, NORMS
from . import records as rec
from .defenses import describe_defense

__all__ = ["ATTACKS", "BPDA_EOT_SETTINGS", "EvalConfig", "evaluate", "evaluate_batch"]

ATTACKS = ("pgd-eot", "bpda-eot", "autoattack")
# DiffPure's BPDA+EOT (bpda_eot/bpda_eot_attack.py): identity backward, 50 steps of 2/255, 15 EOT, logits averaged
BPDA_EOT_SETTINGS = {"steps": 50, "step_size": 2 / 255, "eot": 15, "eot_reduce": "logits"}
PGD_EOT_DEFAULTS = {"steps": 20, "step_size": None, "eot": 20, "eot_reduce": "loss"}
# Test hooks: exit hard (as a kill would) after this many blocks were written; sleep this long after each block
# (so that a test's SIGKILL lands between two known blocks).
STOP_ENV = "DIFFPURE_FAST_EVAL_STOP_AFTER"
PAUSE_ENV = "DIFFPURE_FAST_EVAL_PAUSE_S"


@dataclass(frozen=True)
class EvalConfig:
    """Every option that decides an evaluation's numbers (written to ``config.json``).

    eps in [0, 1] pixel units (L-inf 8/255 and L2 0.5 are CIFAR-10's usual radii); steps/step_size/eot/eot_reduce
    default to the attack's own settings (pgd-eot: 20 steps of 2.5 eps / steps, 20 EOT; bpda-eot: DiffPure's);
    n_eval: fresh-noise evaluations per sample; n_images: samples from index ``start`` (None: to the end);
    batch_size: samples per block; chunk_size: at most this many image copies per purifier call (memory budget;
    None: a whole block's eot * batch_size).
    """

    attack: str = "pgd-eot"
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int | None = None
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    eot: int | None = None
    eot_reduce: str | None = None
    aa_version: str = "rand"
    aa_package: str = "auto"
    n_eval: int = 10
    n_images: int | None = None
    start: int = 0
    seed: int = 0
    batch_size: int = 16
    chunk_size: int | None = None
    grid_images: int = 8

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise ValueError(f"attack: expected one of {ATTACKS}, got {self.attack!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {self.norm!r}")
        object.__setattr__(self, "eps", check_float("eps", self.eps, low=0.0))
        if self.norm == "linf" and self.eps > 1:
            raise OptionError("eps", f"an L-inf radius is in [0, 1] pixel units, got {self.eps} (did you mean "
                                     f"{self.eps:g}/255?)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        defaults = BPDA_EOT_SETTINGS if self.attack == "bpda-eot" else PGD_EOT_DEFAULTS
        for k, v in defaults.items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        if self.attack == "autoattack":
            from ..attacks.autoattack import AA_PACKAGES, AA_VERSIONS

            if self.aa_version not in AA_VERSIONS:
                raise ValueError(f"aa_version: expected one of {AA_VERSIONS}, got {self.aa_version!r}")
            if self.aa_package not in ("auto", *AA_PACKAGES):
                raise ValueError(f"aa_package: expected 'auto' or one of {AA_PACKAGES}, got {self.aa_package!r}")
        if self.eot_reduce not in EOT_REDUCTIONS:
            raise ValueError(f"eot_reduce: expected one of {EOT_REDUCTIONS}, got {self.eot_reduce!r}")
        # one integer rule for the package (diffpure_fast._validate); a NumPy integer is stored as the int it is
        for name, lo in (("steps", 0), ("restarts", 1), ("eot", 1), ("n_eval", 1), ("start", 0), ("seed", 0),
                         ("batch_size", 1), ("grid_images", 0), ("n_images", 1), ("chunk_size", 1)):
            v = getattr(self, name)
            if v is not None or name not in ("n_images", "chunk_size"):
                object.__setattr__(self, name, check_int(name, v, low=lo))
        if self.step_size is not None:
            object.__setattr__(self, "step_size", check_float("step_size", self.step_size, low=0.0, low_open=True))

    @property
    def resolved_step_size(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / max(self.steps, 1)

    def deciding(self) -> dict:
        """The options that decide the numbers (batch and chunk sizes only decide AutoAttack's)."""
        d = asdict(self)
        d["step_size"] = self.resolved_step_size
        if self.attack != "autoattack":
            for k in ("batch_size", "aa_version", "aa_package"):
                d.pop(k)
        else:
            for k in ("steps", "step_size", "random_start", "restarts", "loss", "eot", "eot_reduce"):
                d.pop(k)
        d.pop("chunk_size")
        return d


# ---------------------------------------------------------------------------------------------------------------


def _predict_n(defended: DefendedClassifier, x, ids, cfg: EvalConfig, purpose: str, keep_first: bool = False):
    """(n_eval, B) predictions of the defense on x, evaluation e with seed derive_seed(seed, purpose, e)."""
    preds, first = [], None
    step = cfg.chunk_size or x.shape[0]
    with torch.no_grad():
        for e in range(cfg.n_eval):
            seed = derive_seed(cfg.seed, purpose, e)
            p, pur = [], []
            for c0 in range(0, x.shape[0], step):
                xp = defended.purify(x[c0:c0 + step], seed=seed, noise_ids=ids[c0:c0 + step])
                p.append(defended.classifier(xp).argmax(1))
                if keep_first and e == 0:
                    pur.append(xp)
            preds.append(torch.cat(p).cpu())
            if keep_first and e == 0:
                first = torch.cat(pur).cpu()
    return torch.stack(preds), first


def _encode_image(img: torch.Tensor) -> dict:
    """An image (C, H, W) in [0, 1] as base64 uint8 (for the report's grid only; the numbers never use it)."""
    a = (img.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return {"shape": list(a.shape), "uint8_b64": base64.b64encode(a.tobytes()).decode()}


def evaluate_batch(defended: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor,
                   cfg: EvalConfig, *, positions=None, progress=None) -> list[dict]:
    """Attack and judge one batch; returns one record (dict) per sample (see ``evaluate``).

    x: (B, C, H, W) in [0, 1] on the defense's device; y: (B,) int64; sample_ids: (B,) int64 global indices (all
    noise and attack randomness derive from them and ``cfg.seed``). positions: each sample's position in the
    evaluated selection (samples at positions < cfg.grid_images carry their images for the report's grid).
    progress: called with 1 per attack step.
    """
    t0 = time.perf_counter()
    ids = sample_ids.to(x.device)
    clean, _ = _predict_n(defended, x, ids, cfg, "eval-clean")
    trace = losses = None
    if cfg.attack == "autoattack":
        from ..attacks import CallCountedModel
        from ..attacks.autoattack import run_autoattack

        block_seed = derive_seed(cfg.seed, "autoattack", int(sample_ids[0]))
        model = CallCountedModel(defended, block_seed)
        x_adv = run_autoattack(model, x, y, norm=cfg.norm, eps=cfg.eps, version=cfg.aa_version,
                               seed=block_seed % (1 << 31), batch_size=x.shape[0], package=cfg.aa_package,
                               device=x.device).detach()
        if progress is not None:
            progress(1)
    else:
        res = pgd_eot(defended, x, y, ids, eps=cfg.eps, steps=cfg.steps, norm=cfg.norm,
                      step_size=cfg.resolved_step_size, random_start=cfg.random_start, restarts=cfg.restarts,
                      loss=cfg.loss, eot=cfg.eot, eot_reduce=cfg.eot_reduce, seed=cfg.seed,
                      chunk_size=cfg.chunk_size, progress=progress)
        x_adv, trace, losses = res.x_adv, res.pred_trace, res.loss_trace
    adv, purified = _predict_n(defended, x_adv, ids, cfg, "eval-adv", keep_first=True)
    delta = (x_adv - x).flatten(1).double().cpu()
    per_sample_s = (time.perf_counter() - t0) / x.shape[0]
    out = []
    for b in range(x.shape[0]):
        r = {"index": int(sample_ids[b]), "label": int(y[b]), "clean_pred": clean[:, b].tolist(),
             "adv_pred": adv[:, b].tolist(), "linf": float(delta[b].abs().max()), "l2": float(delta[b].norm()),
             "seeds": {"base": cfg.seed, "attack_start": derive_seed(cfg.seed, "start", 0, int(sample_ids[b]))}}
        if trace is not None:
            r["attack_pred_trace"] = trace[:, :, b].tolist()
            r["attack_loss_trace"] = [[round(float(v), 9) for v in row] for row in losses[:, :, b]]
        if positions is not None and positions[b] < cfg.grid_images:
            r["images"] = {"clean": _encode_image(x[b]), "adversarial": _encode_image(x_adv[b]),
                           "purified": _encode_image(purified[b])}
        r["time_s"] = per_sample_s
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------------


def _dist_context(device):
    """(rank, world, device): torch.distributed's when initialised or when torchrun set WORLD_SIZE > 1."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, device
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.device(device).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        return 0, 1, device
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.device(device).type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return rank, world, device


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def environment(command: str | None, world: int) -> dict:
    """Versions and machine of a run (written to environment.json; the report quotes it)."""
    import importlib.metadata as md

    from .. import __version__
    from ..info import info

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = info()
    return {"command": command or " ".join(sys.argv), "diffpure_fast": __version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "world_size": world,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "fused_step": env.get("active_implementation"),
            "packages": {p: version(p) for p in ("autoattack", "pyautoattack", "tqdm", "matplotlib")}}


def evaluate(defense, classifier, data, output, *, config: EvalConfig | None = None, labels=None,
             device="cpu", progress: bool = True, overwrite: bool = False, command: str | None = None,
             report: bool = True, **options) -> dict | None:
    """Evaluate ``defense`` (+ ``classifier``) on ``data`` against an attack; records and report in ``output``.

    Args:
        defense: a ``Purifier`` (e.g. ``build_defense(model, grad_mode="full")``; its grad_mode is the attack's
            gradient), or None for the undefended classifier.
        classifier: an ``nn.Module`` taking (B, C, H, W) in [0, 1] to logits (B, K), or a spec (``"digits"``, a
            TorchScript file, ``"module:function"``).
        data: a spec (``"digits:test"``, ``"cifar10:FOLDER"``, an image folder, ``.npz``, ``.npy`` with
            ``labels=``), an ``(x, y)`` pair of tensors, or a map-style ``torch.utils.data.Dataset``.
        output: a folder; a finished or killed run there with the same configuration is resumed, another
            configuration is refused unless ``overwrite``.
        config / options: an ``EvalConfig``, or its fields as keywords (attack, norm, eps, steps, eot, n_eval, ...).
        progress: a tqdm bar with live robust accuracy and ETA (False: quiet).
    Returns:
        the report dict (rank 0; None on other ranks), also written as report.json / report.md.
    """
    from .classifiers import load_classifier_spec
    from .datasets import load_data

    if config is None:
        config = EvalConfig(**options)
    elif options:
        raise TypeError(f"options: give either config or keyword options, not both ({sorted(options)})")
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config: expected an EvalConfig, got {type(config).__name__}")
    cfg = config
    if cfg.attack == "autoattack":
        from ..attacks.autoattack import autoattack_package

        autoattack_package(cfg.aa_package)  # a missing package fails now, not after the clean evaluation
    rank, world, device = _dist_context(device)
    clf = load_classifier_spec(classifier, device)
    if defense is not None:
        defense = defense.to(device)
        gm = defense.config.grad_mode
        if cfg.attack == "bpda-eot" and gm != "bpda":
            raise OptionError("attack", lambda s: (
                f"'bpda-eot' is PGD-EOT through {s.setting('grad_mode', 'bpda')} (DiffPure's BPDA+EOT); the defense "
                f"has {s.setting('grad_mode', gm)} (use {s.setting('grad_mode', 'bpda')}, or "
                f"{s.setting('attack', 'pgd-eot')})"))
        if gm == "none":
            raise OptionError("defense", lambda s: f"{s.setting('grad_mode', 'none')} gives the attack no gradient; "
                                                   f"use 'full', 'adjoint', 'bpda' or 'surrogate'")
    defended = DefendedClassifier(defense, clf)
    source = load_data(data, labels=labels)
    end = len(source) if cfg.n_images is None else cfg.start + cfg.n_images
    if cfg.start >= len(source):
        raise OptionError("start", f"{source.description} has {len(source)} samples (indices 0..{len(source) - 1}), "
                                   f"got {cfg.start}")
    if end > len(source):
        raise OptionError("n_images", lambda s: f"{source.description} has {len(source)} samples; "
                                                f"{s.setting('start', cfg.start)} with "
                                                f"{s.setting('n_images', cfg.n_images)} asks for indices up to "
                                                f"{end - 1}")
    indices = list(range(cfg.start, end))

    out = Path(output)
    deciding = {"eval": cfg.deciding(), "defense": describe_defense(defense), "grad_mode": defended.grad_mode,
                "classifier": classifier if isinstance(classifier, str) else type(clf).__name__,
                "data": source.description, "n_samples": len(indices)}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        resumed = rec.check_config(out, deciding, overwrite=overwrite)
        env = environment(command, world)
        env["resumed"] = resumed
        env["run_options"] = {"batch_size": cfg.batch_size, "chunk_size": cfg.chunk_size, "device": str(device)}
        (out / "environment.json").write_text(json.dumps(env, indent=2))
    _barrier()
    if rank != 0:
        rec.check_config(out, deciding)  # raises if rank 0 wrote another configuration (cannot happen in one run)

    done = set(rec.read_records(out))
    blocks = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    mine = [[i for i in blk if i not in done] for blk in blocks[rank::world]]
    mine = [blk for blk in mine if blk]
    position = {i: k for k, i in enumerate(indices)}
    stop_after = int(os.environ.get(STOP_ENV, "0"))
    pause = float(os.environ.get(PAUSE_ENV, "0"))
    steps_per_block = 1 if cfg.attack == "autoattack" else cfg.restarts * (cfg.steps + 1)

    from tqdm.auto import tqdm

    writer = rec.RecordWriter(out, rank)
    bar = tqdm(total=len(mine) * steps_per_block, desc=f"{cfg.attack} (rank {rank})" if world > 1 else cfg.attack,
               unit="step", disable=not progress, dynamic_ncols=True)
    n_done = n_robust = 0
    try:
        for k, blk in enumerate(mine):
            x, y = source.get(blk)
            recs = evaluate_batch(defended, x.to(device), y.to(device), torch.tensor(blk), cfg,
                                  positions=[position[i] for i in blk], progress=bar.update)
            for r in recs:
                r["rank"] = rank
            writer.write(recs)
            n_done += len(recs)
            n_robust += sum(r["adv_pred"][0] == r["label"] for r in recs)
            bar.set_postfix_str(f"robust {n_robust}/{n_done} = {100 * n_robust / n_done:.1f}%")
            if stop_after and k + 1 >= stop_after:
                os._exit(17)  # test hook: die like a killed process, no cleanup
            if pause:
                time.sleep(pause)
    finally:
        bar.close()
        writer.close()
    _barrier()
    if rank != 0 or not report:
        return None
    from .report import write_report

    return write_report(out)
