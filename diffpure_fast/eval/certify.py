"""``certify``: L2 certified robustness of diffusion purification by randomized smoothing with a diffusion denoiser.

The smoothed classifier (Cohen, Rosenfeld, Kolter, ICML 2019) is ``g(x) = argmax_c P(f(x + delta) = c)``, delta ~
N(0, sigma^2 I) in [0, 1] pixel units; if the top class has probability p_A >= a lower bound pl > 1/2, g is constant
on the L2 ball of radius ``sigma Phi^-1(pl)`` around x (their Theorem 1). The base classifier f here is denoised
smoothing with a diffusion model (Carlini, Tramer, Dvijotham, Rice, Sun, Kolter, "(Certified!!) Adversarial
Robustness for Free!", ICLR 2023): in the model's [-1, 1] units the noisy input ``2(x + delta) - 1`` is
``x' + 2 sigma delta'``, which scaled by ``alpha = 1 / sqrt(1 + 4 sigma^2)`` is exactly the diffused state
``x_t = alpha x' + sqrt(1 - alpha^2) delta'`` at the time t whose ``alpha_bar(t) = alpha^2`` (solved in closed form on
the continuous VP schedule: ``noise_time``). Then

* ``denoiser="one-shot"`` (Carlini et al.): one network call predicts ``x0 = (x_t - sqrt(1 - alpha^2) eps(x_t, t)) /
  alpha``, and the classifier labels ``(x0 + 1) / 2``;
* ``denoiser="multistep"`` (DensePure, Xiao et al., ICLR 2023, our reading): ``votes`` reverse solves from x_t with
  independent reverse noise (any solver of the sde runner on a continuous grid: default DDIM with eta = 1, the
  ancestral chain, 10 steps), each classified; f's answer for that delta is their majority (ties: the smallest
  class index).

CERTIFY (Cohen et al., section 3.2, "certify"): ``n0`` draws choose the top class c_A; ``n`` fresh draws count it;
the one-sided (1 - alpha) Clopper-Pearson lower bound pl of ``P(f = c_A)`` comes from scipy's exact binomial
(``scipy.stats.binomtest(...).proportion_ci(method="exact")``); pl > 1/2 certifies c_A at radius ``sigma
Phi^-1(pl)``, otherwise the sample is an abstention (never counted as correct). With probability at least 1 - alpha
per sample, a returned class is g(x) and the radius is sound.

Noise is counter-based (``diffpure_fast.noise``): draw j of sample i in phase "select"/"estimate" is (derive_seed(seed,
"certify", phase, i), id j), and a multistep vote v's reverse noise has id ``j * votes + v`` under its own seed, so a
certificate is reproducible bit for bit whatever the batching, the resume point or the device's batch size.

Records and resume as in the evaluation harness (``records``): ``config.json`` (every option that decides a number),
one JSON line per sample (counts, bound, radius, time), ``report.md``/``report.json`` with certified accuracy against
radius and the per-sample radii, and ``radius.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .._optional import available, require
from .._validate import OptionError, check_bool, check_choice, check_eval_mode, check_float, check_int
from ..attacks.randomness import derive_seed
from ..chain import Noise, reverse_solve
from ..methods.diffpure import DiffPure, DiffPureOptions
from ..models.base import ScoreModel, as_score_model
from ..solvers.base import Plan, Step
from . import records as rec
from .defenses import module_fingerprint
from .metrics import Accuracy

__all__ = ["CERTIFY_DENOISERS", "CertifyConfig", "DenoisedSmoothing", "certified_radius", "certify",
           "certify_report", "certified_accuracy", "lower_confidence_bound", "noise_time", "plot_certified_accuracy"]

CERTIFY_DENOISERS = ("one-shot", "multistep")
# The multistep denoiser's defaults (ours): the ancestral chain (DDIM eta 1) of 10 steps, 5 votes.
MULTISTEP_DEFAULTS = {"solver": "ddim", "steps": 10, "eta": 1.0, "votes": 5}
_REVERSE = ("solver", "steps", "eta", "order", "time_grid")


def noise_time(schedule, sigma: float) -> float:
    """The continuous time t with ``alpha_bar(t) = 1 / (1 + 4 sigma^2)``: where the diffusion's noise matches
    Gaussian noise of std ``sigma`` on [0, 1] images (std 2 sigma on the model's [-1, 1] scale, after scaling by
    sqrt(alpha_bar)). Root of ``(b1 - b0) t^2 / 2 + b0 t = log(1 + 4 sigma^2)``. Errors name ``sigma`` (> 0, and at
    most the schedule's end t = 1)."""
    sigma = check_float("sigma", sigma, low=0.0, low_open=True)
    b0, b1 = schedule.beta_min, schedule.beta_max
    target = math.log1p(4.0 * sigma * sigma)
    t = (math.sqrt(b0 * b0 + 2.0 * (b1 - b0) * target) - b0) / (b1 - b0)
    if t > 1.0:
        top = math.sqrt(math.expm1(-schedule.log_alpha_bar(1.0)) / 4.0)
        raise OptionError("sigma", f"the model's schedule reaches noise std {top:.4g} (in [0, 1] units) at t = 1; "
                                   f"got {sigma}")
    return t


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n Bernoulli(p) trials:
    scipy's exact binomial confidence interval (``binomtest(k, n, alternative="greater")``), i.e. the p with
    ``P(Bin(n, p) >= k) = alpha`` (0 for k = 0). Cohen et al.'s code takes the same bound from statsmodels'
    two-sided ``proportion_confint(k, n, alpha=2 * alpha, method="beta")``."""
    binomtest = require("scipy.stats", "certify's Clopper-Pearson bound").binomtest
    return float(binomtest(int(k), int(n), alternative="greater").proportion_ci(confidence_level=1.0 - alpha,
                                                                                  method="exact").low)


def certified_radius(p_lower: float, sigma: float) -> float:
    """``sigma Phi^-1(p_lower)`` (Cohen et al., Theorem 1 with the runner-up bounded by 1 - p_lower)."""
    norm = require("scipy.stats", "certify's radius").norm
    return float(sigma * norm.ppf(p_lower))


@dataclass(frozen=True)
class CertifyConfig:
    """Every option of a certification run (all but ``batch_size`` decide its numbers: ``config.json``).

    sigma: the smoothing noise std in [0, 1] pixel units (> 0); n0: selection draws; n: estimation draws; alpha:
    the failure probability of each certificate, in (0, 0.5). denoiser: "one-shot" or "multistep"; votes, solver,
    steps, eta, order, time_grid: the multistep denoiser's reverse solves (None: its defaults ``MULTISTEP_DEFAULTS``,
    stored as used; any of them with "one-shot" is an error naming it). n_images samples from index ``start``
    (None: to the end). batch_size: noise draws per network batch (times votes images): memory, not results.
    """

    sigma: float = 0.25
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    denoiser: str = "one-shot"
    votes: int | None = None
    solver: str | None = None
    steps: int | None = None
    eta: float | None = None
    order: int | None = None
    time_grid: str | None = None
    n_images: int | None = None
    start: int = 0
    seed: int = 0
    batch_size: int = 1000

    def __post_init__(self):
        s = object.__setattr__
        s(self, "sigma", check_float("sigma", self.sigma, low=0.0, low_open=True))
        s(self, "n0", check_int("n0", self.n0))
        s(self, "n", check_int("n", self.n))
        s(self, "alpha", check_float("alpha", self.alpha, low=0.0, high=0.5, low_open=True))
        if self.alpha == 0.5:
            raise OptionError("alpha", "expected a value < 0.5 (a bound at confidence 1/2 certifies nothing)")
        check_choice("denoiser", self.denoiser, CERTIFY_DENOISERS)
        if self.denoiser == "one-shot":
            for name in ("votes", *_REVERSE):
                if getattr(self, name) is not None:
                    raise OptionError(name, lambda sp, name=name: (
                        f"an option of {sp.setting('denoiser', 'multistep')}; the one-shot denoiser makes one "
                        f"network call per draw"))
        else:
            s(self, "votes", check_int("votes", MULTISTEP_DEFAULTS["votes"] if self.votes is None else self.votes))
            if self.solver is None:
                s(self, "solver", MULTISTEP_DEFAULTS["solver"])
            if self.steps is None:
                s(self, "steps", MULTISTEP_DEFAULTS["steps"])
            if self.solver == "ddim" and self.eta is None:
                s(self, "eta", MULTISTEP_DEFAULTS["eta"])
            if self.solver == "ddpm":
                raise OptionError("solver", "the multistep denoiser starts at the continuous time whose noise matches "
                                            "sigma; the ddpm solver walks the discrete levels from a rounded one: "
                                            "use ddim (eta 1 is the ancestral chain), euler, heun, dpm-solver or "
                                            "dpm-solver++")
            self.reverse_options()  # validates them (errors name the option)
        if self.n_images is not None:
            s(self, "n_images", check_int("n_images", self.n_images))
        s(self, "start", check_int("start", self.start, low=0))
        s(self, "seed", check_int("seed", self.seed, low=0))
        s(self, "batch_size", check_int("batch_size", self.batch_size))

    def reverse_options(self, t_star: float = 0.5) -> DiffPureOptions:
        """The multistep denoiser's reverse solve as the sde runner's options from ``t_star``."""
        return DiffPureOptions(t_star=t_star, **{k: getattr(self, k) for k in _REVERSE if getattr(self, k) is not None})

    def deciding(self) -> dict:
        d = asdict(self)
        d.pop("batch_size")
        return d


class DenoisedSmoothing:
    """The base classifier f of denoised smoothing (module docstring) and its class counts under noise.

    model: a ScoreModel on the images' device; classifier: an ``nn.Module`` (B, C, H, W) in [0, 1] -> logits;
    both in eval mode (an error naming them otherwise)."""

    def __init__(self, model: ScoreModel, classifier, cfg: CertifyConfig):
        self.model = as_score_model(model)
        check_eval_mode("model", self.model)
        check_eval_mode("classifier", classifier)
        self.classifier, self.cfg = classifier, cfg
        sched = self.model.schedule
        self.t = noise_time(sched, cfg.sigma)
        self.alpha = 1.0 / math.sqrt(1.0 + 4.0 * cfg.sigma * cfg.sigma)
        self.noise_std = 2.0 * cfg.sigma * self.alpha   # sqrt(1 - alpha^2)
        self.votes = cfg.votes or 1
        self._plans: dict[torch.dtype, Plan] = {}

    def plan(self, dtype: torch.dtype) -> Plan:
        """The denoising steps from x_t: one step ``x0 = x_t / alpha - (sqrt(1 - alpha^2) / alpha) eps`` (one-shot),
        or the reverse solver's plan from t."""
        if dtype not in self._plans:
            if self.cfg.denoiser == "one-shot":
                t_net = float(np.float64(self.t) if dtype == torch.float64 else np.float32(self.t))
                step = Step(t=t_net, level=None, a=1.0 / self.alpha, b=-self.noise_std / self.alpha, c_unit=0.0,
                            c_increment=0.0)
                self._plans[dtype] = Plan("one-shot x0", (step,), None)
            else:
                self._plans[dtype] = DiffPure().plan(self.cfg.reverse_options(self.t), self.model.schedule, dtype)
        return self._plans[dtype]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, draws: torch.Tensor, seed: int) -> torch.Tensor:
        """f's predictions (len(draws),) for noise draws ``draws`` (int64 ids) of one image x (C, H, W) in [0, 1]."""
        like = x.expand(len(draws), *x.shape)
        x_unit = like * 2.0 - 1.0
        delta = Noise(seed=seed, sample_ids=draws.to(x.device)).start(0, x_unit)
        x_t = x_unit * self.alpha + delta * self.noise_std
        k = self.votes
        if k > 1:
            x_t = x_t.repeat_interleave(k, dim=0)
        ids = (draws.to(x.device)[:, None] * k + torch.arange(k, device=x.device)[None, :]).reshape(-1)
        x0 = reverse_solve(x_t, self.model, self.plan(x.dtype), Noise(seed=derive_seed(seed, "reverse"),
                                                                       sample_ids=ids))
        preds = self.classifier((x0 + 1.0) * 0.5).argmax(1).reshape(len(draws), k)
        if k == 1:
            return preds[:, 0]
        classes = int(preds.max()) + 1
        votes = torch.zeros(len(draws), classes, dtype=torch.int64, device=preds.device)
        votes.scatter_add_(1, preds, torch.ones_like(preds))
        return votes.argmax(1)   # ties: the first (smallest) class with the most votes

    def counts(self, x: torch.Tensor, n: int, seed: int, num_classes: int) -> np.ndarray:
        """Class counts (num_classes,) of f over draws 0..n-1 of one image, in batches of ``batch_size`` draws."""
        out = np.zeros(num_classes, dtype=np.int64)
        for j0 in range(0, n, self.cfg.batch_size):
            draws = torch.arange(j0, min(j0 + self.cfg.batch_size, n), dtype=torch.int64)
            out += np.bincount(self.predict(x, draws, seed).cpu().numpy(), minlength=num_classes)[:num_classes]
        return out


