"""``evaluate``: attack a purification defense and judge it with an explicit protocol, resumable and sharded.

For each sample (global index i of the data set):

1. clean: the defense classifies x ``n_eval`` times, evaluation e with seed ``derive_seed(seed, 'eval', e)`` and
   noise id i;
2. attack: one of ``eval.attacks.ATTACKS`` (PGD-EOT, DiffPure's BPDA+EOT, APGD-EOT, DiffAttack, DiffHammer, the
   unrestricted LF, PPGD and StAdv, AutoAttack native or as released) attacks *every* sample, whatever one clean
   evaluation said, and leaves one candidate per run (restart, target class, ensemble member); when there are
   several, the candidate misclassified most often by ``n_select`` fresh-noise evaluations is kept
   (``attacks.selection``). The clean input is never a candidate: only AutoAttack as released can return it, and the
   report flags every sample judged at distance 0;
3. judge: the defense classifies x_adv ``n_eval`` times with the clean evaluations' noise (the same seeds and ids:
   common random numbers, so robust and clean accuracy differ by the perturbation, not by the draws), which the
   attack and the selection never saw.

Samples go in blocks of ``batch_size`` consecutive indices; under ``torchrun`` rank r takes blocks r, r + W, ...
Each finished block is appended to the rank's records file at once, so a killed run restarted with the same
arguments skips finished samples (``records``), and rank 0 merges every file into ``report.md``/``report.json``.
All randomness derives from (seed, global index), so the numbers do not depend on the batch size, the resume
point or the process count (except where a package draws from its own batches: AutoAttack as released, and FAB
and Square in the native standard version; their blocks are then part of the configuration).
"""

from __future__ import annotations

import base64
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import InitVar, asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .._validate import OptionError, OptionTypeError, check_bool, check_choice, check_float, check_int
from ..attacks import DefendedClassifier, derive_seed
from ..attacks.pgd import EOT_REDUCTIONS, LOSSES, NORMS, TARGETED_LOSSES
from ..attacks.selection import select_candidates
from . import records as rec
from .attacks import ATTACK_SPECS, ATTACKS, AttackRun, noise_seed
from .defenses import describe_defense, module_fingerprint

__all__ = ["ATTACKS", "ATTACK_OPTIONS", "EvalConfig", "check_input_size", "evaluate", "evaluate_batch"]

# The options each attack takes (``AttackSpec.options``); AutoAttack as released takes fewer. Any other attack
# option given is an error naming it.
ATTACK_OPTIONS = {name: spec.options for name, spec in ATTACK_SPECS.items()}
_AS_RELEASED_OPTIONS = ("eps", "norm", "aa_version", "aa_package", "aa_mode")
# Options added after records existed: recorded only when they change a run (None or False is left out), so that
# earlier evaluation folders still resume.
_OPTIONAL_RECORDED = ("fixed_noise", "n_targets")
# Test hooks: exit hard (as a kill would) after this many blocks were written; sleep this long after each block
# (so that a test's SIGKILL lands between two known blocks).
STOP_ENV = "DIFFPURE_FAST_EVAL_STOP_AFTER"
PAUSE_ENV = "DIFFPURE_FAST_EVAL_PAUSE_S"


