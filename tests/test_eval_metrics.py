"""Protocol metrics against hand-computed cases."""

import pytest

from diffpure_fast.eval import majority_vote_correct, protocol_metrics, robust_curve, wilson_interval


def test_protocol_metrics_hand_computed():
    labels = [0, 1, 2, 3]
    preds = [[0, 0, 0],   # always right
             [1, 2, 1],   # majority right, worst-of-3 wrong
             [5, 2, 2],   # wrong first (single-shot wrong), majority right
             [3, 4, 5]]   # right once: three-way tie of counts 1, majority wrong
    m = protocol_metrics(labels, preds)
    assert (m["single_shot"].correct, m["single_shot"].total) == (3, 4)
    assert (m["mean"].correct, m["mean"].total) == (3 + 2 + 2 + 1, 12)
    assert (m["worst_of_n"].correct, m["worst_of_n"].total) == (1, 4)
    assert (m["majority_vote"].correct, m["majority_vote"].total) == (3, 4)
    assert m["worst_of_n"].interval == pytest.approx(wilson_interval(1, 4))
    # Wilson 1 of 4 by hand: centre (0.25 + z^2/8) / (1 + z^2/4), half-width z sqrt(3/64 + z^2/64) / (1 + z^2/4)
    z = 1.959963984540054
    d = 1 + z * z / 4
    lo, hi = (0.25 + z * z / 8) / d - z * (3 / 64 + z * z / 64) ** 0.5 / d, (0.25 + z * z / 8) / d + z * (
        3 / 64 + z * z / 64) ** 0.5 / d
    assert m["worst_of_n"].interval == pytest.approx((lo, hi), abs=1e-12)


def test_majority_vote_ties_are_wrong():
    assert majority_vote_correct([1, 1, 2, 2], 1) is False
    assert majority_vote_correct([1, 1, 2], 1) is True
    assert majority_vote_correct([2, 3], 1) is False
    assert majority_vote_correct([1], 1) is True


def test_robust_curve_needs_all_restarts():
    labels = [1, 2]
    traces = [[[1, 1, 0], [1, 1, 1]],   # sample 0: restart 0 fools it at step 2
              [[2, 0, 0], [2, 2, 2]]]   # sample 1: restart 0 fools it at step 1
    c = robust_curve(labels, traces)
    assert [a.correct for a in c] == [2, 1, 0] and all(a.total == 2 for a in c)


def test_metric_shapes_checked():
    with pytest.raises(ValueError, match="preds"):
        protocol_metrics([0, 1], [[0]])
    with pytest.raises(ValueError, match="pred_traces"):
        robust_curve([0], [[0]])
