"""The leaderboard on the tiny world: rows, records, metrics recomputed from the committed records,
reuse of finished runs, and a cache miss when the code version changes."""

import json

import numpy as np
import pytest

import unlearn.keys as keys
from benchmarks import leaderboard


def _config(tmp_path, seeds=2):
    return leaderboard.Config(
        methods=["lens_unlearn"],
        seeds=seeds,
        world_preset="tiny",
        unlearn_args="--num_steps 2 --batch_size 4",
        num_steps=2,
        out=str(tmp_path / "runs"),
        results=str(tmp_path / "results"),
        device="cpu",
        n_boot=50,
    )


def test_leaderboard_rows_metrics_reuse_and_code_version(tiny_home, tmp_path, monkeypatch):
    payload = leaderboard.main(_config(tmp_path))
    assert list(payload["rows"]) == ["unfiltered", "filtered twin", "lens_unlearn"]
    assert payload["dirty"] in (True, False) and len(payload["git_sha"]) == 40
    records = payload["records"]
    # 2 seeds x 4 attacks of the default suite, each evaluated at steps 0, 2.
    assert all(len(runs) == 2 and all(len(r) == 4 for r in runs) for runs in records.values())
    assert payload["steps"] == [0, 2]

    def worst(label):  # mean over seeds of the max over attacks, from the recorded accuracies
        acc = np.array([[[r["forget_acc"] for r in a] for a in s] for s in records[label]])
        return acc.max(1).mean(0)

    excess = worst("lens_unlearn") - worst("filtered twin")
    row = payload["rows"]["lens_unlearn"]
    assert row["excess_max"] == pytest.approx(excess.max())
    assert row["excess_mean"] == pytest.approx(excess.mean())
    low, high = row["excess_max_ci"]
    assert low <= row["excess_max"] + 1e-9 and row["excess_max"] - 1e-9 <= high
    assert payload["rows"]["filtered twin"]["excess_max"] == 0.0
    on_disk = json.loads((tmp_path / "results" / "leaderboard.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(payload["rows"]))
    assert (tmp_path / "results" / "leaderboard.png").exists()
    assert "clean tree" in (tmp_path / "results" / "leaderboard.md").read_text() or payload["dirty"]

    # A rerun reuses every unlearning run and attack (their results untouched, their recorded
    # times reported) and gives the same rows.
    results = tmp_path / "runs" / "lens_unlearn" / "seed0" / "run" / "results.json"
    written = results.stat().st_mtime_ns
    again = leaderboard.main(_config(tmp_path))
    assert results.stat().st_mtime_ns == written
    assert again["wall_seconds"] == payload["wall_seconds"]
    assert again["rows"] == payload["rows"]

    # A labelled variant of the method is a row (and a run folder) of its own.
    variant = leaderboard.main(
        leaderboard.Config(**{**vars(_config(tmp_path, seeds=1)), "label": "lens_v"})
    )
    assert list(variant["rows"]) == ["unfiltered", "filtered twin", "lens_v"]
    assert (tmp_path / "runs" / "lens_v" / "seed0" / "run" / "results.json").exists()

    # Another code version misses every cache: the runs and the controls are recomputed.
    monkeypatch.setattr(keys, "code_version", lambda: "0.0.0+changed")
    controls = sorted((tiny_home.root / "tamper_controls").iterdir())
    changed = leaderboard.main(_config(tmp_path, seeds=1))
    assert changed["wall_seconds"]["lens_unlearn"]["unlearn"] > 0.0
    assert len(sorted((tiny_home.root / "tamper_controls").iterdir())) > len(controls)


def test_bad_leaderboard_settings_fail_before_running():
    with pytest.raises(ValueError, match="unknown methods"):
        leaderboard.Config(methods=["nope"])
    with pytest.raises(ValueError, match="unknown attack suite"):
        leaderboard.Config(suite="nope")
    with pytest.raises(ValueError, match="seeds"):
        leaderboard.Config(seeds=0)
    with pytest.raises(ValueError, match="--label"):
        leaderboard.Config(methods=["npo", "rmu"], label="x")
    with pytest.raises(ValueError, match="--label"):
        leaderboard.Config(methods=["npo"], label="filtered twin")


def test_reused_runs_report_the_wall_seconds_recorded_when_they_ran(tmp_path):
    """Fresh runs record their times next to the keyed runs; a rerun that reuses them (0 s now)
    reports the recorded times while the runs' keys are the same, and its own otherwise."""
    import json

    from benchmarks.leaderboard import recorded_seconds

    for seed, key in enumerate(("k0", "k1")):
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "key.json").write_text(json.dumps({"key": key}))
    measured = {"unlearn": 12.0, "attack": 30.0}
    assert recorded_seconds(tmp_path, 2, measured, fresh=True) == measured
    reused = {"unlearn": 0.0, "attack": 0.5}
    assert recorded_seconds(tmp_path, 2, reused, fresh=False) == measured
    (tmp_path / "seed1" / "key.json").write_text(json.dumps({"key": "other"}))
    assert recorded_seconds(tmp_path, 2, reused, fresh=False) == reused
