import importlib
import json
from pathlib import Path

import pytest
from simple_parsing import parse

from benchmarks.checkpoint_curve import checkpoint_curve
from recipes import (
    checkpoint_transfer,
    circuit_breakers,
    lens_unlearn,
    probe_unlearn,
    tuned_lens,
)
from recipes.unlearn import config_class
from tests.conftest import absolute_path_strings
from unlearn.checkpoints import CheckpointScore, select_checkpoint
from unlearn.eval import evaluate_mc, reporting
from unlearn.methods import REGISTRY
from unlearn.models import list_checkpoints, load_model
from unlearn.provenance import resolve_path
from unlearn.toyworld import get_preset

REPO_ROOT = Path(__file__).resolve().parents[2]
UNLEARN_LR = "0.1"
"""High enough that 2 steps change some answers of the tiny world's model (see
`_assert_results_describe_the_saved_model`)."""
DEFAULT_WORLD_CURVE = REPO_ROOT / "benchmarks" / "results" / "checkpoint_curve_default.json"
"""The default world's per-checkpoint accuracies (`benchmarks.checkpoint_curve`), committed: CI
cannot build that world (5+ minutes)."""
SWEEP_SPLITS = ("forget_attack", "forget_dev")
"""The forget items that the recipes' teacher sweep scores together (reserved template)."""


@pytest.fixture(scope="module")
def tiny_curve(tiny_world):
    return checkpoint_curve(tiny_world)


def _sweep_curve(curve) -> list[CheckpointScore]:
    """The forget accuracies that the recipes' teacher sweep measures, from a checkpoint curve.

    The sweep (recipes.checkpoint_transfer, recipes.probe_unlearn) scores every saved checkpoint of
    the unfiltered model but the last one, which is the final model, on the SWEEP_SPLITS items
    together. Every item carries one unit of credit, so that accuracy is the mean of the splits'
    accuracies weighted by their item counts.
    """
    counts = curve["n_items"]
    total = sum(counts[split] for split in SWEEP_SPLITS)
    return [
        CheckpointScore(
            point["revision"],
            sum(counts[split] * point[f"{split}_acc"] for split in SWEEP_SPLITS) / total,
        )
        for point in curve["checkpoints"][:-1]
    ]


def _margin_between_the_two_lowest(curve, chance=0.25) -> float:
    """A margin over chance whose threshold lies halfway between the two lowest accuracies of the
    sweep curve: it admits the least-knowing checkpoint(s) and rejects the others.

    The tiny world's model never learns the forget domain, so its forget accuracy drifts down and
    the latest swept checkpoint is the least-knowing one (seed 0: step0 0.282, step8 0.264,
    step16 0.264, step32 0.236: margin 0.0, step32 chosen, the other three rejected). That a
    later checkpoint over the threshold is passed over is tested on the default world's curve.
    """
    levels = sorted({round(score.forget_acc, 9) for score in _sweep_curve(curve)})
    assert len(levels) >= 2, f"a flat sweep curve cannot test selection: {levels}"
    return round((levels[0] + levels[1]) / 2 - chance, 3)  # levels are >= 1/n_items apart


