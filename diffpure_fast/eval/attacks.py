"""The attacks of the harness, one ``AttackSpec`` each: the options it takes and their defaults, its threat model,
how it runs on a block, its progress units and its description in the report.

Every attack attacks every sample and leaves one ``Candidate`` per run (restart, target class, ensemble member) and
sample, never the clean image; ``attacks.selection`` chooses among them with fresh noise. The runs of an attack:

* untargeted loss: ``restarts`` runs, run r seeded ``derive_seed(seed, NAME, loss, r)`` (candidates ``NAME`` or
  ``NAME:rR``);
* targeted loss (``dlr-targeted``, ``cw-targeted``): ``n_targets`` target classes, the top ones of the clean EOT
  logits after the label (``pgd.ranked_targets``; more than K - 1 is an error), ``restarts`` runs each (candidates
  ``NAME:tJ`` or ``NAME:tJ:rR``);
* ``fixed_noise``: every step of every run draws its ``eot`` purifications from one seed,
  ``derive_seed(seed, 'fixed-noise')``, with the noise ids ``index * eot + j``: the attack optimises against one fixed
  set of draws per sample, while the selection and the judge draw fresh noise (``attacks.randomness``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..attacks.apgd import apgd_eot
from ..attacks.pgd import TARGETED_LOSSES, pgd_eot, ranked_targets
from ..attacks.randomness import attack_seed, derive_seed
from ..attacks.selection import Candidate

__all__ = ["ATTACKS", "ATTACK_SPECS", "AttackRun", "AttackSpec", "THREATS", "describe_attack", "describe_threat",
           "noise_seed"]


@dataclass
class AttackRun:
    """An attack's output for a batch: candidates to choose among (None: AutoAttack as released, whose ``x_adv`` is
    judged as it is), the EOT prediction/loss traces (runs, S + 1, B) for the success curve, if any."""

    candidates: list[Candidate] | None = None
    x_adv: torch.Tensor | None = None
    pred_trace: torch.Tensor | None = None
    loss_trace: torch.Tensor | None = None


@dataclass(frozen=True)
class AttackSpec:
    """name; summary (one line for the CLI); options: the ``EvalConfig`` fields it takes; defaults: their values when
    left None; threat: "lp" (eps, norm), "lpips" or "flow" (``bound``); run(defended, x, y, ids, cfg, progress,
    resources) -> AttackRun; units(cfg): progress units per block; describe(ev): the attack in words from
    config.json's ``eval``; prepare(cfg, device): what run needs once per evaluation (e.g. the LPIPS network)."""

    name: str
    summary: str
    options: tuple[str, ...]
    defaults: Mapping[str, object]
    threat: str
    run: Callable
    units: Callable
    describe: Callable
    prepare: Callable | None = field(default=None)


THREATS = ("lp", "lpips", "flow")
_COMMON = ("attack_steps", "restarts", "loss", "eot", "n_select", "fixed_noise", "n_targets")


def noise_seed(cfg) -> int | None:
    """The fixed-noise seed of an evaluation, or None (fresh noise every step)."""
    return derive_seed(cfg.seed, "fixed-noise") if cfg.fixed_noise else None


def _target_plan(defended, x, y, ids, cfg) -> list[tuple]:
    """[(name tag, target (B,) or None, seed path)]: one entry per target class of a targeted loss (the top
    ``n_targets``, ranked with the attack's noise), else one untargeted entry."""
    if cfg.loss not in TARGETED_LOSSES:
        return [("", None, ())]
    targets = ranked_targets(defended, x, y, ids, seed=attack_seed(cfg.seed, noise_seed(cfg), "targets"),
                             eot=cfg.eot, n_targets=cfg.n_targets, chunk_size=cfg.chunk_size)
    return [(f":t{j + 1}", targets[:, j], (j + 1,)) for j in range(cfg.n_targets)]


def _runs(defended, x, y, ids, cfg, name: str):
    """(candidate name, target (B,) or None, run seed) of every run of an attack (see the module docstring)."""
    for tag, target, path in _target_plan(defended, x, y, ids, cfg):
        for r in range(cfg.restarts):
            yield (name + tag + (f":r{r}" if cfg.restarts > 1 else ""), target,
                   derive_seed(cfg.seed, name, cfg.loss, *path, r))


