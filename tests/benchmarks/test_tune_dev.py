"""The dev-split learning-rate sweep: its rule, and that the committed defaults are its choices."""

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks import leaderboard
from benchmarks.tune_dev import (
    Config,
    candidates_of,
    choose,
    default_lr,
    grid_values,
    lr_grid,
    main,
    qualifies,
    same_setting,
)
from recipes.unlearn import config_class
from unlearn.config import DataConfig, ModelConfig, TrainingConfig, flat_values
from unlearn.experiment import run_method

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
        chosen = result["settings"][result["chosen"]]
        assert default_lr(method) == pytest.approx(chosen["lr"]), method
        registered = flat_values(config_class(method)())
        for name, value in chosen.get("grid", {}).items():
            assert same_setting(registered[name], value), (method, name)


def test_every_registered_method_has_a_dev_sweep_or_says_it_has_none(tmp_path, monkeypatch):
    """A method's default learning rate comes from a committed dev sweep, or its registration
    says it is untuned (`tuned=False`): then it warns when it runs and stays off the default
    benchmark lists until its sweep is committed."""
    from unlearn.methods import REGISTRY, benchmark_methods, tuned_methods

    swept = [m for file in SWEEPS for m in json.loads((RESULTS / file).read_text())["methods"]]
    assert sorted(swept) == sorted(tuned_methods())
    untuned = sorted(set(REGISTRY) - set(tuned_methods()))
    # The default lists: the tuned methods that need no further input (UNDO needs --teacher).
    assert benchmark_methods() == [m for m in tuned_methods() if m != "undo"]
    assert Config().methods == benchmark_methods() == leaderboard.Config().methods
    # An untuned method warns and stays off the default lists (a stand-in when none is registered).
    stand_in = dataclasses.replace(REGISTRY["grad_diff"], name="untuned_gd", tuned=False)
    monkeypatch.setitem(REGISTRY, "untuned_gd", stand_in)
    assert "untuned_gd" not in benchmark_methods() + tuned_methods()
    for name in [*untuned, "untuned_gd"]:
        with pytest.warns(UserWarning, match=f"{name}'s default settings are placeholders"):
            with pytest.raises(ValueError):  # the warning comes before any input is checked
                run_method(
                    REGISTRY[name],
                    REGISTRY[name].default_config(),
                    ModelConfig(model=str(tmp_path / "no-model")),
                    DataConfig(),
                    TrainingConfig(),
                    tmp_path / name,
                    {},
                )


def test_grid_entries_are_checked_and_crossed_with_the_learning_rates():
    assert grid_values(["beta=0.1,0.5", "gamma=0,1"], "simnpo") == {
        "beta": ["0.1", "0.5"],
        "gamma": ["0", "1"],
    }
    labels = [label for label, _, _ in candidates_of("simnpo", ["beta=0.1,0.5"])]
    lrs = [f"{lr:g}" for lr in lr_grid("simnpo")]
    assert len(lrs) == 3 and lrs[1] == f"{default_lr('simnpo'):g}"
    assert labels == [f"{lr},beta={b}" for lr in lrs for b in ("0.1", "0.5")]
    for bad in (["beta"], ["beta="], ["lr=1e-3"], ["beta=1", "beta=2"], ["betta=1"]):
        with pytest.raises(ValueError, match="--grid"):
            grid_values(bad, "simnpo")
    assert same_setting(0.1, "0.1") and same_setting(True, "true") and not same_setting(0.1, "0.5")
    refined = candidates_of("simnpo", ["beta=0.1"], [5e-4, 7e-4])  # --lrs replaces lr_grid
    assert [(label, lr) for label, lr, _ in refined] == [("0.0005,beta=0.1", 5e-4),
                                                         ("0.0007,beta=0.1", 7e-4)]  # fmt: skip


def test_a_grid_sweep_on_the_tiny_world_records_and_chooses_among_every_setting(
    tiny_home, tmp_path
):
    cfg = Config(
        methods=["simnpo"],
        num_steps=2,
        world_preset="tiny",
        unlearn_args="--num_steps 2 --batch_size 4",
        grid=["beta=0.1,0.5"],
        out=str(tmp_path / "runs"),
        results=str(tmp_path / "results"),
    )
    payload = main(cfg)
    sweep = payload["methods"]["simnpo"]
    expected = [label for label, _, _ in candidates_of("simnpo", cfg.grid)]
    assert list(sweep["settings"]) == expected and sweep["chosen"] in expected
    for label, entry in sweep["settings"].items():
        assert label.endswith(f"beta={entry['grid']['beta']}")
    assert sweep["chosen"] == choose(
        sweep["settings"],
        payload["unfiltered"]["retain_pre"],
        default=f"{default_lr('simnpo'):g},beta=0.1",
    )
    assert "beta=0.5" in (tmp_path / "results" / "tune_dev.md").read_text()
