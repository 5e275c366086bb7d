"""recipes.tamper end to end on the tiny world: outputs, controls, --plot_only, run directories."""

import json
import shutil

import pytest
from simple_parsing import parse

from recipes import tamper
from unlearn.provenance import write_run_info

TINY = ["--world_preset", "tiny", "--num_steps", "2", "--batch_size", "4", "--eval_every", "1"]


def test_tamper_recipe_with_controls_and_plot_only(tiny_home, tmp_path):
    out = tmp_path / "attack"
    report = tamper.main(parse(tamper.Config, args=["--out", str(out), *TINY]))
    on_disk = json.loads((out / "tamper_results.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert [r["step"] for r in report["records"]] == [0, 1, 2]
    assert set(report["controls"]) == {
        "unfiltered (attacked)",
        "filtered twin (attacked)",
        "benign fine-tune",
    }
    for records in report["controls"].values():
        assert [r["step"] for r in records] == [0, 1, 2]
    # The model is the unfiltered one, so its curve equals the unfiltered control's.
    assert report["records"] == report["controls"]["unfiltered (attacked)"]
    summary = report["summary"]
    ratios = [v for v in summary["relative_recovery"].values() if v is not None]
    assert ratios and ratios == pytest.approx([1.0] * len(ratios))
    assert summary["collapsed"] is False
    info = json.loads((out / "run_info.json").read_text())
    assert info["attack_settings"]["num_steps"] == 2 and "git_sha" in info

    # The controls are cached in the world: a second report reuses them.
    cached = sorted((tiny_home.root / "tamper_controls").glob("*/*/tamper_results.json"))
    assert len(cached) == 2

    redraw = tmp_path / "redraw"
    tamper.main(
        parse(
            tamper.Config,
            args=["--out", str(redraw), "--plot_only", str(out / "tamper_results.json")],
        )
    )
    assert (redraw / "tamper.png").read_bytes() == (out / "tamper.png").read_bytes()


def test_tamper_recipe_attacks_a_run_directory(tiny_home, tmp_path):
    """A directory written by an unlearning recipe (run_info.json + model/) is attacked with the
    toy world its run used; here the "unlearned" model is the filtered twin, so step 0 matches the
    filtered twin's held-out accuracy in the world's report."""
    run = tmp_path / "run"
    shutil.copytree(tiny_home.model_dir("filtered"), run / "model")
    write_run_info(run, {"model": {"model": "toyworld", "world_preset": "tiny", "world_seed": 0}})
    out = tmp_path / "attack"
    args = ["--model", str(run), "--out", str(out), "--controls", "false", *TINY]
    report = tamper.main(parse(tamper.Config, args=args))
    assert report["controls"] == {} and report["label"] == "run"
    filtered = tiny_home.report()["filtered"]
    assert report["records"][0]["forget_acc"] == pytest.approx(filtered["forget_heldout_acc"])


def test_plot_only_of_a_file_without_records_fails(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"settings": {}, "records": []}))
    with pytest.raises(ValueError, match="no tamper records"):
        tamper.main(parse(tamper.Config, args=["--out", str(tmp_path), "--plot_only", str(empty)]))


def test_retain_ablation_runs_both_and_attacks_them(tiny_home, tmp_path):
    from recipes import retain_ablation

    out = tmp_path / "ablation"
    flags = "--world_preset tiny --num_steps 2 --batch_size 4 --eval_every 1"
    cfg = retain_ablation.Config(
        method="lens_unlearn", out=str(out), unlearn_args=flags, num_steps=2, device="cpu"
    )
    rows = retain_ablation.main(cfg)["rows"]
    assert [r["model"] for r in rows] == [
        "lens_unlearn",
        "lens_unlearn, retain 0",
        "unfiltered (attacked)",
        "filtered twin (attacked)",
    ]
    with_retain = json.loads((out / "with_retain" / "run_info.json").read_text())
    without = json.loads((out / "retain_0" / "run_info.json").read_text())
    assert with_retain["config"]["method"]["retain_coef"] == 1.0
    assert without["config"]["method"]["retain_coef"] == 0.0
    # Step 0 of each attack is the unlearned model as results.json reports it.
    for subdir, r in zip(("with_retain", "retain_0"), rows, strict=False):
        results = json.loads((out / subdir / "results.json").read_text())
        assert r["forget_acc"] == pytest.approx(results["forget_acc"])
        assert r["retain_acc"] == pytest.approx(results["retain_acc"])
    assert (out / "ablation.png").exists()
    table = (out / "ablation.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 rows


def test_leaderboard_smoke(tiny_home, tmp_path):
    from benchmarks import leaderboard

    cfg = leaderboard.Config(
        methods=["lens_unlearn"],
        world_preset="tiny",
        unlearn_args="--num_steps 2 --batch_size 4",
        num_steps=2,
        out=str(tmp_path / "runs"),
        results=str(tmp_path / "results"),
        device="cpu",
    )
    payload = leaderboard.main(cfg)
    assert [r["model"] for r in payload["rows"]] == ["unfiltered", "filtered twin", "lens_unlearn"]
    assert payload["rows"][2]["unlearn_seconds"] > 0
    on_disk = json.loads((tmp_path / "results" / "leaderboard.json").read_text())
    assert on_disk["rows"] == payload["rows"]
    assert (tmp_path / "results" / "leaderboard.png").exists()
    with pytest.raises(ValueError, match="unknown methods"):
        leaderboard.main(leaderboard.Config(methods=["nope"]))