@dataclass(frozen=True)
class EvalConfig:
    """Every option that decides an evaluation's numbers (written to ``config.json``).

    attack: one of ``ATTACKS`` (``eval.attacks``): ``"pgd-eot"``, ``"bpda-eot"`` (DiffPure's BPDA+EOT settings),
    ``"apgd-eot"`` (``attacks.apgd``), ``"diffattack"``, ``"diffhammer"``, ``"lf"``, ``"ppgd"``, ``"stadv"`` or
    ``"autoattack"``. The attack options default to the attack's own settings when None, and an option the attack does
    not take is an error naming it (``ATTACK_OPTIONS``):

    * threat model: the L-p attacks (pgd-eot, bpda-eot, apgd-eot, diffattack, diffhammer, autoattack) take ``norm``
      ("linf") and ``eps`` in [0, 1] pixel units (8/255; L-inf 8/255 and L2 0.5 are CIFAR-10's usual radii); the
      unrestricted ones take ``bound`` instead: an LPIPS distance for lf and ppgd (0.5, Laidlaw et al.'s AlexNet
      bound on CIFAR-10) over the network ``lpips`` (required: ``"digits"``, ``"alexnet:PATH"``, ``"vgg16:PATH"``
      or ``"module:function"``, ``attacks.perceptual``), the flow's size for stadv (0.05, grid_sample units);
    * pgd-eot: attack_steps 20 of step_size 2.5 eps / attack_steps, eot 20, eot_reduce "loss", restarts 1, loss
      "ce", random start;
      bpda-eot: 50 steps of 2/255, eot 15 averaged in logits;
    * apgd-eot: attack_steps 100, eot 20, restarts 1, loss "ce" (its step size adapts from 2 eps; it always starts at a
      random point); diffattack: the same with dev_weight 1.0 (lambda) and dev_every 1 (every state of the chain);
      diffhammer: attack_steps 50, eot 10 (the N paths), restarts 3;
    * lf: attack_steps 100 of step_size 0.01, lf_factor 4; ppgd: attack_steps 10; stadv: attack_steps 100 of
      step_size 0.01, smoothness 0.05; all three eot 20 and loss "cw";
    * autoattack: aa_mode "native" (every sample attacked, each run's best iterate kept, the candidate chosen by
      fresh-noise evaluations; ``attacks.autoattack``) or "as-released" (the unpatched package: its single noisy
      evaluation decides which samples are attacked and falls back to the clean input; labelled so in the report);
      aa_version "rand" (APGD-CE + APGD-DLR, 20 EOT) or "standard"; aa_package "auto"; in the native mode
      attack_steps (100), eot (rand 20, standard 1), restarts (1) and aa_queries (Square's, standard only: 5000) may
      be set.

    loss: "ce", "dlr", "cw", or a targeted loss ("dlr-targeted", "cw-targeted") run against each of the top
    ``n_targets`` classes (default 9, AutoAttack's; more than K - 1 is an error). fixed_noise: the attack optimises
    against one fixed set of eot draws per sample (the judge's noise stays fresh; ``eval.attacks``), default False.
    n_select: fresh-noise evaluations that choose among a sample's candidates when an attack leaves several
    (restarts, targets, the runs of AutoAttack's ensemble; ``attacks.selection``); default n_eval.
    n_eval: fresh-noise evaluations that judge each sample; n_images: samples from index ``start`` (None: to the
    end); subset, data_seed: instead of that range, DiffPure's seeded random subset of ``subset`` samples
    (``np.random.RandomState(data_seed).choice``, data_seed 0 by default; ``datasets.select_indices``);
    batch_size: samples per block; chunk_size: at most this many image copies per purifier call (memory
    budget; None: a whole block's eot * batch_size).
    """

    attack: str = "pgd-eot"
    norm: str | None = None
    eps: float | None = None
    attack_steps: int | None = None
    step_size: float | None = None
    random_start: bool | None = None
    restarts: int | None = None
    loss: str | None = None
    eot: int | None = None
    eot_reduce: str | None = None
    fixed_noise: bool | None = None
    n_targets: int | None = None
    dev_weight: float | None = None
    dev_every: int | None = None
    bound: float | None = None
    lpips: str | None = None
    lf_factor: int | None = None
    smoothness: float | None = None
    aa_version: str | None = None
    aa_package: str | None = None
    aa_mode: str | None = None
    aa_queries: int | None = None
    n_select: int | None = None
    n_eval: int = 10
    n_images: int | None = None
    start: int = 0
    subset: int | None = None
    data_seed: int | None = None
    seed: int = 0
    batch_size: int = 16
    chunk_size: int | None = None
    grid_images: int = 8

    # the deprecated name of attack_steps (until the next release): "steps" is the solver's everywhere else
    steps: InitVar[int | None] = None

    def __post_init__(self, steps=None):
        if steps is not None:
            if self.attack_steps is not None:
                raise OptionError("steps", "the deprecated name of attack_steps; give attack_steps only")
            warnings.warn("EvalConfig/evaluate: steps= is deprecated and will be removed in the next release; use "
                          "attack_steps= (steps means solver steps in build_defense and purify)", DeprecationWarning,
                          stacklevel=3)
            object.__setattr__(self, "attack_steps", steps)
        if self.attack not in ATTACKS:
            raise OptionError("attack", f"expected one of {ATTACKS}, got {self.attack!r}")
        if self.attack == "autoattack":
            from ..attacks.autoattack import AA_MODES, AA_PACKAGES, AA_VERSIONS

            for name, default, choices in (("aa_mode", "native", AA_MODES), ("aa_version", "rand", AA_VERSIONS),
                                           ("aa_package", "auto", ("auto", *AA_PACKAGES))):
                v = getattr(self, name)
                if v is None:
                    object.__setattr__(self, name, default)
                elif v not in choices:
                    raise OptionError(name, f"expected one of {choices}, got {v!r}")
        takes = self.attack_options
        for name in sorted(set().union(*ATTACK_OPTIONS.values()) - set(takes)):
            if getattr(self, name) is not None:
                raise OptionError(name, lambda sp, takes=takes: (
                    f"not an option of {sp.setting('attack', self.attack)}"
                    + (f" with {sp.setting('aa_mode', self.aa_mode)}" if self.attack == "autoattack" else "")
                    + f" (its options: {', '.join(sp.name(t) for t in takes)})"))
        if self.n_targets is not None and self.loss not in TARGETED_LOSSES:
            raise OptionError("n_targets", lambda sp: f"the number of target classes of a targeted loss "
                              f"{TARGETED_LOSSES}, given " + (f"with {sp.setting('loss', self.loss)}" if self.loss
                                                              else f"without {sp.name('loss')} (the default is "
                                                                   f"untargeted)"))
        self._resolve_defaults()
        if self.norm is not None:
            check_choice("norm", self.norm, NORMS)
        if self.eps is not None:
            object.__setattr__(self, "eps", check_float("eps", self.eps, low=0.0))
            if self.norm == "linf" and self.eps > 1:
                raise OptionError("eps", f"an L-inf radius is in [0, 1] pixel units, got {self.eps} (did you mean "
                                         f"{self.eps:g}/255?)")
        losses = LOSSES + (TARGETED_LOSSES if "n_targets" in takes else ())
        if self.loss is not None:
            check_choice("loss", self.loss, losses)
        if self.eot_reduce is not None and self.eot_reduce not in EOT_REDUCTIONS:
            raise OptionError("eot_reduce", f"expected one of {EOT_REDUCTIONS}, got {self.eot_reduce!r}")
        # one integer rule for the package (diffpure_fast._validate); a NumPy integer is stored as the int it is.
        # Attack options may be None here only where the attack does not take them.
        for name, lo in (("attack_steps", 0), ("restarts", 1), ("eot", 1), ("n_eval", 1), ("n_select", 1), ("start", 0),
                         ("seed", 0), ("batch_size", 1), ("grid_images", 0), ("aa_queries", 1), ("n_images", 1),
                         ("chunk_size", 1), ("subset", 1), ("data_seed", 0), ("n_targets", 1), ("dev_every", 1),
                         ("lf_factor", 1)):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, check_int(name, v, low=lo))
        for name, strict in (("step_size", True), ("bound", True), ("dev_weight", False), ("smoothness", False)):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, check_float(name, v, low=0.0, low_open=strict))
        for name in ("random_start", "fixed_noise"):
            v = getattr(self, name)
            if v is not None:
                check_bool(name, v)
        if self.spec.threat != "lp" and self.attack_steps == 0:
            raise OptionError("attack_steps", lambda sp: f"{sp.setting('attack', self.attack)} needs at least one "
                                                         f"step (its start is the clean image)")
        if self.spec.threat == "lpips" and not isinstance(self.lpips, str):
            raise OptionError("lpips", lambda sp: f"{sp.setting('attack', self.attack)} is bounded in LPIPS and needs "
                              f"its network: 'digits', 'alexnet:PATH' or 'vgg16:PATH' (a local torchvision state dict; "
                              f"nothing is downloaded), or 'module:function'; got {self.lpips!r}")

    def _resolve_defaults(self) -> None:
        """The attack's own settings for the options left None (recorded as used)."""
        from ..attacks.autoattack import AA_SETTINGS

        defaults = dict(self.spec.defaults)
        takes = self.attack_options
        if "eps" in takes:
            defaults.update(eps=8 / 255, norm="linf")
        if self.attack == "autoattack" and self.aa_mode == "native":
            s = AA_SETTINGS[self.aa_version]
            defaults.update(attack_steps=s["steps"], eot=s["eot"], restarts=s["restarts"])
            if self.aa_version == "standard":
                defaults["aa_queries"] = s["queries"]
            elif self.aa_queries is not None:
                raise OptionError("aa_queries", lambda sp: f"Square's query count is an option of "
                                  f"{sp.setting('aa_version', 'standard')} (rand runs no Square attack)")
        if "fixed_noise" in takes:
            defaults["fixed_noise"] = False
        if "n_select" in takes:
            defaults["n_select"] = self.n_eval
        loss = self.loss if self.loss is not None else defaults.get("loss")
        if "n_targets" in takes and loss in TARGETED_LOSSES:
            defaults["n_targets"] = 9
        for k, v in defaults.items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)

    @property
    def spec(self):
        return ATTACK_SPECS[self.attack]

    @property
    def attack_options(self) -> tuple[str, ...]:
        """The names of the options this attack (and AutoAttack mode) takes."""
        if self.attack == "autoattack" and self.aa_mode == "as-released":
            return _AS_RELEASED_OPTIONS
        return ATTACK_OPTIONS[self.attack]

    @property
    def resolved_step_size(self) -> float | None:
        """PGD's step size (2.5 eps / steps unless given); the unrestricted attacks' own (always given); None
        otherwise."""
        if self.attack in ("pgd-eot", "bpda-eot"):
            return self.step_size if self.step_size is not None else 2.5 * self.eps / max(self.attack_steps, 1)
        return self.step_size

    @property
    def package_batches(self) -> bool:
        """Whether a sample's numbers depend on the block it sits in: only where a package draws from its own
        batches (AutoAttack as released, and FAB/Square in the native standard version)."""
        return self.attack == "autoattack" and (self.aa_mode == "as-released" or self.aa_version == "standard")

    def deciding(self) -> dict:
        """The options that decide the numbers: the attack's own (``ATTACK_OPTIONS``) and the protocol's; the
        batch size only where a package draws from its own batches; never the chunk size."""
        d = asdict(self)
        d["step_size"] = self.resolved_step_size
        for k in set().union(*ATTACK_OPTIONS.values()) - set(self.attack_options):
            d.pop(k)
        for k in _OPTIONAL_RECORDED:
            if k in d and d[k] in (None, False):
                d.pop(k)
        if self.attack == "autoattack" and self.aa_mode == "native" and self.aa_version == "rand":
            d.pop("aa_package")  # the native rand version runs no package code
        if not self.package_batches:
            d.pop("batch_size")
        d.pop("chunk_size")
        for k in ("subset", "data_seed"):   # absent when unused, as in the records of runs that predate them
            if d[k] is None:
                d.pop(k)
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
                   cfg: EvalConfig, *, positions=None, progress=None, resources: dict | None = None,
                   on_adversarial=None) -> list[dict]:
    """Attack and judge one batch; returns one record (dict) per sample (see ``evaluate``).

    x: (B, C, H, W) in [0, 1] on the defense's device; y: (B,) int64; sample_ids: (B,) int64 global indices (all
    noise and attack randomness derive from them and ``cfg.seed``). positions: each sample's position in the
    evaluated selection (samples at positions < cfg.grid_images carry their images for the report's grid).
    progress: called with 1 per attack step. resources: what the attack prepared once (``AttackSpec.prepare``;
    prepared here when None). on_adversarial: called with the judged adversarial batch (B, C, H, W)
    (``save_adversarial``).
    """
    t0 = time.perf_counter()
    ids = sample_ids.to(x.device)
    spec = cfg.spec
    if resources is None:
        resources = spec.prepare(cfg, x.device) if spec.prepare is not None else {}
    clean, _ = _predict_n(defended, x, ids, cfg, "eval")
    run: AttackRun = spec.run(defended, x, y, ids, cfg, progress, resources)
    measure = None
    if run.candidates is None:  # AutoAttack as released: the package's own output, judged as it is
        x_adv, chosen = run.x_adv, None
    else:
        sel = select_candidates(defended, y, ids, run.candidates, seed=cfg.seed, n_select=cfg.n_select,
                                chunk_size=cfg.chunk_size)
        x_adv, chosen = sel.x_adv, sel
        if run.candidates[0].measure is not None:  # the bound's quantity of the judged candidate
            measure = torch.stack([c.measure.double().cpu() for c in run.candidates])[sel.chosen, torch.arange(len(y))]
    adv, purified = _predict_n(defended, x_adv, ids, cfg, "eval", keep_first=True)
    if on_adversarial is not None:
        on_adversarial(x_adv)
    delta = (x_adv - x).flatten(1).double().cpu()
    per_sample_s = (time.perf_counter() - t0) / x.shape[0]
    out = []
    for b in range(x.shape[0]):
        r = {"index": int(sample_ids[b]), "label": int(y[b]), "clean_pred": clean[:, b].tolist(),
             "adv_pred": adv[:, b].tolist(), "linf": float(delta[b].abs().max()), "l2": float(delta[b].norm()),
             "seeds": {"base": cfg.seed}}
        if cfg.attack in ("pgd-eot", "bpda-eot"):
            r["seeds"]["attack_start"] = derive_seed(cfg.seed, "start", 0, int(sample_ids[b]))
        if cfg.fixed_noise:
            r["seeds"]["fixed_noise"] = noise_seed(cfg)
        if measure is not None:
            r[{"lpips": "lpips", "flow": "flow_linf"}[spec.threat]] = float(measure[b])
        if chosen is not None:
            r["candidate"] = run.candidates[int(chosen.chosen[b])].name
            if len(run.candidates) > 1:  # what the selection saw: misclassified draws and mean margin per run
                r["selection"] = {c.name: [int(chosen.wrong[k, b]), None if not c.found[b] else
                                           round(float(chosen.margin[k, b]), 6)]
                                  for k, c in enumerate(run.candidates)}
        if run.pred_trace is not None:
            r["attack_pred_trace"] = run.pred_trace[:, :, b].tolist()
            r["attack_loss_trace"] = [[round(float(v), 9) for v in row] for row in run.loss_trace[:, :, b]]
        if positions is not None and positions[b] < cfg.grid_images:
            r["images"] = {"clean": _encode_image(x[b]), "adversarial": _encode_image(x_adv[b]),
                           "purified": _encode_image(purified[b])}
        r["time_s"] = per_sample_s
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------------


