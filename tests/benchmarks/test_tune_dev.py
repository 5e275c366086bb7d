"""The dev-split learning-rate sweep: its rule, and that the committed defaults are its choices."""

import json
from pathlib import Path

import pytest

from benchmarks.tune_dev import choose, default_lr, qualifies

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SWEEPS = sorted(path.name for path in RESULTS.glob("tune_dev*.json"))
"""The committed sweeps (tune_dev.json: the library's methods; tune_dev_<group>.json: methods
swept later, such as the standard baselines)."""


def _m(forget, retain, excess_max=0.0, excess_mean=0.0):
    return {
        "forget_pre": forget,
        "retain_pre": retain,
        "excess_max": excess_max,
        "excess_mean": excess_mean,
    }


def test_qualifying_needs_low_dev_forget_and_90_percent_of_unfiltered_retain():
    assert qualifies(_m(0.35, 0.90), unfiltered_retain=1.0)
    assert not qualifies(_m(0.36, 0.99), unfiltered_retain=1.0)
    assert not qualifies(_m(0.25, 0.89), unfiltered_retain=1.0)
    assert qualifies(_m(0.25, 0.82), unfiltered_retain=0.9)


def test_choose_prefers_qualifying_then_excess_max_then_mean_then_the_default():
    candidates = {
        "a": _m(0.25, 0.50, 0.00),  # no excess, but retain collapsed: does not qualify
        "b": _m(0.25, 0.98, 0.10, 0.05),
        "c": _m(0.25, 0.98, 0.10, 0.02),
        "d": _m(0.25, 0.98, 0.20, 0.00),
    }
    assert choose(candidates, 1.0) == "c"
    assert choose({k: candidates[k] for k in "ad"}, 1.0) == "d"
    tie = {"x": _m(0.25, 0.98, 0.1, 0.02), "y": _m(0.25, 0.98, 0.1, 0.02)}
    assert choose(tie, 1.0, default="y") == "y"
    assert choose(tie, 1.0, default="x") == "x"


@pytest.mark.parametrize("file", SWEEPS)
def test_every_recipes_default_lr_is_the_dev_sweeps_choice(file):
    """Changing a default without rerunning `python -m benchmarks.tune_dev` fails here."""
    sweep = json.loads((RESULTS / file).read_text())
    assert sweep["config"]["world_preset"] == "default"
    for method, result in sweep["methods"].items():
        chosen = result["settings"][result["chosen"]]["lr"]
        assert default_lr(method) == pytest.approx(chosen), method


def test_every_registered_method_has_a_dev_sweep():
    """A new method's default learning rate must come from a committed dev sweep too."""
    from unlearn.methods import REGISTRY

    swept = [m for file in SWEEPS for m in json.loads((RESULTS / file).read_text())["methods"]]
    assert sorted(swept) == sorted(REGISTRY)
