"""certify: the Clopper-Pearson bound against scipy's beta quantile, a smoothed linear classifier whose radius is
known in closed form, the one-shot denoiser against its formula, reproducibility, resume, and errors by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import diffpure_fast as dpf
from diffpure_fast._validate import OptionError
from diffpure_fast.eval.certify import (
    CertifyConfig,
    DenoisedSmoothing,
    certified_radius,
    lower_confidence_bound,
    noise_time,
)
from diffpure_fast.eval.records import merge_records
from diffpure_fast.models.base import EpsModel
from diffpure_fast.schedule import DIFFPURE_SCHEDULE

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("k,n,alpha", [(0, 10, 0.05), (7, 10, 0.05), (10, 10, 0.001), (950, 1000, 0.001),
                                       (9_990, 10_000, 0.001), (51, 100, 0.01)])
def test_lower_bound_is_exact_clopper_pearson(k, n, alpha):
    # Clopper-Pearson's one-sided lower limit: the alpha quantile of Beta(k, n - k + 1) (0 at k = 0)
    ref = 0.0 if k == 0 else scipy_stats.beta.ppf(alpha, k, n - k + 1)
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # and its defining property: P(Bin(n, p_lower) >= k) = alpha
    if k > 0:
        assert scipy_stats.binom.sf(k - 1, n, ref) == pytest.approx(alpha, rel=1e-6)


def test_noise_time_matches_sigma():
    for sigma in (0.12, 0.25, 0.5, 1.0):
        t = noise_time(DIFFPURE_SCHEDULE, sigma)
        ab = math.exp(DIFFPURE_SCHEDULE.log_alpha_bar(t))
        # the diffused state's noise over its signal, in [0, 1] units: sqrt(1 - ab) / sqrt(ab) / 2 = sigma
        assert math.sqrt((1 - ab) / ab) / 2 == pytest.approx(sigma, rel=1e-12)
    with pytest.raises(OptionError, match="sigma: the model's schedule reaches noise std"):
        noise_time(DIFFPURE_SCHEDULE, 1000.0)


class _Linear(nn.Module):
    """Two classes split by the hyperplane w.x + b = 0 (class 1 where positive)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = (x.flatten(1) * self.w.flatten()).sum(1) + self.b
        return torch.stack([-s, s], 1)


def _zero_eps():
    # eps = 0: the one-shot x0 prediction is x_t / alpha, i.e. the classifier sees exactly x + sigma delta
    return EpsModel(lambda x, t: torch.zeros_like(x))


def test_smoothed_linear_classifier_certifies_the_closed_form_radius():
    """g(x) for f = sign(w.x + b) under N(0, sigma^2 I): P(f = 1) = Phi(m / sigma), m = (w.x + b) / |w|, and g's
    exact robust radius is m (the distance to the hyperplane; Cohen et al., section 3.1)."""
    sigma, n = 0.25, 20_000
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    x = torch.full((1, 8, 8), 0.5, dtype=torch.float64)
    margin = 1.2816 * sigma                                    # P(f = 1) = Phi(1.2816) = 0.9
    b = margin * w.norm().item() - (w * x).sum().item()
    cfg = CertifyConfig(sigma=sigma, n0=100, n=n, alpha=0.001, batch_size=4096)
    f = DenoisedSmoothing(_zero_eps(), _Linear(w, b).eval(), cfg)
    counts = f.counts(x, n, seed=3, num_classes=2)
    p = scipy_stats.norm.cdf(margin / sigma)
    assert abs(counts[1] / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    p_lower = lower_confidence_bound(int(counts[1]), n, cfg.alpha)
    radius = certified_radius(p_lower, sigma)
    assert radius == pytest.approx(sigma * scipy_stats.norm.ppf(scipy_stats.beta.ppf(0.001, counts[1],
                                                                                      n - counts[1] + 1)), rel=1e-9)
    # sound (below the true radius) and close to it: the bound costs about 3.1 binomial std at n = 20000
    assert margin - 0.1 * sigma < radius < margin


def test_certify_end_to_end_linear_reproducible_and_resumable(tmp_path):
    sigma = 0.5
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 4, 4, generator=g)
    xs = torch.rand(6, 1, 4, 4, generator=g)
    b = -(xs[0] * w).sum().item() + 0.3 * w.norm().item()  # sample 0 at distance 0.3 on the class-1 side
    clf = _Linear(w, b).eval()
    ys = (((xs.flatten(1) * w.flatten()).sum(1) + b) > 0).long()
    kw = dict(sigma=sigma, n0=50, n=500, alpha=0.01, seed=4, progress=False)
    a = dpf.certify(_zero_eps(), clf, (xs, ys), tmp_path / "a", batch_size=64, n_images=3, **kw)
    # another batching, run in two parts (resume): the same certificates bit for bit
    dpf.certify(_zero_eps(), clf, (xs, ys), tmp_path / "b", batch_size=37, n_images=2, **kw)
    with pytest.raises(ValueError, match="n_images"):
        dpf.certify(_zero_eps(), clf, (xs, ys), tmp_path / "b", batch_size=37, n_images=3, **kw)
    b_rep = dpf.certify(_zero_eps(), clf, (xs, ys), tmp_path / "b", batch_size=37, n_images=3, overwrite=True, **kw)
    assert [s["p_lower"] for s in a["samples"]] == [s["p_lower"] for s in b_rep["samples"]]
    assert a["samples"][0]["prediction"] == 1 and a["samples"][0]["radius"] < 0.3
    assert (tmp_path / "a" / "report.md").read_text().count("| 0 |") >= 1
    assert len(a["samples"]) == 3 and a["certified_accuracy"][0]["total"] == 3