def check_input_size(shape, defense, classifier) -> None:
    """Refuse data of a shape (B, C, H, W) that the defense's score model or the classifier cannot take, before any
    work: an error naming ``data``, with ``resize`` as the remedy where the defense could resize."""
    shape = tuple(shape)
    size = getattr(getattr(defense, "model", None), "image_size", None)
    if defense is not None and size is not None and defense.config.resize is None and shape[2:] != (size, size):
        raise OptionError("data", lambda s: f"images of {shape[2]}x{shape[3]}, but the score model was built for "
                                            f"{size}x{size}; pass {s.setting('resize', 'bilinear')} to resize inside "
                                            f"the defense (DiffPure's ImageNet pipeline: 224 -> 256 and back)")
    check = getattr(classifier, "check_input", None)
    if callable(check):
        check(shape, "data")


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


def _check_classifier(clf: torch.nn.Module, source, index: int, device) -> None:
    """Run the classifier once on the first sample, before anything is written, so that a classifier that does not
    fit the data (another input size, fewer classes than the labels) is an error naming ``classifier``, not a
    traceback after the output folder was set up."""
    x, y = source.get([index])
    try:
        with torch.no_grad():
            logits = clf(x.to(device))
    except RuntimeError as e:
        raise OptionError("classifier", f"fails on {source.description}'s images of shape {tuple(x.shape[1:])}: "
                                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        raise OptionError("classifier", f"expected logits of shape (1, K) for one image, got "
                                        f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}")
    if int(y[0]) >= logits.shape[1]:
        raise OptionError("classifier", f"gives {logits.shape[1]} logits, but {source.description} has label "
                                        f"{int(y[0])} at index {index}")


def evaluate(defense, classifier, data, output, *, config: EvalConfig | None = None, labels=None,
             class_index=None, device="cpu", progress: bool = True, overwrite: bool = False,
             command: str | None = None, report: bool = True, save_adversarial: bool = False,
             **options) -> dict | None:
    """Evaluate ``defense`` (+ ``classifier``) on ``data`` against an attack; records and report in ``output``.

    Args:
        defense: a ``Purifier`` (e.g. ``build_defense(model, grad_mode="full")``; its grad_mode is the attack's
            gradient), or None for the undefended classifier.
        classifier: an ``nn.Module`` taking (B, C, H, W) in [0, 1] to logits (B, K) (e.g.
            ``dpf.load_classifier("cifar10-wideresnet-28-10", checkpoint="Standard.pt")``), or a spec
            (``"digits"``, a TorchScript file, ``"module:function"``).
        data: a spec (``"digits:test"``, ``"cifar10:ROOT"``, an image folder: class sub-folders or ``labels.txt``,
            ``.npz``, ``.npy`` with ``labels=``), an ``(x, y)`` pair of tensors, or a map-style
            ``torch.utils.data.Dataset`` (``datasets.load_data``); class_index: a class-index file for a folder of
            class sub-folders (e.g. ImageNet synsets).
        output: a folder; a finished or killed run there with the same configuration is resumed, another
            configuration is refused unless ``overwrite``.
        config / options: an ``EvalConfig``, or its fields as keywords (attack, norm, eps, attack_steps, eot,
            n_eval, ...).
        progress: a tqdm bar with live robust accuracy and ETA (False: quiet).
        save_adversarial: also save every judged adversarial image (float32, exactly as judged) under
            ``output/adversarial/`` (one .npz per batch; ``diffpure_fast.eval.records.read_adversarial`` reads them
            back in index order). The records always hold the first ``grid_images`` as 8-bit pictures only.
    Returns:
        the report dict (rank 0; None on other ranks), also written as report.json / report.md.
    """
    from .classifiers import load_classifier_spec
    from .datasets import load_data, select_indices

    cfg = rec.config_from(EvalConfig, config, options)
    check_bool("save_adversarial", save_adversarial)
    if cfg.attack == "autoattack" and (cfg.aa_mode == "as-released" or cfg.aa_version == "standard"):
        from ..attacks.autoattack import autoattack_package

        autoattack_package(cfg.aa_package)  # a missing package fails now, not after the clean evaluation
    from ..config import PurifyConfig

    if defense is not None and not isinstance(getattr(defense, "config", None), PurifyConfig):
        raise OptionTypeError("defense", lambda s: (
            f"expected a Purifier (dpf.build_defense or dpf.Purifier), got {type(defense).__name__}; a resize "
            f"around the purifier belongs inside it ({s.setting('resize', 'bilinear')}), where the report records it"))
    rank, world, device = _dist_context(device)
    clf = load_classifier_spec(classifier, device)
    if defense is not None:
        defense = defense.to(device)
        gm = defense.config.grad_mode
        if cfg.attack == "diffattack" and gm != "full":
            raise OptionError("attack", lambda s: (
                f"'diffattack' differentiates the chain's intermediate states through the exact adjoint; the defense "
                f"has {s.setting('grad_mode', gm)} (use {s.setting('grad_mode', 'full')})"))
        if cfg.attack == "bpda-eot" and gm != "bpda":
            raise OptionError("attack", lambda s: (
                f"'bpda-eot' is PGD-EOT through {s.setting('grad_mode', 'bpda')} (DiffPure's BPDA+EOT); the defense "
                f"has {s.setting('grad_mode', gm)} (use {s.setting('grad_mode', 'bpda')}, or "
                f"{s.setting('attack', 'pgd-eot')})"))
        if gm == "none":
            raise OptionError("defense", lambda s: f"{s.setting('grad_mode', 'none')} gives the attack no gradient; "
                                                   f"use 'full', 'adjoint', 'bpda' or 'surrogate'")
    if defense is None and cfg.attack == "diffattack":
        raise OptionError("defense", "'diffattack' attacks a purification chain's states; the undefended classifier "
                                     "has none")
    defended = DefendedClassifier(defense, clf)
    resources = cfg.spec.prepare(cfg, device) if cfg.spec.prepare is not None else {}
    source = load_data(data, labels=labels, class_index=class_index)
    indices = select_indices(len(source), start=cfg.start, n_images=cfg.n_images, subset=cfg.subset,
                             data_seed=cfg.data_seed, description=source.description)
    shape = tuple(source.get(indices[:1])[0].shape)
    check_input_size(shape, defense, clf)
    _check_classifier(clf, source, indices[0], device)

    out = Path(output)
    name = classifier if isinstance(classifier, str) else getattr(clf, "name", "")
    name = name if isinstance(name, str) else ""
    deciding = {"eval": cfg.deciding(), "defense": describe_defense(defense), "grad_mode": defended.grad_mode,
                "classifier": (f"{name} " if name else "") + module_fingerprint(clf),
                "data": source.description, "input_size": list(shape[1:]), "n_samples": len(indices)}
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
    steps_per_block = cfg.spec.units(cfg)

    from tqdm.auto import tqdm

    writer = rec.RecordWriter(out, rank)
    bar = tqdm(total=len(mine) * steps_per_block, desc=f"{cfg.attack} (rank {rank})" if world > 1 else cfg.attack,
               unit="step", disable=not progress, dynamic_ncols=True)
    n_done = n_robust = 0
    try:
        for k, blk in enumerate(mine):
            x, y = source.get(blk)
            save = (lambda x_adv, blk=blk, y=y: rec.write_adversarial(out, blk, y.cpu().numpy(), x_adv.detach()
                                                                      .cpu().numpy())) if save_adversarial else None
            recs = evaluate_batch(defended, x.to(device), y.to(device), torch.tensor(blk), cfg,
                                  positions=[position[i] for i in blk], progress=bar.update, resources=resources,
                                  on_adversarial=save)
            for r in recs:
                r["rank"] = rank
                r["source"] = source.names[r["index"]]
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