def _assert_teacher_chosen_by_margin(out, world, curve, margin, results):
    """The sweep file's scores match the checkpoint curve measured here, and the chosen teacher is
    the latest checkpoint whose forget accuracy there is <= chance + margin, not the final model."""
    sweep = json.loads((out / "teacher_sweep" / "sweep.json").read_text())
    checkpoints = list_checkpoints(world.model_dir("unfiltered"))
    expected = _sweep_curve(curve)
    assert [s["revision"] for s in sweep["scores"]] == [e.revision for e in expected]
    assert [e.revision for e in expected] == checkpoints[:-1]
    assert [s["forget_acc"] for s in sweep["scores"]] == pytest.approx(
        [e.forget_acc for e in expected]
    )
    eligible = [s for s in sweep["scores"] if s["forget_acc"] <= sweep["chance"] + margin]
    assert 0 < len(eligible) < len(sweep["scores"]), "the margin should reject some checkpoints"
    assert sweep["chosen"] == eligible[-1]["revision"] != checkpoints[-1]
    assert results["teacher_forget_acc"] == eligible[-1]["forget_acc"]
    assert results["selected_teacher"] == sweep["chosen"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["method"]["margin"] == margin
    assert info["config"]["selected_teacher"] == sweep["chosen"]


def _test_forget_acc(model_dir, world) -> float:
    loaded = load_model(model_dir)
    with reporting():
        return evaluate_mc(loaded.model, loaded.tokenizer, world.test_items()).acc


def _assert_results_describe_the_saved_model(out, world, results):
    """After unlearning: the saved model re-evaluated on the world's items (test forget over both
    templates, each tuning split on the reserved one). Before: the world's unfiltered model, from
    the world's own report where it has the split. The run must have changed some answer, or the
    check could not tell the saved model from the original."""
    loaded = load_model(out / "model")
    keys = [f"{split}_acc" for split in ("forget_attack", "forget_dev", "retain")]
    for key in keys:
        items = world.items(key.removesuffix("_acc"), "reserved")
        assert results[key] == pytest.approx(evaluate_mc(loaded.model, loaded.tokenizer, items).acc)
    assert results["forget_acc"] == pytest.approx(_test_forget_acc(out / "model", world))
    assert any(results[key] != results[f"{key}_before"] for key in ["forget_acc", *keys])
    unfiltered = world.report()["unfiltered"]
    assert results["retain_acc_before"] == pytest.approx(unfiltered["retain_acc"])
    assert results["forget_attack_acc_before"] == pytest.approx(unfiltered["forget_attack_acc"])
    before = _test_forget_acc(world.model_dir("unfiltered"), world)
    assert results["forget_acc_before"] == pytest.approx(before)


def _assert_no_absolute_paths(out):
    """No JSON or JSON-lines file the run wrote holds an absolute path (see unlearn.provenance).

    Saved models are skipped: their files are Hugging Face's (a tokenizer's vocabulary holds "/").
    """
    files = [
        path
        for pattern in ("*.json", "*.jsonl")
        for path in sorted(out.rglob(pattern))
        if not (path.parent / "tokenizer.json").exists()
    ]
    assert any(f.name == "run_info.json" for f in files)
    for path in files:
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for line in lines:
            values = json.loads(line)
            assert absolute_path_strings(values) == [], path


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
            "--lr",
            UNLEARN_LR,
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
    _assert_results_describe_the_saved_model(out, tiny_home, results)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/dev_forget_acc" in r] == [0, 1, 2]
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["training"]["num_steps"] == 2 and "git_sha" in info
    assert resolve_path(info["config"]["out"]) == out.resolve()
    _assert_no_absolute_paths(out)


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


PRESETS = sorted((Path(__file__).parents[2] / "recipes" / "configs").glob("*.yaml"))


def _preset_cases():
    """Each YAML preset with the methods it is for: the one its name starts with, else all."""
    for preset in PRESETS:
        owners = [n for n in REGISTRY if preset.stem.startswith(n)] or list(REGISTRY)
        for name in owners:
            yield pytest.param(preset, name, id=f"{preset.stem}-{name}")


@pytest.mark.parametrize(("preset", "name"), list(_preset_cases()))
def test_every_yaml_preset_parses(preset, name):
    cfg = parse(config_class(name), args=["--config_path", str(preset)], add_config_path_arg=True)
    assert cfg.training.num_steps >= 1
    assert len(PRESETS) >= 2


def test_a_recipe_named_after_a_method_is_its_preset():
    """`recipes/<method>.py` is optional; where it exists it is that method's preset."""
    found = 0
    for name in REGISTRY:
        if (Path(__file__).parents[2] / "recipes" / f"{name}.py").exists():
            assert importlib.import_module(f"recipes.{name}").Config.method_name == name
            found += 1
    assert found >= 6


def test_checkpoint_transfer_recipe_selects_a_teacher_fits_maps_and_unlearns(
    tiny_home, tiny_curve, tmp_path
):
    out = tmp_path / "ct"
    margin = _margin_between_the_two_lowest(tiny_curve)
    cfg = parse(
        checkpoint_transfer.Config,
        args=[
            "--out",
            str(out),
            "--world_preset",
            "tiny",
            "--num_steps",
            "2",
            "--lr",
            UNLEARN_LR,
            "--batch_size",
            "4",
            "--margin",
            str(margin),
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
    _assert_teacher_chosen_by_margin(out, tiny_home, tiny_curve, margin, results)
    mse = json.loads((out / "maps" / "heldout_mse.json").read_text())
    assert set(mse) == {"affine", "identity"} and (out / "maps" / "maps.safetensors").exists()
    _assert_results_describe_the_saved_model(out, tiny_home, results)
    _assert_no_absolute_paths(out)


def test_checkpoint_transfer_recipe_with_svcca_maps(tiny_home, tmp_path):
    """--map_kind svcca saves SVCCA maps and reports them next to the ridge and identity maps."""
    from unlearn.maps import load_maps

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
        parse(checkpoint_transfer.Config, args=["--svcca_variance", "0.0"])


def test_checkpoint_transfer_without_a_near_chance_checkpoint_is_a_clear_error(tiny_home, tmp_path):
    cfg = parse(
        checkpoint_transfer.Config,
        args=["--out", str(tmp_path), "--world_preset", "tiny", "--margin", "-1.0"],
        add_config_path_arg=True,
    )
    with pytest.raises(ValueError, match="no checkpoint has forget accuracy"):
        checkpoint_transfer.main(cfg)


def test_probe_unlearn_recipe_selects_a_teacher_trains_probes_and_unlearns(
    tiny_home, tiny_curve, tmp_path
):
    out = tmp_path / "probe"
    margin = _margin_between_the_two_lowest(tiny_curve)
    flags = f"--world_preset tiny --num_steps 2 --lr {UNLEARN_LR} --batch_size 4 --margin {margin}"
    flags += " --probe_steps 2 --probe_docs 40 --d_probe 16 --probe_ffn 32"
    results = probe_unlearn.main(
        parse(probe_unlearn.Config, args=["--out", str(out), *flags.split()])
    )
    _assert_teacher_chosen_by_margin(out, tiny_home, tiny_curve, margin, results)
    meta = json.loads((out / "probes" / "probes.json").read_text())
    mse = json.loads((out / "probes" / "heldout_mse.json").read_text())
    # Layer stride 2 from the last of the tiny model's 2 blocks: block 1 only, depth 2 - 1 = 1.
    assert set(meta["probes"]) == set(mse["probe"]) == set(mse["identity"]) == {"1"}
    assert meta["probes"]["1"]["depth"] == 1
    chosen = ("selected_teacher", "teacher_forget_acc")  # returned, not in results.json
    assert json.loads((out / "results.json").read_text()) == pytest.approx(
        {k: v for k, v in results.items() if k not in chosen}
    )
    _assert_results_describe_the_saved_model(out, tiny_home, results)

    # Saved probes are reused as they are: no sweep, no probe training.
    again = tmp_path / "again"
    args = ["--out", str(again), "--probe_path", str(out / "probes"), *flags.split()]
    probe_unlearn.main(parse(probe_unlearn.Config, args=args))
    assert not (again / "teacher_sweep").exists() and not (again / "probes").exists()
    assert (again / "results.json").exists()
    # Too few probe documents for two batches: refused before any probe trains (the check needs
    # the data's batch size, so it runs when the method prepares, not when the config parses).
    first = list_checkpoints(tiny_home.model_dir("unfiltered"))[0]
    flags = f"--world_preset tiny --batch_size 4 --probe_docs 4 --teacher_revision {first}"
    args = ["--out", str(tmp_path / "few"), *flags.split()]
    with pytest.raises(ValueError, match="--probe_docs"):
        probe_unlearn.main(parse(probe_unlearn.Config, args=args))
    assert not (tmp_path / "few" / "probes").exists()


@pytest.mark.parametrize("recipe", [checkpoint_transfer, probe_unlearn], ids=lambda r: r.__name__)
def test_default_margin_picks_the_stage_boundary_on_the_default_world(recipe):
    """On the default world's committed checkpoint curve, the recipes' default chance and margin
    select step400, the end of the retain-only stage: the last checkpoint that knows retain but
    not forget (from step512 on the model learns the forget domain, so the latest swept
    checkpoint is passed over)."""
    curve = json.loads(DEFAULT_WORLD_CURVE.read_text())
    default = get_preset("default")
    assert curve["config_hash"] == default.hash(), (
        f"{DEFAULT_WORLD_CURVE} is not the current default world's: build the world "
        "(python -m recipes.toyworld), rerun python -m benchmarks.checkpoint_curve and commit it"
    )
    assert curve["checkpoints"][-1]["revision"] == f"step{default.num_steps}"  # the final model
    cfg = recipe.Config().method
    swept = _sweep_curve(curve)
    chosen = select_checkpoint(swept, cfg.chance, cfg.margin)
    assert chosen.revision == f"step{default.stage1_steps}" == "step400"
    assert swept[-1].revision == "step512" and swept[-1].forget_acc > cfg.chance + cfg.margin
