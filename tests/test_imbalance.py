"""Load-imbalance metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from moepp_bench.measure.imbalance import METRICS, imbalance, maxvio_against


def approx(value):
    return pytest.approx(value, rel=1e-9, abs=1e-12)


def test_balanced_load_is_perfect_on_every_metric():
    m = imbalance([5, 5, 5, 5])
    assert m == {"cv": approx(0), "max_over_mean": approx(1), "maxvio": approx(0), "gini": approx(0),
                 "entropy": approx(math.log(4)), "entropy_norm": approx(1), "jain": approx(1)}


def test_one_expert_takes_everything():
    # loads 4,0,0,0: mean 1, population variance (9 + 1 + 1 + 1) / 4 = 3; Gini (n-1)/n; Jain 1/n.
    m = imbalance([4, 0, 0, 0])
    assert m["cv"] == approx(math.sqrt(3))
    assert m["max_over_mean"] == approx(4)
    assert m["maxvio"] == approx(3)
    assert m["gini"] == approx(0.75)
    assert m["entropy"] == approx(0)
    assert m["entropy_norm"] == approx(0)
    assert m["jain"] == approx(0.25)


def test_uneven_load_by_hand():
    # loads 1,2,3: mean 2, variance 2/3; Gini sum((2i-n-1) x_i) / (n sum x) = (-2 + 0 + 6) / 18;
    # shares 1/6, 1/3, 1/2; Jain 36 / (3 * 14).
    m = imbalance([3, 1, 2])
    assert m["cv"] == approx(math.sqrt(2 / 3) / 2)
    assert m["max_over_mean"] == approx(1.5)
    assert m["maxvio"] == approx(0.5)
    assert m["gini"] == approx(4 / 18)
    entropy = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2))
    assert m["entropy"] == approx(entropy)
    assert m["entropy_norm"] == approx(entropy / math.log(3))
    assert m["jain"] == approx(36 / 42)


def test_metrics_do_not_depend_on_scale():
    small, large = imbalance([1, 2, 7, 0]), imbalance([1000, 2000, 7000, 0])
    for name in METRICS:
        assert small[name] == approx(large[name]), name


def test_no_load_is_nan_not_an_error():
    for loads in ([], [0, 0, 0]):
        assert all(math.isnan(v) for v in imbalance(loads).values())
    assert math.isnan(imbalance([3])["entropy_norm"])  # ln(1) = 0: one expert has no spread to normalise
    assert imbalance([3])["cv"] == approx(0)


def test_maxvio_against_the_tau_weighted_target():
    # Target weights tau for FFN experts and 1 for ZC experts: (0.5, 0.5, 1) over 14 slots -> 3.5, 3.5, 7.
    assert maxvio_against([6, 6, 2], [0.5, 0.5, 1.0]) == approx(6 / 3.5 - 1)
    assert maxvio_against([3.5, 3.5, 7], [0.5, 0.5, 1.0]) == approx(0)
    assert math.isnan(maxvio_against([0, 0, 0], [0.5, 0.5, 1.0]))
    with pytest.raises(ValueError):
        maxvio_against([1, 2], [1.0])
