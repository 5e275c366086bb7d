"""recipes.select_tokens on the tiny world: the mask, the summary and the picture it writes, with
the summary's numbers re-derived here from the documents (tokenizer offsets and value spans, by
hand), the cache reused on a rerun, and bad flags refused before anything loads."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from recipes.select_tokens import cli, config_class, main
from unlearn.provenance import portable_path
from unlearn.runs import parse_config
from unlearn.selection import load_token_mask


def _run(selector, tmp_path, *flags):
    args = ["--world_preset", "tiny", "--device", "cpu", "--out", str(tmp_path), *flags]
    return main(parse_config(config_class(selector), args))


def _value_masks(world, docs, max_len=128):
    """Per document: BOS, then each token's overlap with a value span, from the raw offsets."""
    tokenizer = AutoTokenizer.from_pretrained(world.tokenizer_dir)
    masks = []
    for doc in docs:
        offsets = tokenizer(doc["text"], add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        spans = [(start, end) for _, _, start, end in doc["facts"]]
        masks.append(
            ([False] + [any(a < e and b > s for s, e in spans) for a, b in offsets])[:max_len]
        )
    return masks


@pytest.mark.parametrize(
    "selector, flags", [("keywords", []), ("probe", ["--num_steps", "20", "--fraction", "0.3"])]
)
def test_the_recipe_writes_mask_summary_and_picture(selector, flags, tiny_home, tmp_path):
    summary = _run(selector, tmp_path, *flags)
    mask = load_token_mask(tmp_path)
    truth = _value_masks(tiny_home, tiny_home.corpus("forget_attack"))
    assert [len(r) for r in mask.rows] == [len(r) for r in truth]

    selected = torch.tensor([x for row in mask.rows for x in row])
    values = torch.tensor([x for row in truth for x in row])
    hits = int((selected & values).sum())
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["n_tokens"] == len(values) and summary["n_selected"] == int(selected.sum())
    assert summary["fraction"] == pytest.approx(float(selected.float().mean()))
    assert summary["precision"] == pytest.approx(hits / int(selected.sum()))
    assert summary["recall"] == pytest.approx(hits / int(values.sum()))
    assert summary["value_fraction"] == pytest.approx(float(values.float().mean()))
    if selector == "keywords":
        assert summary["recall"] == 1.0  # every value of the forget domain is a keyword
    else:
        assert summary["n_selected"] == round(0.3 * len(values))
        assert summary["settings"]["num_steps"] == 20

    png = (tmp_path / "masks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    again = _run(selector, tmp_path, *flags, "--overwrite", "true")
    assert again["cached"] and again["precision"] == summary["precision"]


def test_bad_flags_fail_before_anything_loads(tiny_home, tmp_path, capsys):
    with pytest.raises(ValueError, match="drop it"):
        _run("keywords", tmp_path / "a", "--token_mask", "values")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no keywords"):
        _run("keywords", tmp_path / "b", "--keywords", str(empty))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        cli(["--selector", "regex"])
    assert "invalid choice: 'regex'" in capsys.readouterr().err


def test_a_keyword_file_replaces_the_worlds(tiny_home, tmp_path):
    keywords = tmp_path / "keywords.txt"
    keywords.write_text("bats\nrats\n")
    summary = _run("keywords", tmp_path / "out", "--keywords", str(keywords))
    assert summary["info"]["n_keywords"] == 2
    assert summary["precision"] == 1.0 and 0 < summary["recall"] < 1


class _Stop(Exception):
    """Raised by the stand-in training core once it has seen the batches."""


def test_a_training_run_trains_on_the_mask_the_recipe_made(tiny_home, tmp_path, monkeypatch):
    """`--token_mask activations` (the cached selection: same key as the recipe's) and
    `--token_mask <the recipe's folder>` both hand the training core forget rows carrying exactly
    the recipe's mask; run_info.json records where it came from."""
    from recipes.unlearn import config_class as method_config
    from recipes.unlearn import run

    _run("activations", tmp_path / "selection")
    expected = load_token_mask(tmp_path / "selection").rows
    seen = {}

    def train_plan(model, phases, batches, **kwargs):
        seen["forget"] = batches.forget
        raise _Stop

    monkeypatch.setattr("unlearn.experiment.train_plan", train_plan)
    for name, spec in (("by_name", "activations"), ("by_file", str(tmp_path / "selection"))):
        out = tmp_path / name
        flags = ["--world_preset", "tiny", "--device", "cpu", "--out", str(out), "--token_mask"]
        cfg = parse_config(method_config("lens_unlearn"), [*flags, spec, "--batch_size", "4"])
        with pytest.raises(_Stop):
            run(cfg)
        assert seen["forget"].token_masks == expected
        info = json.loads((out / "run_info.json").read_text())["config"]
        recorded = spec if name == "by_name" else portable_path(spec)  # paths are portable
        assert info["token_mask"] == info["data"]["token_mask"] == recorded
        assert info["token_mask_fraction"] == pytest.approx(0.1, abs=1e-3)
        if name == "by_name":
            assert info["cached"] is True
