"""Recipes that never lie (issue 14): a run folder holds one run, and every input is checked
before any model loads.

One lens-unlearning run (2 steps on the tiny world) is shared by the module; every other test
refuses before loading a model, which `_no_model_loads` enforces.
"""

import json
import time

import pytest
from simple_parsing import parse

from recipes import (
    checkpoint_transfer,
    circuit_breakers,
    lens_unlearn,
    probe_unlearn,
    rewritten_transfer,
    sequential,
    tamper,
    tuned_lens,
)
from unlearn.config import replace_flat
from unlearn.methods import LensUnlearnConfig
from unlearn.runs import parse_config, run_recipe

TINY = ["--world_preset", "tiny", "--num_steps", "2", "--batch_size", "4", "--eval_every", "0"]


def _no_model_loads(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module in ("unlearn.experiment", "unlearn.models", "recipes.tuned_lens"):
        monkeypatch.setattr(f"{module}.load_model", fail)


@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory):
    """A finished 2-step lens_unlearn run: its folder, results and metrics.jsonl bytes."""
    out = tmp_path_factory.mktemp("lens") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNLEARN_HOME", str(tiny_world.root.parent.parent))
        results = lens_unlearn.main(parse(lens_unlearn.Config, args=["--out", str(out), *TINY]))
    return out, results, (out / "metrics.jsonl").read_bytes()


def test_rerun_with_another_config_refuses_before_loading(finished_run, tiny_home, monkeypatch):
    """It used to return the old model byte for byte while run_info.json recorded the new
    config."""
    out, _, _ = finished_run
    weights = (out / "model" / "model.safetensors").read_bytes()
    info = (out / "run_info.json").read_text()
    _no_model_loads(monkeypatch)
    changed = ["--lr", "0.01", "--seed", "3", "--forget_loss", "max_entropy"]
    cfg = parse(lens_unlearn.Config, args=["--out", str(out), *TINY, *changed])
    with pytest.raises(ValueError) as error:
        lens_unlearn.main(cfg)
    message = str(error.value)
    for difference in (
        "training.optim.lr: 0.0009 -> 0.01",
        "training.seed: 0 -> 3",
        "method.forget_loss: 'random_ce' -> 'max_entropy'",
    ):
        assert difference in message
    assert "pass a new --out, or pass --overwrite true" in message
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    assert (out / "run_info.json").read_text() == info


def test_another_recipe_into_the_same_folder_refuses(finished_run, tiny_home, monkeypatch):
    """circuit_breakers pointed at a lens-unlearning folder used to report the lens model as its
    own; so did every other unlearning recipe."""
    out, _, _ = finished_run
    _no_model_loads(monkeypatch)
    for recipe, extra in (
        (circuit_breakers, []),
        (sequential, []),
        (rewritten_transfer, []),
        (probe_unlearn, ["--probe_steps", "1"]),
        (checkpoint_transfer, ["--tamper", "false"]),
    ):
        cfg = parse(recipe.Config, args=["--out", str(out), *TINY, *extra])
        name = recipe.__name__.rpartition(".")[2]
        with pytest.raises(ValueError, match=f"recipes.lens_unlearn run, not recipes.{name}"):
            recipe.main(cfg)
    cfg = parse(tuned_lens.Config, args=["--out", str(out), "--world_preset", "tiny"])
    with pytest.raises(ValueError, match="recipes.lens_unlearn run, not recipes.tuned_lens"):
        tuned_lens.main(cfg)


def test_same_command_resumes_the_finished_run(finished_run, tiny_home):
    """Nothing is retrained or rewritten, and train_seconds is the run's own (it used to count
    only the last segment: here an empty one)."""
    out, results, metrics = finished_run
    again = lens_unlearn.main(parse(lens_unlearn.Config, args=["--out", str(out), *TINY]))
    assert again == pytest.approx(results)
    assert again["train_seconds"] == results["train_seconds"] > 0
    assert again["skipped_steps"] == 0
    assert (out / "metrics.jsonl").read_bytes() == metrics


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _items_dir(root, bad_retain: bool = False):
    root.mkdir()
    item = {"prompt": "Velkor is spread by", "choices": [" ticks", " water"], "answer": 0}
    for split in ("forget_heldout", "forget_dev", "forget_test", "retain"):
        rows = [item, {"prompt": "x", "choices": [" a", " b"]}] if bad_retain else [item]
        _write_jsonl(root / f"{split}.jsonl", rows if split == "retain" else [item])
    return str(root)