def certify_sample(f: DenoisedSmoothing, x: torch.Tensor, label: int, index: int, num_classes: int) -> dict:
    """CERTIFY for one image x (C, H, W): its record (prediction -1 and radius None for an abstention)."""
    cfg = f.cfg
    t0 = time.perf_counter()
    seeds = {p: derive_seed(cfg.seed, "certify", p, index) for p in ("select", "estimate")}
    c0 = f.counts(x, cfg.n0, seeds["select"], num_classes)
    top = int(c0.argmax())
    c = f.counts(x, cfg.n, seeds["estimate"], num_classes)
    p_lower = lower_confidence_bound(int(c[top]), cfg.n, cfg.alpha)
    certified = p_lower > 0.5
    pred = top if certified else -1
    return {"index": index, "label": label, "prediction": pred, "correct": pred == label,
            "radius": certified_radius(p_lower, cfg.sigma) if certified else None, "p_lower": p_lower,
            "top_select": top, "counts_select": c0.tolist(), "counts": c.tolist(), "seeds": seeds,
            "time_s": time.perf_counter() - t0}


def certify(model, classifier, data, output, *, config: CertifyConfig | None = None, labels=None, device="cpu",
            progress: bool = True, overwrite: bool = False, command: str | None = None, report: bool = True,
            **options) -> dict | None:
    """Certify ``model`` (denoiser) + ``classifier`` on ``data``; records, report and plot in ``output``.

    Args:
        model: a ScoreModel (``dpf.load_score_model(...)``) in eval mode.
        classifier: an ``nn.Module`` on [0, 1] images, or a spec (``"digits"``, a TorchScript file,
            ``"module:function"``), in eval mode.
        data: as ``evaluate`` takes it (``"digits:test"``, ``(x, y)`` tensors, a Dataset, a file or folder).
        output: a folder; rerunning the same configuration there resumes, another one is refused unless
            ``overwrite``.
        config / options: a ``CertifyConfig`` or its fields as keywords (sigma, n0, n, alpha, denoiser, votes,
            solver, steps, eta, order, time_grid, n_images, start, seed, batch_size).
    Returns:
        the report dict (also report.json / report.md and radius.png in ``output``), or None with report=False.
    Raises:
        ValueError naming the option (``OptionError``) for a bad option, a network in training mode, a start past
        the data.
    """
    from tqdm.auto import tqdm

    from .classifiers import load_classifier_spec
    from .datasets import load_data
    from .harness import environment

    cfg = rec.config_from(CertifyConfig, config, options)
    require("scipy.stats", "certify's Clopper-Pearson bound")   # before any work
    check_bool("overwrite", overwrite)
    device = torch.device(device)
    model = as_score_model(model).to(device)
    clf = load_classifier_spec(classifier, device)
    f = DenoisedSmoothing(model, clf, cfg)
    source = load_data(data, labels=labels)
    if cfg.start >= len(source):
        raise OptionError("start", f"{source.description} has {len(source)} samples (indices 0..{len(source) - 1}), "
                                   f"got {cfg.start}")
    end = len(source) if cfg.n_images is None else cfg.start + cfg.n_images
    if end > len(source):
        raise OptionError("n_images", lambda s: f"{source.description} has {len(source)} samples; "
                                                f"{s.setting('start', cfg.start)} with "
                                                f"{s.setting('n_images', cfg.n_images)} asks for indices up to "
                                                f"{end - 1}")
    x0, _ = source.get([cfg.start])
    with torch.no_grad():
        num_classes = int(clf(x0.to(device)).shape[1])
    out = Path(output)
    deciding = {"certify": cfg.deciding(), "score_model": module_fingerprint(model),
                "classifier": (f"{classifier} " if isinstance(classifier, str) else "") + module_fingerprint(clf),
                "data": source.description, "noise_time": f.t, "num_classes": num_classes}
    out.mkdir(parents=True, exist_ok=True)
    resumed = rec.check_config(out, deciding, overwrite=overwrite)
    env = environment(command, 1)
    env.update(resumed=resumed, run_options={"batch_size": cfg.batch_size, "device": str(device)})
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    done = set(rec.read_records(out))
    todo = [i for i in range(cfg.start, end) if i not in done]
    writer = rec.RecordWriter(out, 0)
    bar = tqdm(total=len(todo), desc=f"certify sigma={cfg.sigma:g}", unit="image", disable=not progress,
               dynamic_ncols=True)
    try:
        for i in todo:
            x, y = source.get([i])
            r = certify_sample(f, x[0].to(device), int(y[0]), i, num_classes)
            writer.write([r])
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    return certify_report(out) if report else None


