import json
from pathlib import Path

import pytest
from simple_parsing import parse

from recipes import checkpoint_transfer, circuit_breakers, lens_unlearn, probe_unlearn, tuned_lens


@pytest.mark.parametrize("recipe", [lens_unlearn, circuit_breakers], ids=lambda r: r.__name__)
def test_unlearning_recipe_writes_its_outputs(recipe, tiny_home, tmp_path):
    out = tmp_path / "run"
    cfg = parse(
        recipe.Config,
        args=[
            "--out",
            str(out),
            "--world_preset",
            "tiny",
            "--num_steps",
            "2",
            "--batch_size",
            "4",
            "--eval_every",
            "1",
        ],
    )
    results = recipe.main(cfg)
    for name in (
        "run_info.json",
        "metrics.jsonl",
        "training.png",
        "results.json",
        "model/config.json",
        "model/tokenizer.json",
    ):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == pytest.approx(results)
    for key in ("forget_acc", "retain_acc", "forget_acc_before", "retain_acc_before"):
        assert 0.0 <= results[key] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/forget_acc" in r] == [0, 1, 2]
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["training"]["num_steps"] == 2 and "git_sha" in info


def test_tuned_lens_recipe(tiny_home, tmp_path):
    out = tmp_path / "lens"
    cfg = parse(
        tuned_lens.Config, args=["--out", str(out), "--world_preset", "tiny", "--num_steps", "3"]
    )
    metrics = tuned_lens.main(cfg)
    comparison = json.loads((out / "comparison.json").read_text())
    assert len(comparison["tuned"]) == len(comparison["logit"]) == 1  # tiny model: 2 blocks
    assert metrics["tuned_kl_mean"] == pytest.approx(comparison["tuned"][0])
    assert (out / "lens" / "lens.safetensors").exists() and (out / "lens_kl.png").exists()


def test_non_toy_model_without_data_is_a_clear_error(tmp_path):
    cfg = parse(lens_unlearn.Config, args=["--out", str(tmp_path), "--model", "some/model"])
    with pytest.raises(ValueError, match="--forget_data"):
        lens_unlearn.main(cfg)


UNLEARNING_RECIPES = {
    "lens_unlearn": lens_unlearn,
    "circuit_breakers": circuit_breakers,
    "checkpoint_transfer": checkpoint_transfer,
    "probe_unlearn": probe_unlearn,
}
PRESETS = sorted((Path(__file__).parents[2] / "recipes" / "configs").glob("*.yaml"))


def _preset_cases():
    """Each preset with the recipes it is for: the one its name starts with, else all of them."""
    for preset in PRESETS:
        owners = [n for n in UNLEARNING_RECIPES if preset.stem.startswith(n)] or UNLEARNING_RECIPES
        for name in owners:
            yield pytest.param(preset, UNLEARNING_RECIPES[name], id=f"{preset.stem}-{name}")


@pytest.mark.parametrize(("preset", "recipe"), list(_preset_cases()))
def test_every_yaml_preset_parses(preset, recipe):
    cfg = parse(recipe.Config, args=["--config_path", str(preset)], add_config_path_arg=True)
    assert cfg.training.num_steps >= 1
    assert len(PRESETS) >= 2


def test_checkpoint_transfer_recipe_selects_a_teacher_fits_maps_and_unlearns(tiny_home, tmp_path):
    out = tmp_path / "ct"
    cfg = parse(
        checkpoint_transfer.Config,
        args=[
            "--out",
            str(out),
            "--world_preset",
            "tiny",
            "--num_steps",
            "2",
            "--batch_size",
            "4",
            "--margin",
            "1.0",
            "--map_docs",
            "40",
            "--tamper_steps",
            "2",
        ],
        add_config_path_arg=True,
    )
    results = checkpoint_transfer.main(cfg)
    tamper = json.loads((out / "tamper" / "tamper_results.json").read_text())
    assert [r["step"] for r in tamper["records"]] == [0, 2]
    # The attack starts from the unlearned model the recipe reports.
    assert tamper["records"][0]["forget_acc"] == pytest.approx(results["forget_acc"])
    assert set(tamper["controls"]) == {"unfiltered (attacked)", "filtered twin (attacked)"}
    assert results["tamper_forget_acc_peak"] == tamper["summary"]["forget_acc_peak"]
    sweep = json.loads((out / "teacher_sweep" / "sweep.json").read_text())
    # margin 1.0 admits every checkpoint: the latest one before the final is chosen.
    assert sweep["chosen"] == sweep["scores"][-1]["revision"]
    assert sweep["chosen"] != "step40" and len(sweep["scores"]) >= 2
    mse = json.loads((out / "maps" / "heldout_mse.json").read_text())
    assert set(mse) == {"affine", "identity"} and (out / "maps" / "maps.safetensors").exists()
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["selected_teacher"] == sweep["chosen"]
    assert 0.0 <= results["forget_acc"] <= 1.0 and (out / "model" / "config.json").exists()


