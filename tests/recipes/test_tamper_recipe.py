"""recipes.tamper end to end on the tiny world: outputs, controls, --plot_only, run directories."""

import json
import shutil

import pytest

from recipes import tamper
from tests.conftest import absolute_path_strings
from unlearn.config import flat_names, from_dict
from unlearn.eval import evaluate_mc, reporting
from unlearn.models import load_model
from unlearn.provenance import resolve_path, write_run_info
from unlearn.tamper import ATTACK_PRESETS, AttackSettings
from unlearn.tamper_report import control_key

TINY = ["--world_preset", "tiny", "--num_steps", "2", "--batch_size", "4", "--eval_every", "1"]


def test_tamper_recipe_with_controls_and_plot_only(tiny_home, tmp_path):
    out = tmp_path / "attack"
    report = tamper.main(tamper.parse_args(["--out", str(out), *TINY]))
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
    floor = report["controls"]["filtered twin (attacked)"]
    pairs = zip(report["records"], floor, strict=True)
    excess = [r["forget_acc"] - f["forget_acc"] for r, f in pairs]
    assert summary["excess_max"] == pytest.approx(max(excess))
    assert summary["collapsed"] is False
    info = json.loads((out / "run_info.json").read_text())
    assert info["attack_settings"]["num_steps"] == 2 and "git_sha" in info

    # The controls are cached in the world under their key, and hold the reported curves.
    settings = from_dict(AttackSettings, report["settings"])
    items = {"forget_test": tiny_home.test_items(), "retain": tiny_home.items("retain")}
    for name, label in (
        ("unfiltered", "unfiltered (attacked)"),
        ("filtered", "filtered twin (attacked)"),
    ):
        key = control_key(tiny_home, name, settings, items)["key"]
        cached = tiny_home.root / "tamper_controls" / key / name / "tamper_results.json"
        assert json.loads(cached.read_text())["records"] == report["controls"][label]

    redraw = tmp_path / "redraw"
    tamper.main(
        tamper.parse_args(
            ["--out", str(redraw), "--plot_only", str(out / "tamper_results.json")],
        )
    )
    assert (redraw / "tamper.png").read_bytes() == (out / "tamper.png").read_bytes()


def test_tamper_recipe_attacks_a_run_directory(tiny_home, tmp_path):
    """A directory written by an unlearning recipe (run_info.json + model/) is attacked with the
    toy world its run used; here the "unlearned" model is the filtered twin, so step 0 matches the
    filtered twin's accuracy on the world's test items, scored here."""
    run = tmp_path / "run"
    shutil.copytree(tiny_home.model_dir("filtered"), run / "model")
    write_run_info(run, {"model": {"model": "toyworld", "world_preset": "tiny", "world_seed": 0}})
    out = tmp_path / "attack"
    args = ["--model", str(run), "--out", str(out), "--controls", "false", *TINY]
    report = tamper.main(tamper.parse_args(args))
    assert report["controls"] == {} and report["label"] == "run"
    # The attacked run directory is recorded portably, and reads back as that directory.
    info = json.loads((out / "run_info.json").read_text())
    assert absolute_path_strings(info) == []
    assert absolute_path_strings(json.loads((out / "tamper_results.json").read_text())) == []
    assert resolve_path(info["config"]["model"]) == run.resolve()
    loaded = load_model(str(tiny_home.model_dir("filtered")))
    with reporting():
        test = evaluate_mc(loaded.model, loaded.tokenizer, tiny_home.test_items())
    assert report["records"][0]["forget_acc"] == pytest.approx(test.acc)


