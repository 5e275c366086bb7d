"""The real-model benchmark's pure parts: the worst case over attacks and its settings checks.

(The run itself needs SmolLM2 and minutes per step; `python -m benchmarks.real_model` with the
smoke-test flags of its docstring exercises it end to end.)"""

import pytest

from benchmarks import real_model


def test_the_worst_case_takes_the_highest_forget_and_lowest_retain_at_each_step():
    attacks = {
        "a": {"records": [{"step": 0, "forget_acc": 0.3, "retain_acc": 0.9},
                          {"step": 5, "forget_acc": 0.5, "retain_acc": 0.6}]},
        "b": {"records": [{"step": 0, "forget_acc": 0.3, "retain_acc": 0.9},
                          {"step": 5, "forget_acc": 0.4, "retain_acc": 0.8}]},
    }  # fmt: skip
    assert real_model.worst_case(attacks) == [
        {"step": 0, "forget_acc": 0.3, "retain_acc": 0.9},
        {"step": 5, "forget_acc": 0.5, "retain_acc": 0.6},
    ]
    attacks["b"]["records"].pop()
    with pytest.raises(ValueError):  # attacks evaluated at different steps
        real_model.worst_case(attacks)


def test_bad_settings_fail_before_anything_loads():
    with pytest.raises(ValueError, match="unknown methods"):
        real_model.Config(methods=["nope"])
    with pytest.raises(ValueError, match="--attacks"):
        real_model.Config(attacks=["full_lr1e-2"])
    with pytest.raises(ValueError, match="--attacks"):
        real_model.Config(attacks=[])
    with pytest.raises(ValueError, match="steps"):
        real_model.Config(attack_steps=0)