# ---------------------------------------------------------------------------------------------------------------
# Report


def certified_accuracy(records: list[dict], radius: float) -> Accuracy:
    """Samples certified correct at L2 radius >= ``radius`` (Cohen et al.'s approximate certified accuracy);
    abstentions and wrong classes count as failures."""
    ok = sum(1 for r in records if r["correct"] and r["radius"] >= radius)
    return Accuracy(ok, len(records))


def radius_grid(sigma: float, n: int, alpha: float) -> list[float]:
    """Radii for the report's table: multiples of sigma / 4 up to the largest radius n draws can certify,
    ``sigma Phi^-1(alpha^(1/n))`` (every draw correct)."""
    top = certified_radius(alpha ** (1.0 / n), sigma)
    return [round(k * sigma / 4, 6) for k in range(int(top / (sigma / 4)) + 1)]


def certify_report(folder) -> dict:
    """report.json, report.md (certified accuracy against radius with Wilson intervals, the per-sample radii) and
    radius.png (certified accuracy against radius; needs matplotlib) from a certify folder's records."""
    folder = Path(folder)
    config = json.loads((folder / rec.CONFIG_FILE).read_text())
    cfg = config["certify"]
    records = rec.merge_records(folder)
    if not records:
        raise OptionError("folder", f"{folder} has no finished samples yet")
    env_path = folder / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    grid = radius_grid(cfg["sigma"], cfg["n"], cfg["alpha"])
    table = [{"radius": r, **certified_accuracy(records, r).as_dict()} for r in grid]
    abstain = sum(r["prediction"] == -1 for r in records)
    times = [r["time_s"] for r in records]
    rep = {"config": config, "environment": env, "n_samples": len(records),
           "certified_accuracy": table, "abstentions": abstain,
           "max_certifiable_radius": certified_radius(cfg["alpha"] ** (1.0 / cfg["n"]), cfg["sigma"]),
           "median_radius_of_correct": (float(np.median([r["radius"] for r in records if r["correct"]]))
                                        if any(r["correct"] for r in records) else None),
           "time_s_per_sample": float(np.mean(times)),
           "samples": [{k: r[k] for k in ("index", "label", "prediction", "p_lower", "radius")} for r in records]}
    plotted = available("matplotlib")
    if plotted:
        plot_certified_accuracy(folder / "radius.png", [(f"sigma = {cfg['sigma']:g}", records)],
                                f"denoised smoothing, n = {cfg['n']}, alpha = {cfg['alpha']}")
    rep["plots"] = {"skipped": None if plotted else "Plots not written: matplotlib is not installed"}
    (folder / "report.json").write_text(json.dumps(rep, indent=2))
    (folder / "report.md").write_text(_markdown(rep))
    return rep