def _n_runs(cfg) -> int:
    return cfg.restarts * (cfg.n_targets if cfg.loss in TARGETED_LOSSES else 1)


def _collect(results, x) -> AttackRun:
    """AttackRun of [(name, x_adv, measure or None, pred_trace (S + 1, B), loss_trace)] per run."""
    found = torch.ones(x.shape[0], dtype=torch.bool)
    return AttackRun([Candidate(n, xa, found, m) for n, xa, m, _, _ in results], None,
                     torch.stack([p for *_, p, _ in results]), torch.stack([lt for *_, lt in results]))


# ---- PGD-EOT and BPDA+EOT ----------------------------------------------------------------------------------------

def _pgd_step_size(cfg) -> float:
    return cfg.step_size if cfg.step_size is not None else 2.5 * cfg.eps / max(cfg.attack_steps, 1)


def _run_pgd(defended, x, y, ids, cfg, progress, resources):
    results = []
    for tag, target, path in _target_plan(defended, x, y, ids, cfg):
        # pgd_eot runs the restarts itself; untargeted, it keeps the evaluation's seed (as before targets existed)
        seed = derive_seed(cfg.seed, cfg.attack, cfg.loss, *path) if path else cfg.seed
        res = pgd_eot(defended, x, y, ids, eps=cfg.eps, steps=cfg.attack_steps, norm=cfg.norm,
                      step_size=_pgd_step_size(cfg), random_start=cfg.random_start, restarts=cfg.restarts,
                      loss=cfg.loss, target=target, eot=cfg.eot, eot_reduce=cfg.eot_reduce, seed=seed,
                      noise_seed=noise_seed(cfg), chunk_size=cfg.chunk_size, progress=progress)
        for r in range(cfg.restarts):
            name = cfg.attack + tag + (f":r{r}" if cfg.restarts > 1 else "")
            results.append((name, res.finals[r], None, res.pred_trace[r], res.loss_trace[r]))
    return _collect(results, x)


def _describe_pgd(ev):
    return (f"{ev['attack']}: {ev['attack_steps']} steps of {ev['step_size']:.5g}, {ev['eot']} EOT ({ev['eot_reduce']} "
            f"averaged), loss {ev['loss']}{_targets_text(ev)}, {ev['restarts']} restart(s), random start "
            f"{ev['random_start']}")


def _targets_text(ev) -> str:
    return f" over the top {ev['n_targets']} target classes" if ev.get("n_targets") else ""


# ---- APGD family: APGD-EOT, DiffAttack, DiffHammer ----------------------------------------------------------------

def _apgd_runs(defended, x, y, ids, cfg, progress, make_oracle=None):
    results = []
    for name, target, seed in _runs(defended, x, y, ids, cfg, cfg.attack):
        oracle = None if make_oracle is None else make_oracle(target, seed)
        res = apgd_eot(defended, x, y, ids, eps=cfg.eps, steps=cfg.attack_steps, norm=cfg.norm, loss=cfg.loss,
                       target=target, eot=cfg.eot, eot_reduce=cfg.eot_reduce or "loss", seed=seed,
                       noise_seed=noise_seed(cfg), chunk_size=cfg.chunk_size, oracle=oracle, progress=progress)
        results.append((name, res.x_best, None, res.pred_trace, res.loss_trace))
    return _collect(results, x)


def _run_apgd(defended, x, y, ids, cfg, progress, resources):
    return _apgd_runs(defended, x, y, ids, cfg, progress)


def _run_diffattack(defended, x, y, ids, cfg, progress, resources):
    from ..attacks.diffattack import diffattack_oracle

    def make(target, seed):
        return diffattack_oracle(defended, y, ids, seed=seed, eot=cfg.eot, loss=cfg.loss, target=target,
                                 dev_weight=cfg.dev_weight, dev_every=cfg.dev_every, noise_seed=noise_seed(cfg),
                                 chunk_size=cfg.chunk_size)
    return _apgd_runs(defended, x, y, ids, cfg, progress, make)