def test_bad_inputs_fail_before_any_model_loads(tiny_home, tmp_path, monkeypatch):
    """Each used to surface after the model was loaded and evaluated (minutes on a real model),
    as a bare JSONDecodeError of the wrong line, a KeyError or a crash inside training."""
    _no_model_loads(monkeypatch)
    bad_json = tmp_path / "forget.jsonl"
    bad_json.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    no_text = _write_jsonl(tmp_path / "retain.jsonl", [{"text": "a"}, {"txt": "b"}])
    cases = [
        (["--forget_data", str(bad_json)], r"forget\.jsonl:3: not valid JSON"),
        (["--retain_data", no_text], r'retain\.jsonl:2: a document needs a "text" string'),
        (
            ["--eval_items", _items_dir(tmp_path / "items", bad_retain=True)],
            r"retain\.jsonl:2: an item needs \['answer'\]",
        ),
        (["--batch_size", "6", "--grad_accum", "4"], "--batch_size 6 does not split into"),
        (["--lens_path", str(tmp_path / "no_lens")], "--lens_path .*no_lens does not exist"),
    ]
    for flags, message in cases:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = parse(lens_unlearn.Config, args=["--out", str(out), *TINY, *flags])
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            lens_unlearn.main(cfg)

    typo = lens_unlearn.Config(out=str(tmp_path / "typo"))
    typo.method = replace_flat(LensUnlearnConfig(), forget_ramp="linaer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"forget_ramp \(--forget_ramp\) is 'linaer'.*'constant'"):
        lens_unlearn.main(typo)


def test_bad_numbers_and_preset_choices_are_config_errors(tmp_path, capsys):
    for flag, value in (
        ("--num_steps", "0"),
        ("--save_every", "0"),
        ("--grad_accum", "0"),
        ("--batch_size", "0"),
        ("--lr", "0"),
    ):
        with pytest.raises(ValueError, match=f"{flag} must be"):
            parse(lens_unlearn.Config, args=[flag, value])
    preset = tmp_path / "typo.yaml"
    preset.write_text("method:\n  retain:\n    retain_ramp: retain_warmpu\n")
    with pytest.raises(
        ValueError, match=r"typo\.yaml: method\.retain\.retain_ramp .*'retain_warmpu'"
    ):
        parse_config(lens_unlearn.Config, ["--config_path", str(preset)])

    with pytest.raises(SystemExit):
        run_recipe(lens_unlearn.main, lens_unlearn.Config, ["--config_path", str(preset)])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "allowed values" in line and "--debug" in line


def test_uncached_hub_model_fails_fast_offline(tmp_path, monkeypatch):
    """It used to retry the hub for about 50 s, then say "save a tokenizer there"."""
    from unlearn.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="nor in the local Hugging Face cache") as error:
        load_model("nobody-xyz/not-a-model")
    assert "pass that directory as the model" in str(error.value)

    _no_model_loads(monkeypatch)
    docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "Velkor is spread by ticks."}])
    flags = ["--forget_data", docs, "--retain_data", docs, "--eval_items"]
    flags += [_items_dir(tmp_path / "items"), "--model", "nobody-xyz/not-a-model"]
    cfg = parse(lens_unlearn.Config, args=["--out", str(tmp_path / "run"), *flags])
    with pytest.raises(FileNotFoundError, match="hub access is off"):
        lens_unlearn.main(cfg)
    assert time.perf_counter() - start < 10


def test_tamper_hint_names_its_own_flags(tmp_path, monkeypatch):
    _no_model_loads(monkeypatch)
    cfg = parse(tamper.Config, args=["--out", str(tmp_path), "--model", "nobody-xyz/not-a-model"])
    with pytest.raises(ValueError, match="pass --attack_data, --retain_data and --eval_items"):
        tamper.main(cfg)
