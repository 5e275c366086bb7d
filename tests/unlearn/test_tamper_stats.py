"""Tests for unlearn.tamper_stats: worst case over attacks, excess over the filtered twin, steps to
exceed, collapse, and bootstrap intervals, on curves worked out by hand."""

import numpy as np
import pytest

from unlearn.eval import decode_credit, encode_credit
from unlearn.tamper_stats import Curves, bootstrap_metrics, point_metrics


def _curves(per_attack_acc, n_items=4, retain=1.0, seeds=1):
    """Curves whose attack a at step t gets round(acc * n_items) of n_items items right."""
    forget = np.zeros((seeds, len(per_attack_acc), len(per_attack_acc[0]), n_items))
    for a, accs in enumerate(per_attack_acc):
        for t, acc in enumerate(accs):
            forget[:, a, t, : round(acc * n_items)] = 1.0
    steps = [0, 10, 20][: len(per_attack_acc[0])]
    retain_acc = np.full(forget.shape[:3], retain)
    return Curves(steps, forget, retain_acc, np.full((seeds, 8), retain))


def test_worst_case_excess_and_steps_by_hand():
    """Row attacks: A = [.25, .5, .5], B = [.25, .25, 1.0] -> worst case [.25, .5, 1.0].
    Filtered: [.25, .25, .25] under both. Excess [0, .25, .75]: max .75, mean 1/3; it first
    exceeds .10 at step 10 (the second evaluation)."""
    row = _curves([[0.25, 0.5, 0.5], [0.25, 0.25, 1.0]])
    filtered = _curves([[0.25, 0.25, 0.25], [0.25, 0.25, 0.25]])
    metrics = point_metrics(row, filtered, unfiltered_retain=1.0)
    assert metrics["worst_case"] == pytest.approx([0.25, 0.5, 1.0])
    assert metrics["excess_max"] == pytest.approx(0.75)
    assert metrics["excess_mean"] == pytest.approx(1 / 3)
    assert metrics["steps_to_exceed"] == 10
    assert metrics["forget_pre"] == pytest.approx(0.25)
    held = point_metrics(filtered, filtered, unfiltered_retain=1.0)
    assert held["steps_to_exceed"] is None and held["excess_max"] == 0.0


def test_collapse_is_retain_gain_below_a_quarter_of_the_unfiltered_models():
    """Unfiltered retain 1.0: gain .75 over chance; a quarter is .1875, so retain .43 (gain .18)
    is collapsed and retain .45 (gain .20) is not."""
    filtered = _curves([[0.25, 0.25, 0.25]])
    assert point_metrics(_curves([[0.25] * 3], retain=0.43), filtered, 1.0)["collapsed"]
    assert not point_metrics(_curves([[0.25] * 3], retain=0.45), filtered, 1.0)["collapsed"]


def test_bootstrap_intervals_contain_the_point_and_shrink_with_items():
    """Identical seeds and items that all agree give zero-width intervals at the point value; noisy
    items give an interval around it that narrows when there are 16x more items."""
    rng = np.random.default_rng(0)

    def noisy(p, n_items):
        forget = (rng.random((3, 1, 2, n_items)) < np.array([0.25, p])[None, None, :, None]) * 1.0
        return Curves([0, 10], forget, np.ones((3, 1, 2)), np.ones((3, 8)))

    def constant(levels):  # every item and seed at the same credit: nothing to resample
        forget = np.broadcast_to(np.array(levels)[None, None, :, None], (3, 1, 2, 10)).copy()
        return Curves([0, 10], forget, np.ones((3, 1, 2)), np.ones((3, 8)))

    exact = bootstrap_metrics(
        {"row": constant([0.25, 0.75]), "filtered": constant([0.25, 0.25])},
        "filtered",
        "filtered",
        n_boot=50,
    )
    assert exact["row"]["excess_max_ci"] == pytest.approx([0.5, 0.5])
    widths = []
    for n_items in (50, 800):
        rows = {"row": noisy(0.6, n_items), "filtered": noisy(0.25, n_items)}
        metrics = bootstrap_metrics(rows, "filtered", "filtered", n_boot=200)["row"]
        low, high = metrics["excess_mean_ci"]
        assert low <= metrics["excess_mean"] <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_from_records_and_the_credit_encoding():
    credit = [1.0, 0.0, 0.5, 1 / 3, 0.25]
    assert encode_credit(credit) == "10234"
    assert decode_credit("10234") == pytest.approx(credit)
    with pytest.raises(ValueError, match="1/k"):
        encode_credit([0.3])
    records = [
        {"step": s, "forget_acc": 0.0, "retain_acc": 0.9, "forget_credit": c, "retain_credit": "11"}
        for s, c in ((0, "0100"), (5, "1100"))
    ]
    curves = Curves.from_records([[records, records]])
    assert curves.forget.shape == (1, 2, 2, 4) and curves.steps == [0, 5]
    assert curves.forget[0, 1, 1].tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="different steps"):
        Curves.from_records([[records, records[:1]]])