def _run_diffhammer(defended, x, y, ids, cfg, progress, resources):
    from ..attacks.diffhammer import diffhammer_oracle

    def make(target, seed):
        return diffhammer_oracle(defended, y, ids, seed=seed, paths=cfg.eot, eps=cfg.eps, norm=cfg.norm,
                                 loss=cfg.loss, target=target, noise_seed=noise_seed(cfg), chunk_size=cfg.chunk_size)
    return _apgd_runs(defended, x, y, ids, cfg, progress, make)


def _describe_apgd(ev):
    return (f"apgd-eot: APGD (Croce & Hein's schedule, momentum 0.75) with {ev['attack_steps']} iterations, "
            f"{ev['eot']} EOT ({ev['eot_reduce']} averaged), loss {ev['loss']}{_targets_text(ev)}, {ev['restarts']} "
            f"restart(s); each run's best iterate by EOT loss")


def _describe_diffattack(ev):
    return (f"diffattack: DiffAttack (Kang et al. 2023), APGD with {ev['attack_steps']} iterations, {ev['eot']} EOT, "
            f"on loss {ev['loss']}{_targets_text(ev)} + {ev['dev_weight']:g} x the deviated-reconstruction loss over "
            f"every {ev['dev_every']}-th state of the chain (exact gradient through the states), {ev['restarts']} "
            f"restart(s); each run's best iterate by that loss")


def _describe_diffhammer(ev):
    return (f"diffhammer: DiffHammer (Wang et al. 2024), APGD with {ev['attack_steps']} iterations over {ev['eot']} "
            f"purification paths per iteration: EM selection of the paths sharing a vulnerability (5 E-steps, "
            f"lambda 5), their purified-space gradients grafted onto one representative path (one full backward), "
            f"stepwise average t^-0.5; loss {ev['loss']}{_targets_text(ev)}, {ev['restarts']} restart(s)")


# ---- unrestricted: LF, PPGD, StAdv ---------------------------------------------------------------------------------

def _prepare_lpips(cfg, device):
    from ..attacks.perceptual import load_lpips

    return {"lpips": load_lpips(cfg.lpips, device=device)}


def _unrestricted(attack: str, **extra):
    """The runner of ``attacks.unrestricted.<attack>``; extra: its keyword -> the EvalConfig field (or "lpips": the
    prepared LPIPS network)."""
    def run(defended, x, y, ids, cfg, progress, resources):
        from ..attacks import unrestricted

        fn = getattr(unrestricted, attack)
        results = []
        for name, target, seed in _runs(defended, x, y, ids, cfg, cfg.attack):
            kw = {k: (resources[v] if v == "lpips" else getattr(cfg, v)) for k, v in extra.items()}
            res = fn(defended, x, y, ids, bound=cfg.bound, steps=cfg.attack_steps, eot=cfg.eot, loss=cfg.loss,
                     target=target, seed=seed, noise_seed=noise_seed(cfg), chunk_size=cfg.chunk_size, progress=progress,
                     **kw)
            results.append((name, res.x_adv, res.measure, res.pred_trace, res.loss_trace))
        return _collect(results, x)
    return run


def _describe_unrestricted(ev):
    what = {"lf": f"the low-frequency attack (a perturbation on a {ev.get('lf_factor')}x coarser grid, upsampled "
                  f"bilinearly; signed steps of {ev.get('step_size')})",
            "ppgd": "perceptual PGD (Laidlaw et al. 2021; conjugate-gradient steps of LPIPS length 2 bound / steps)",
            "stadv": f"StAdv (Xiao et al. 2018; a flow field, signed steps of {ev.get('step_size')}, flow smoothness "
                     f"weight {ev.get('smoothness')})"}[ev["attack"]]
    return (f"{ev['attack']}: {what}, {ev['attack_steps']} steps x {ev['eot']} EOT, loss {ev['loss']}"
            f"{_targets_text(ev)}, {ev['restarts']} restart(s); each run's best iterate by EOT loss")