def test_checkpoint_transfer_recipe_with_svcca_maps(tiny_home, tmp_path):
    """--map_kind svcca saves SVCCA maps and reports them next to the ridge and identity maps."""
    from unlearn.transfer import load_maps

    out = tmp_path / "ct"
    flags = "--world_preset tiny --num_steps 1 --batch_size 4 --margin 1.0 --map_docs 40"
    flags += " --map_kind svcca --svcca_variance 0.9 --tamper false"
    args = ["--out", str(out), *flags.split()]
    checkpoint_transfer.main(parse(checkpoint_transfer.Config, args=args))
    mse = json.loads((out / "maps" / "heldout_mse.json").read_text())
    assert set(mse) == {"affine", "svcca", "identity"}
    svcca = json.loads((out / "maps" / "svcca.json").read_text())
    saved_layers = {str(layer) for layer in load_maps(out / "maps")}
    assert set(svcca) == set(mse["svcca"]) == saved_layers
    for layer in svcca.values():
        assert len(layer["correlations"]) == min(layer["dims_teacher"], layer["dims_model"])
        assert 0.0 <= min(layer["correlations"]) <= max(layer["correlations"]) <= 1.0 + 1e-9
    with pytest.raises(ValueError, match=r"svcca_variance must be in \(0, 1\]"):
        checkpoint_transfer.Config(svcca_variance=0.0)


def test_checkpoint_transfer_without_a_near_chance_checkpoint_is_a_clear_error(tiny_home, tmp_path):
    cfg = parse(
        checkpoint_transfer.Config,
        args=["--out", str(tmp_path), "--world_preset", "tiny", "--margin", "-1.0"],
        add_config_path_arg=True,
    )
    with pytest.raises(ValueError, match="no checkpoint has forget accuracy"):
        checkpoint_transfer.main(cfg)


def test_probe_unlearn_recipe_selects_a_teacher_trains_probes_and_unlearns(tiny_home, tmp_path):
    out = tmp_path / "probe"
    flags = "--world_preset tiny --num_steps 2 --batch_size 4 --margin 1.0"
    flags += " --probe_steps 2 --probe_docs 40 --d_probe 16 --probe_ffn 32"
    results = probe_unlearn.main(
        parse(probe_unlearn.Config, args=["--out", str(out), *flags.split()])
    )
    sweep = json.loads((out / "teacher_sweep" / "sweep.json").read_text())
    assert sweep["chosen"] == sweep["scores"][-1]["revision"]  # margin 1.0 admits every one
    meta = json.loads((out / "probes" / "probes.json").read_text())
    mse = json.loads((out / "probes" / "heldout_mse.json").read_text())
    # Layer stride 2 from the last of the tiny model's 2 blocks: block 1 only, depth 2 - 1 = 1.
    assert set(meta["probes"]) == set(mse["probe"]) == set(mse["identity"]) == {"1"}
    assert meta["probes"]["1"]["depth"] == 1
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["selected_teacher"] == sweep["chosen"]
    assert json.loads((out / "results.json").read_text()) == pytest.approx(
        {k: v for k, v in results.items() if k != "teacher_forget_acc"}
    )
    assert 0.0 <= results["forget_acc"] <= 1.0 and (out / "model" / "config.json").exists()

    # Saved probes are reused as they are: no sweep, no probe training.
    again = tmp_path / "again"
    args = ["--out", str(again), "--probe_path", str(out / "probes"), *flags.split()]
    probe_unlearn.main(parse(probe_unlearn.Config, args=args))
    assert not (again / "teacher_sweep").exists() and not (again / "probes").exists()
    assert (again / "results.json").exists()
    with pytest.raises(ValueError, match="--probe_docs"):
        probe_unlearn.Config(probe_docs=8)