def test_resume_skips_finished_samples(tmp_path):
    w = torch.ones(1, 2, 2)
    xs = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    ys = torch.zeros(4, dtype=torch.long)
    clf = _Linear(w, -100.0).eval()                  # always class 0: every sample certified at the largest radius
    kw = dict(sigma=0.25, n0=10, n=100, alpha=0.01, progress=False)
    dpf.certify(_zero_eps(), clf, (xs, ys), tmp_path, n_images=2, **kw)
    first = (tmp_path / "report.json").read_text()
    rep = dpf.certify(_zero_eps(), clf, (xs, ys), tmp_path, n_images=2, **kw)   # nothing to do: same records
    assert json.loads(first)["samples"] == rep["samples"]
    top = certified_radius(0.01 ** (1 / 100), 0.25)
    assert all(s["radius"] == pytest.approx(top) for s in rep["samples"])
    assert rep["max_certifiable_radius"] == pytest.approx(top)


def test_one_shot_denoiser_is_the_x0_prediction():
    from diffpure_fast.models.digits import load_digits_score_model

    model = load_digits_score_model()
    sigma = 0.25
    cfg = CertifyConfig(sigma=sigma, n0=4, n=8)
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(x.shape[0], 10)

    f = DenoisedSmoothing(model, Spy().eval(), cfg)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(5))
    draws = torch.arange(3)
    f.predict(x, draws, seed=9)
    # independent transcription (Carlini et al. 2023, Alg. 1): x_t = sqrt(ab) (2 (x + sigma delta) - 1),
    # x0 = (x_t - sqrt(1 - ab) eps(x_t, t)) / sqrt(ab)
    from diffpure_fast.chain import Noise

    delta = Noise(seed=9, sample_ids=draws).start(0, x.expand(3, *x.shape))
    t = noise_time(model.schedule, sigma)
    ab = math.exp(model.schedule.log_alpha_bar(t))
    x_t = math.sqrt(ab) * (2 * (x + sigma * delta) - 1)
    with torch.no_grad():
        eps = model.eps(x_t, torch.full((3,), t, dtype=torch.float32))
    ref = ((x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab) + 1) / 2
    assert torch.allclose(seen[0], ref, atol=2e-5)


def test_options_errors_name_the_option():
    for kw, msg in (({"votes": 3}, "votes: an option of denoiser='multistep'"),
                    ({"alpha": 0.5}, "alpha: expected a value < 0.5"),
                    ({"n": 0}, "n: expected"),
                    ({"sigma": -1.0}, "sigma: expected"),
                    ({"denoiser": "two-shot"}, "denoiser: expected one of"),
                    ({"denoiser": "multistep", "solver": "ddpm"}, "solver: the multistep denoiser"),
                    ({"denoiser": "multistep", "solver": "euler", "eta": 0.5}, "eta: not an option of")):
        with pytest.raises(OptionError) as e:
            CertifyConfig(**kw)
        assert str(e.value).startswith(msg), str(e.value)
    c = CertifyConfig(denoiser="multistep")
    assert (c.votes, c.solver, c.steps, c.eta) == (5, "ddim", 10, 1.0)


def test_multistep_majority_and_cli(tmp_path, capsys):
    from diffpure_fast.cli import main

    out = tmp_path / "c"
    rc = main(["certify", "--sigma", "0.25", "--n0", "4", "--n", "8", "--n-images", "2", "--denoiser", "multistep",
               "--votes", "3", "--steps", "2", "--batch-size", "8", "--output", str(out), "--quiet"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_samples"] == 2 and rep["config"]["certify"]["votes"] == 3
    records = merge_records(out)
    assert all(sum(r["counts"]) == 8 and sum(r["counts_select"]) == 4 for r in records)
    capsys.readouterr()
    assert main(["certify", "--sigma", "0.25", "--votes", "3", "--output", str(tmp_path / "d")]) == 2
    assert "--votes: an option of --denoiser multistep" in capsys.readouterr().err
    assert main(["certify", "--sigma", "0.25", "--alpha", "0.7", "--output", str(tmp_path / "d")]) == 2
    assert "--alpha: expected a value <= 0.5" in capsys.readouterr().err
    assert main(["report", str(out), "--quiet"]) == 0