# ---- AutoAttack --------------------------------------------------------------------------------------------------

def _run_autoattack(defended, x, y, ids, cfg, progress, resources):
    from ..attacks.autoattack import autoattack_native, run_autoattack
    from ..attacks.defended import CallCountedModel

    block_seed = derive_seed(cfg.seed, "autoattack", int(ids[0]))
    if cfg.aa_mode == "as-released":
        model = CallCountedModel(defended, block_seed)
        x_adv = run_autoattack(model, x, y, norm=cfg.norm, eps=cfg.eps, version=cfg.aa_version,
                               seed=block_seed % (1 << 31), batch_size=x.shape[0], package=cfg.aa_package,
                               device=x.device).detach()
        if progress is not None:
            progress(1)
        return AttackRun(None, x_adv)
    # the native version's APGD runs are per sample (seeded by cfg.seed and the global index); only FAB and Square
    # (standard) draw from the block
    seed = block_seed if cfg.package_batches else derive_seed(cfg.seed, "autoattack")
    native = autoattack_native(defended, x, y, ids, version=cfg.aa_version, norm=cfg.norm, eps=cfg.eps,
                               steps=cfg.attack_steps, eot=cfg.eot, restarts=cfg.restarts, seed=seed,
                               package=cfg.aa_package, queries=cfg.aa_queries or 0, chunk_size=cfg.chunk_size,
                               progress=progress)
    return AttackRun(native.candidates, None, torch.stack(native.pred_traces), torch.stack(native.loss_traces))


def _autoattack_units(cfg) -> int:
    if cfg.aa_mode != "native":
        return 1
    from ..attacks.autoattack import autoattack_units

    return autoattack_units(cfg.aa_version, steps=cfg.attack_steps, restarts=cfg.restarts)


def _describe_autoattack(ev):
    if ev["aa_mode"] == "as-released":
        return (f"AutoAttack version={ev['aa_version']} AS RELEASED ({ev['aa_package']} package, unpatched: one noisy "
                f"evaluation decides which samples are attacked, and an attack's output is kept only where one more "
                f"noisy evaluation misclassifies it, else the clean input is returned)")
    from ..attacks.autoattack import AA_SETTINGS

    s = AA_SETTINGS[ev["aa_version"]]
    runs = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": f"APGD-T ({s.get('targets')} targets)",
            "fab-t": f"FAB-T ({s.get('targets')} targets, the {ev.get('aa_package')} package's class)",
            "square": f"Square ({ev.get('aa_queries')} queries, the {ev.get('aa_package')} package's class)"}
    return (f"AutoAttack version={ev['aa_version']}, native protocol: {', '.join(runs[a] for a in s['attacks'])}; "
            f"APGD natively with {ev['attack_steps']} iterations, {ev['eot']} EOT, {ev['restarts']} restart(s); every "
            f"sample attacked; each run's best iterate a candidate, chosen by {ev['n_select']} fresh-noise "
            f"evaluations")


def _steps_units(cfg) -> int:
    return _n_runs(cfg) * (cfg.attack_steps + 1)