def test_plot_only_of_a_file_without_records_fails(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"settings": {}, "records": []}))
    with pytest.raises(ValueError, match="no tamper records"):
        tamper.main(tamper.parse_args(["--out", str(tmp_path), "--plot_only", str(empty)]))


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
    with_retain = json.loads((out / "with_retain" / "run" / "run_info.json").read_text())
    without = json.loads((out / "retain_0" / "run" / "run_info.json").read_text())
    assert with_retain["config"]["method"]["retain"]["retain_coef"] == 1.0
    assert without["config"]["method"]["retain"]["retain_coef"] == 0.0
    # Step 0 of each attack is the unlearned model as results.json reports it.
    for subdir, r in zip(("with_retain", "retain_0"), rows, strict=False):
        results = json.loads((out / subdir / "run" / "results.json").read_text())
        assert r["forget_acc"] == pytest.approx(results["forget_acc"])
        assert r["retain_acc"] == pytest.approx(results["retain_acc"])
    assert (out / "ablation.png").exists()
    table = (out / "ablation.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 rows


def test_retain_ablation_reuses_its_runs_only_under_the_same_code(tiny_home, tmp_path, monkeypatch):
    """A rerun reuses both unlearning runs; after a change of the library's code version it
    recomputes them (the cached results are keyed by it) instead of serving stale ones."""
    import unlearn.keys as keys
    from recipes import retain_ablation

    flags = "--world_preset tiny --num_steps 2 --batch_size 4"
    args = dict(method="lens_unlearn", unlearn_args=flags, num_steps=2, device="cpu")
    retain_ablation.main(retain_ablation.Config(out=str(tmp_path), **args))
    stamp = (tmp_path / "with_retain" / "run" / "results.json").stat().st_mtime_ns
    retain_ablation.main(retain_ablation.Config(out=str(tmp_path), **args))
    assert (tmp_path / "with_retain" / "run" / "results.json").stat().st_mtime_ns == stamp
    monkeypatch.setattr(keys, "code_version", lambda: "0.0.0+changed")
    retain_ablation.main(retain_ablation.Config(out=str(tmp_path), **args))
    assert (tmp_path / "with_retain" / "run" / "results.json").stat().st_mtime_ns != stamp


def test_a_tamper_rerun_with_other_settings_recomputes_every_curve(tiny_home, tmp_path):
    """Rerunning into the same --out at another learning rate never reuses the first run's curve:
    the attack's outputs are keyed by its settings, so the model's curve and the controls' are
    those of a fresh run at the new rate."""
    flags = [*TINY, "--controls", "true"]
    first = tamper.main(tamper.parse_args(["--out", str(tmp_path / "a"), *flags]))
    args = ["--out", str(tmp_path / "a"), *flags, "--lr", "0.05"]
    rerun = tamper.main(tamper.parse_args(args))
    fresh = tamper.main(tamper.parse_args(["--out", str(tmp_path / "b"), *flags, "--lr", "0.05"]))
    assert rerun["settings"]["optim"]["lr"] == 0.05
    assert rerun["records"] == fresh["records"] != first["records"]
    assert rerun["controls"] == fresh["controls"]
    assert (
        rerun["controls"]["filtered twin (attacked)"]
        != first["controls"]["filtered twin (attacked)"]
    )


def test_every_attack_flag_overrides_the_preset(tmp_path, monkeypatch):
    """`--preset` sets the attack flags' defaults and each flag of `AttackSettings` (nested
    optimizer and LoRA groups included) replaces the preset's value; run_info records the
    settings before any model loads."""
    values = {
        "data": "retain",
        "num_steps": "7",
        "lr": "0.002",
        "optimizer": "muon",
        "weight_decay": "0.1",
        "schedule": "cosine",
        "warmup_steps": "3",
        "grad_clip": "0.5",
        "grad_accum": "5",
        "precision": "bfloat16",
        "sam_rho": "0.05",
        "tar_steps": "0",  # any other value conflicts with sam_rho above
        "tar_lr": "0.002",
        "parallel": "fsdp",
        "activation_checkpointing": "True",
        "shard_companions": "True",
        "lora_rank": "4",
        "lora_alpha": "8.0",
        "lora_dropout": "0.1",
        "batch_size": "5",
        "max_len": "64",
        "repair_steps": "2",
        "eval_every": "2",
        "seed": "9",
        "evaluator": "lm_eval",
    }
    lists = {"betas": ["0.8", "0.9"], "early_evals": ["1", "3"], "lora_targets": ["q", "v"]}
    assert set(values) | set(lists) == flat_names(AttackSettings())

    def stop(*args, **kwargs):
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(tamper, "resolve_model", stop)
    assert tamper.parse_args(["--preset", "lora"]).attack == ATTACK_PRESETS["lora"]
    flags = [item for name, value in values.items() for item in (f"--{name}", value)]
    flags += [item for name, value in lists.items() for item in (f"--{name}", *value)]
    cfg = tamper.parse_args(["--out", str(tmp_path), "--preset", "lora", *flags])
    with pytest.raises(RuntimeError, match="stop before loading"):
        tamper.main(cfg)
    recorded = json.loads((tmp_path / "run_info.json").read_text())["attack_settings"]
    settings = {**recorded, **recorded["optim"], **recorded["lora"]}
    for name, value in values.items():
        assert str(settings[name]) == value, name
    for name, value in lists.items():
        assert [str(v) for v in settings[name]] == value, name
    with pytest.raises(ValueError, match="--preset lora cannot change the defaults"):
        tamper.config_class("full")(preset="lora")