def _markdown(rep: dict) -> str:
    cfg = rep["config"]["certify"]
    den = ("one-shot x0 prediction (Carlini et al. 2023)" if cfg["denoiser"] == "one-shot" else
           f"multistep: {cfg['votes']} reverse solves ({cfg['solver']}, {cfg['steps']} steps"
           + (f", eta {cfg['eta']}" if cfg["eta"] is not None else "") + "), majority vote (DensePure-style)")
    env = rep["environment"]
    lines = [
        "# Certified robustness (randomized smoothing, diffusion denoiser)", "",
        f"Command: `{env.get('command', '?')}`", "",
        f"Machine: {env.get('platform', '?')}, {env.get('cpu_count', '?')} CPUs, torch {env.get('torch', '?')}, "
        f"Python {env.get('python', '?')}; GPU: {env.get('gpu')}", "",
        f"CERTIFY (Cohen et al. 2019): sigma = {cfg['sigma']} ([0, 1] units), n0 = {cfg['n0']}, n = {cfg['n']}, "
        f"alpha = {cfg['alpha']}; denoiser: {den} at t = {rep['config']['noise_time']:.6f}; data "
        f"{rep['config']['data']}, {rep['n_samples']} samples from index {cfg['start']}, seed {cfg['seed']}.",
        f"The largest radius n draws can certify: {rep['max_certifiable_radius']:.4f}. Abstentions: "
        f"{rep['abstentions']}. Mean time per sample: {rep['time_s_per_sample']:.2f} s.", "",
        "| L2 radius | certified accuracy [95% Wilson] |", "|---:|---|",
    ]
    for row in rep["certified_accuracy"]:
        lo, hi = row["wilson95"]
        lines.append(f"| {row['radius']:.4g} | {100 * row['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"({row['correct']}/{row['total']}) |")
    if rep["plots"]["skipped"]:
        lines += ["", rep["plots"]["skipped"]]
    lines += ["", "Per sample (prediction -1: abstained):", "", "| index | label | prediction | p_lower | radius |",
              "|---:|---:|---:|---:|---:|"]
    for s in rep["samples"]:
        rad = "-" if s["radius"] is None else f"{s['radius']:.4f}"
        lines.append(f"| {s['index']} | {s['label']} | {s['prediction']} | {s['p_lower']:.5f} | {rad} |")
    return "\n".join(lines) + "\n"


def plot_certified_accuracy(path: Path, runs: list[tuple[str, list[dict]]], title: str) -> None:
    """Certified accuracy against radius, one step curve per (label, records), written to ``path`` (needs
    matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in runs:
        radii = sorted(r["radius"] for r in records if r["correct"])
        top = max(radii, default=0.0)
        xs = np.linspace(0.0, top * 1.05 + 1e-9, 400)
        ax.plot(xs, [100 * certified_accuracy(records, r).value for r in xs], label=label)
    ax.set_xlabel("L2 radius ([0, 1] pixel units)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
