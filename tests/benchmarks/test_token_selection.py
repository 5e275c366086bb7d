"""The token-selection benchmark: its committed defaults are the dev sweep's choices, and it runs
on the tiny world (rows re-derived from the masks it scored)."""

import json
from pathlib import Path

import pytest

from benchmarks import token_selection
from unlearn.selection import SELECTORS

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_every_default_is_the_dev_sweeps_choice():
    """Changing a selector's default without rerunning `--tune` fails here; the sweep ran on the
    default world's dev documents, and every tuned selector has an entry."""
    sweep = json.loads((RESULTS / "token_selection_dev.json").read_text())
    assert sweep["config"]["world_preset"] == "default" and sweep["config"]["tune"]
    assert set(sweep["selectors"]) == set(token_selection.GRIDS)
    for name, result in sweep["selectors"].items():
        defaults = SELECTORS[name].settings()
        for setting, value in result["chosen"].items():
            assert getattr(defaults, setting) == value, (name, setting)
        best = max(entry["f1"] for entry in result["grid"])
        assert result["f1"] == best


def test_the_benchmark_and_the_sweep_run_on_the_tiny_world(tiny_home, tmp_path):
    cfg = token_selection.Config(
        world_preset="tiny",
        selectors=["keywords", "attribution"],
        results=str(tmp_path),
        device="cpu",
    )
    record = token_selection.main(cfg)
    rows = record["rows"]
    assert list(rows) == ["values", "all tokens", "keywords", "attribution"]
    assert rows["values"]["precision"] == rows["values"]["recall"] == 1.0
    value_share = rows["values"]["fraction"]
    assert rows["all tokens"]["precision"] == pytest.approx(value_share)
    assert rows["attribution"]["n_selected"] == round(0.2 * rows["values"]["n_tokens"])
    assert rows["keywords"]["recall"] == 1.0
    assert (tmp_path / "token_selection.md").read_text() == token_selection.markdown(
        json.loads((tmp_path / "token_selection.json").read_text())
    )

    tuned = token_selection.main(token_selection.Config(**{**vars(cfg), "tune": True}))
    assert list(tuned["selectors"]) == ["attribution"]
    grid = tuned["selectors"]["attribution"]["grid"]
    assert [g["setting"]["fraction"] for g in grid] == list(token_selection.FRACTIONS)
    assert (tmp_path / "token_selection_dev.json").exists()
