"""The mask ablation on the tiny world with 2 steps: one row per mask next to the controls, each
run trained with its mask (recorded with the run, in its key), token shares re-derived from the
documents, and the result files written."""

import json

import pytest

from benchmarks import mask_ablation
from unlearn.config import DataConfig, ModelConfig
from unlearn.data import tokenize_documents
from unlearn.experiment import load_setup
from unlearn.selection import SELECTORS


def _config(tmp_path, **kwargs):
    return mask_ablation.Config(
        **{
            "seeds": 1,
            "world_preset": "tiny",
            "unlearn_args": "--num_steps 2 --batch_size 4",
            "num_steps": 2,
            "out": str(tmp_path / "runs"),
            "results": str(tmp_path / "results"),
            "device": "cpu",
            "n_boot": 20,
            **kwargs,
        }
    )


def test_mask_ablation_rows_runs_and_files(tiny_home, tmp_path):
    payload = mask_ablation.main(_config(tmp_path))
    masks = ["all", "values", *SELECTORS]
    assert list(payload["rows"]) == ["unfiltered", "filtered twin", *masks]
    for mask in masks:
        row = payload["rows"][mask]
        for name in ("forget_pre", "retain_pre", "excess_max"):
            low, high = row[f"{name}_ci"]
            assert low - 1e-9 <= row[name] <= high + 1e-9, (mask, name)
        run = tmp_path / "runs" / "sequential" / mask / "seed0" / "run"
        info = json.loads((run / "run_info.json").read_text())["config"]
        assert info["data"]["token_mask"] == mask
        assert json.loads((run / "results.json").read_text())["num_steps"] == 4  # 2 blocks x 2
    keys = {
        json.loads((tmp_path / "runs" / "sequential" / m / "seed0" / "key.json").read_text())["key"]
        for m in masks
    }
    assert len(keys) == len(masks)  # every mask is its own run

    setup = load_setup(ModelConfig(world_preset="tiny", device="cpu"), DataConfig())
    rows = tokenize_documents(setup.loaded.tokenizer, setup.forget_docs, DataConfig().max_len)
    value_share = sum(map(sum, rows.value_masks)) / sum(map(len, rows.ids))
    assert payload["token_share"]["all"] == 1.0
    assert payload["token_share"]["values"] == pytest.approx(value_share)
    assert 0 < payload["token_share"]["probe"] < 1

    on_disk = json.loads((tmp_path / "results" / "mask_ablation.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(payload["rows"]))
    text = (tmp_path / "results" / "mask_ablation.md").read_text()
    assert all(f"| {mask} |" in text for mask in masks)


def test_bad_ablation_settings_fail_before_running():
    with pytest.raises(ValueError, match="unknown method"):
        mask_ablation.Config(method="nope")
    with pytest.raises(ValueError, match="distinct masks"):
        mask_ablation.Config(masks=["values", "values"])
    with pytest.raises(ValueError, match="'regex' is not 'all'"):
        mask_ablation.Config(masks=["all", "regex"])
    with pytest.raises(ValueError, match="drop --token_mask"):
        mask_ablation.Config(unlearn_args="--token_mask values")
