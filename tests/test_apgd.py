"""APGD-EOT against AutoAttack's APGD, and the selection among an attack's candidates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffpure_fast as dpf
from diffpure_fast.attacks import DefendedClassifier
from diffpure_fast.attacks.apgd import apgd_checkpoints, apgd_eot, apgd_start
from diffpure_fast.attacks.pgd import attack_loss
from diffpure_fast.attacks.selection import Candidate, select_candidates
from diffpure_fast.eval.datasets import load_data


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Recorder(nn.Module):
    """The digits classifier, recording every input it is called with (the attack's trajectory)."""

    def __init__(self, clf):
        super().__init__()
        self.clf, self.seen = clf, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.clf(x)


@pytest.fixture(scope="module")
def digits():
    x, y = load_data("digits:test").get(list(range(12)))
    return x, y, dpf.load_classifier("digits")


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-targeted"])
def test_apgd_trajectory_equals_autoattack(digits, norm, eps, loss):
    # On a deterministic model with eot=1 and the same start, every point APGD-EOT queries equals AutoAttack's
    # (30 iterations: checkpoints at 6, 5, 4, ... with step-size halvings on the way), bit for bit.
    autopgd = pytest.importorskip("pyautoattack.autopgd_base")
    x, y, clf = digits
    ids = torch.arange(x.shape[0])
    x0 = apgd_start(x, ids, norm=norm, eps=eps, seed=5)
    pkg_model, ours_model = Recorder(clf).eval(), Recorder(clf).eval()
    target = None
    kw = dict(n_iter=30, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, seed=0, device="cpu")
    if loss == "dlr-targeted":
        atk = autopgd.APGDAttack_targeted(pkg_model, **kw)
        with torch.no_grad():  # AutoAttack's first target: the class ranked second by the clean logits
            target = clf(x).sort(1)[1][:, -2]
        atk.y_target = target
    else:
        atk = autopgd.APGDAttack(pkg_model, loss=loss, **kw)
    atk.init_hyperparam(x)
    x_best, _, loss_best, _ = atk.attack_single_run(x, y, x_init=x0)
    res = apgd_eot(DefendedClassifier(None, ours_model), x, y, ids, eps=eps, steps=30, norm=norm, loss=loss,
                   target=target, x_init=x0)
    assert len(pkg_model.seen) == len(ours_model.seen) == 31
    for k, (a, b) in enumerate(zip(pkg_model.seen, ours_model.seen)):
        assert torch.equal(a, b), (k, (a - b).abs().max())
    assert torch.equal(x_best, res.x_best)
    torch.testing.assert_close(res.loss_best, loss_best.double(), rtol=0, atol=0)
    assert len(set(res.step_size.tolist())) > 1 or loss == "ce"  # the schedule's halvings were exercised


def test_apgd_checkpoints_match_autoattack():
    assert apgd_checkpoints(100) == (22, 6, 3)
    assert apgd_checkpoints(10) == (2, 1, 1)
    assert apgd_checkpoints(1) == (1, 1, 1)


def test_targeted_dlr_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): y = 0, t = 4, sorted 3, 2, 1, 0, -1
    out = attack_loss(logits, torch.tensor([0]), "dlr-targeted", torch.tensor([4]))
    torch.testing.assert_close(out, torch.tensor([-(3.0 - 2.0) / (3.0 - 0.5)]))
    with pytest.raises(ValueError, match="target"):
        attack_loss(logits, torch.tensor([0]), "dlr-targeted")


def _purified_defense(grad_mode="full"):
    pur = dpf.Purifier(dpf.load_score_model("digits"), t_star=0.1, steps=2, dt=None, grad_mode=grad_mode)
    return DefendedClassifier(pur, dpf.load_classifier("digits"))


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.8)])
def test_apgd_eot_stays_in_ball_never_returns_x_and_is_batch_independent(digits, norm, eps):
    x, y, _ = digits
    d = _purified_defense()
    ids = torch.arange(10, 16)
    res = apgd_eot(d, x[:6], y[:6], ids, eps=eps, steps=4, norm=norm, eot=2, seed=3)
    delta = (res.x_best - x[:6]).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-6) and float(size.min()) > 0.5 * eps  # attacked, never x itself
    assert res.x_best.min() >= 0 and res.x_best.max() <= 1
    assert res.pred_trace.shape == res.loss_trace.shape == (5, 6)
    # the best iterate's loss is the largest EOT loss of the trace
    torch.testing.assert_close(res.loss_best, res.loss_trace.max(0).values.to(res.loss_best.dtype))
    part = apgd_eot(d, x[3:6], y[3:6], ids[3:], eps=eps, steps=4, norm=norm, eot=2, seed=3)
    torch.testing.assert_close(part.x_best, res.x_best[3:], rtol=0, atol=1e-6)


class FixedLogits(nn.Module):
    """A 'defense' whose logits for sample i under evaluation seed s come from a table: tests the selection rule."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # dict: candidate value c -> (B, K) logits

    def logits(self, x, *, seed, noise_ids):
        return torch.stack([self.table[round(float(x[b].flatten()[0]), 3)][int(i)]
                            for b, i in enumerate(noise_ids.tolist())])


def test_selection_most_misclassified_then_lowest_margin_then_order():
    y = torch.tensor([0, 0, 0])
    # candidate value 0.1: sample 0 wrong, sample 1 right (margin 1), sample 2 right (margin 2)
    # candidate value 0.2: sample 0 right, sample 1 right (margin 0.5), sample 2 right (margin 2)
    table = {0.1: torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]),
             0.2: torch.tensor([[1.0, 0.0], [0.5, 0.0], [2.0, 0.0]])}
    cands = [Candidate("a", torch.full((3, 1, 2, 2), 0.1), torch.tensor([True, True, True])),
             Candidate("b", torch.full((3, 1, 2, 2), 0.2), torch.tensor([True, True, True]))]
    sel = select_candidates(FixedLogits(table), y, torch.arange(3), cands, seed=0, n_select=3)
    assert sel.chosen.tolist() == [0, 1, 0]
    assert sel.wrong[:, 0].tolist() == [3, 0]
    # a run that found nothing for a sample is never chosen for it, even when it would score better
    cands[0] = Candidate("a", cands[0].x, torch.tensor([False, True, True]))
    sel = select_candidates(FixedLogits(table), y, torch.arange(3), cands, seed=0, n_select=2)
    assert sel.chosen.tolist()[0] == 1 and sel.wrong[0, 0] == -1
    with pytest.raises(ValueError, match="every sample must be attacked"):
        select_candidates(FixedLogits(table), y, torch.arange(3),
                          [Candidate("a", cands[0].x, torch.tensor([False, True, True]))], seed=0, n_select=1)


def test_apgd_bad_arguments_named(digits):
    x, y, _ = digits
    d = DefendedClassifier(None, dpf.load_classifier("digits"))
    for kw, name in ((dict(norm="l1"), "norm"), (dict(steps=-1), "steps"), (dict(eot=0), "eot"),
                     (dict(loss="hinge"), "loss"), (dict(rho=0.0), "rho"), (dict(eps=-0.1), "eps"),
                     (dict(x_init=x[:1]), "x_init")):
        with pytest.raises(ValueError, match=name):
            apgd_eot(d, x[:2], y[:2], torch.arange(2), **(dict(eps=0.1, steps=1) | kw))
