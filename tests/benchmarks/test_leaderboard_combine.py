"""Combining leaderboard runs: rows keep the numbers they have in one run; mismatches are errors."""

import copy
import json
from pathlib import Path

import pytest

from benchmarks import leaderboard_combine
from benchmarks.leaderboard import FILTERED, UNFILTERED

COMMITTED = Path(__file__).parents[2] / "benchmarks" / "results" / "leaderboard.json"
CONTROLS = (UNFILTERED, FILTERED)


def _split(payload, methods, sha):
    """The leaderboard run that had only `methods` (and the controls), made at commit `sha`."""
    part = copy.deepcopy(payload)
    for key in ("rows", "records", "wall_seconds"):
        part[key] = {k: v for k, v in part[key].items() if k in CONTROLS or k in methods}
    for key in ("sources", "row_sources"):
        part.pop(key, None)
    part["git_sha"] = sha
    part["dirty"] = False
    part["config"]["methods"] = list(methods)
    return part


@pytest.fixture(scope="module")
def committed():
    payload = json.loads(COMMITTED.read_text())
    if "sources" in payload:  # already combined: take its first run's controls and rows as one
        payload["config"]["methods"] = list(payload["row_sources"])
    return payload


def test_split_runs_combine_into_the_rows_of_one_run(committed, tmp_path):
    methods = [label for label in committed["rows"] if label not in CONTROLS]
    first, second = (
        _split(committed, methods[:-2], "a" * 40),
        _split(committed, methods[-2:], "b" * 40),
    )
    # The second run's controls drift by one item at one step (another thread count).
    record = second["records"][UNFILTERED][1][2][-1]
    record["forget_acc"] += 1 / committed["n_test_items"]
    paths = []
    for i, part in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(part))

    payload = leaderboard_combine.main(
        leaderboard_combine.Config(files=[str(p) for p in paths], results=str(tmp_path / "out"))
    )
    assert list(payload["rows"]) == list(committed["rows"])
    for label, row in committed["rows"].items():
        for name in ("forget_pre", "retain_pre", "excess_max", "excess_mean"):
            assert payload["rows"][label][name] == pytest.approx(row[name]), (label, name)
            assert payload["rows"][label][f"{name}_ci"] == pytest.approx(row[f"{name}_ci"])
    assert payload["row_sources"] == {m: ("a" if m in methods[:-2] else "b") * 40 for m in methods}
    assert [s["control_difference"] for s in payload["sources"]] == [
        0.0,
        pytest.approx(1 / committed["n_test_items"]),
    ]
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "bbbbbbb" in markdown and "Combined from leaderboard runs" in markdown
    assert (tmp_path / "out" / "leaderboard.png").exists()

    # The README says where the rows were measured, and on how many threads.
    from benchmarks.readme import leaderboard_block, provenance

    assert provenance(payload).startswith("git aaaaaaa and bbbbbbb, combined at git ")
    threads = committed["machine"]["cpu_threads"]
    assert f"Wall time on {threads} CPU threads" in leaderboard_block(payload)

    # A combined file given first is combined again with its runs listed as they were.
    again = leaderboard_combine.combine([payload], 0.05, n_boot=committed["config"]["n_boot"])
    assert again["rows"] == payload["rows"]
    assert again["sources"] == payload["sources"]


def test_files_that_do_not_describe_the_same_leaderboard_are_refused(committed):
    methods = [label for label in committed["rows"] if label not in CONTROLS]
    first, second = (
        _split(committed, methods[:1], "a" * 40),
        _split(committed, methods[1:2], "b" * 40),
    )

    def combine(other):
        return leaderboard_combine.combine([first, other], 0.05, n_boot=20)

    drifted = copy.deepcopy(second)
    for per_seed in drifted["records"][FILTERED]:
        per_seed[0][-1]["forget_acc"] += 0.2
    with pytest.raises(ValueError, match="controls differ .* by 0.200"):
        combine(drifted)
    with pytest.raises(ValueError, match="more than one file"):
        combine(_split(committed, methods[:1], "b" * 40))
    other_seeds = copy.deepcopy(second)
    other_seeds["config"]["seeds"] = 2
    with pytest.raises(ValueError, match="seeds=2"):
        combine(other_seeds)
    # A run recorded before a setting existed combines when the setting is at its default.
    older = copy.deepcopy(second)
    for attack in older["suite"].values():
        attack.pop("evaluator", None)
        attack["optim"].pop("sam_rho", None)
    assert "row_sources" in leaderboard_combine.combine([first, older], 0.05, n_boot=20)
    newer = copy.deepcopy(second)
    next(iter(newer["suite"].values()))["optim"]["sam_rho"] = 0.1
    with pytest.raises(ValueError, match="attack suite"):
        combine(newer)
    other_steps = copy.deepcopy(second)
    other_steps["steps"] = other_steps["steps"][:-1]
    with pytest.raises(ValueError, match="evaluated steps"):
        combine(other_steps)
    with pytest.raises(ValueError, match="give it first"):
        leaderboard_combine.combine(
            [first, leaderboard_combine.combine([second], 0.05, n_boot=20)], 0.05, n_boot=20
        )