_LP = ("eps", "norm")
_PGD_OPTIONS = (*_LP, *_COMMON, "step_size", "random_start", "eot_reduce")
ATTACK_SPECS: dict[str, AttackSpec] = {s.name: s for s in (
    AttackSpec("pgd-eot", "PGD with EOT (Madry et al.; L-inf or L2)", _PGD_OPTIONS,
               {"attack_steps": 20, "eot": 20, "eot_reduce": "loss", "restarts": 1, "loss": "ce", "random_start": True},
               "lp", _run_pgd, _steps_units, _describe_pgd),
    # DiffPure's BPDA+EOT (bpda_eot/bpda_eot_attack.py): identity backward, 50 steps of 2/255, 15 EOT, logits averaged
    AttackSpec("bpda-eot", "DiffPure's BPDA+EOT: PGD-EOT through grad_mode='bpda', 50 x 2/255, 15 EOT", _PGD_OPTIONS,
               {"attack_steps": 50, "step_size": 2 / 255, "eot": 15, "eot_reduce": "logits", "restarts": 1,
                "loss": "ce", "random_start": True}, "lp", _run_pgd, _steps_units, _describe_pgd),
    # AutoAttack's 100 iterations and its rand version's 20 EOT draws
    AttackSpec("apgd-eot", "Croce & Hein's APGD with EOT", (*_LP, *_COMMON, "eot_reduce"),
               {"attack_steps": 100, "eot": 20, "eot_reduce": "loss", "restarts": 1, "loss": "ce"},
               "lp", _run_apgd, _steps_units, _describe_apgd),
    AttackSpec("diffattack", "DiffAttack: APGD-EOT plus the deviated-reconstruction loss on the chain's states",
               (*_LP, *_COMMON, "dev_weight", "dev_every"),
               {"attack_steps": 100, "eot": 20, "restarts": 1, "loss": "ce", "dev_weight": 1.0, "dev_every": 1},
               "lp", _run_diffattack, _steps_units, _describe_diffattack),
    AttackSpec("diffhammer", "DiffHammer: selective EM over N = --eot paths, gradient grafting, inside APGD",
               (*_LP, *_COMMON), {"attack_steps": 50, "eot": 10, "restarts": 3, "loss": "ce"},
               "lp", _run_diffhammer, _steps_units, _describe_diffhammer),
    AttackSpec("lf", "the low-frequency attack, LPIPS-bounded (unrestricted)",
               (*_COMMON, "bound", "lpips", "lf_factor", "step_size"),
               {"attack_steps": 100, "eot": 20, "restarts": 1, "loss": "cw", "bound": 0.5, "lf_factor": 4,
                "step_size": 0.01}, "lpips",
               _unrestricted("lf_attack", lpips="lpips", factor="lf_factor", step_size="step_size"), _steps_units,
               _describe_unrestricted, _prepare_lpips),
    AttackSpec("ppgd", "perceptual PGD (Laidlaw et al.), LPIPS-bounded (unrestricted)", (*_COMMON, "bound", "lpips"),
               {"attack_steps": 10, "eot": 20, "restarts": 1, "loss": "cw", "bound": 0.5}, "lpips",
               _unrestricted("ppgd_attack", lpips="lpips"), _steps_units, _describe_unrestricted, _prepare_lpips),
    AttackSpec("stadv", "StAdv: a smooth flow field, bounded in size (unrestricted)",
               (*_COMMON, "bound", "smoothness", "step_size"),
               {"attack_steps": 100, "eot": 20, "restarts": 1, "loss": "cw", "bound": 0.05, "smoothness": 0.05,
                "step_size": 0.01}, "flow",
               _unrestricted("stadv_attack", smoothness="smoothness", step_size="step_size"), _steps_units,
               _describe_unrestricted),
    AttackSpec("autoattack", "AutoAttack's ensemble, natively (every sample attacked) or as released",
               (*_LP, "attack_steps", "restarts", "eot", "n_select", "aa_version", "aa_package", "aa_mode",
                "aa_queries"),
               {}, "lp", _run_autoattack, _autoattack_units, _describe_autoattack),
)}
ATTACKS = tuple(ATTACK_SPECS)


def describe_attack(ev: dict) -> str:
    """The attack of an evaluation's options (config.json's ``eval``), in words."""
    return ATTACK_SPECS[ev["attack"]].describe(ev)


def describe_threat(ev: dict) -> str:
    """The bound of an evaluation, in words: an L-p ball, never for the unrestricted attacks."""
    threat = ATTACK_SPECS[ev["attack"]].threat
    if threat == "lp":
        return f"{ev['norm']} eps = {ev['eps']:.5g}"
    if threat == "lpips":
        return (f"perceptual: LPIPS distance (Laidlaw et al.'s form) <= {ev['bound']:.5g} over {ev['lpips']}; no "
                f"L-p bound")
    return (f"spatial: flow field |f|_inf <= {ev['bound']:.5g} (grid_sample units, 1 = half the image width); no "
            f"L-p bound")
