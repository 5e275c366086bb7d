"""The MAGIC attribution benchmark: its correlations by hand, and a small run on the tiny world."""

import json

import pytest
import torch

from benchmarks import magic_attribution
from unlearn.selection.magic import MagicSettings


def test_correlations_by_hand():
    """measured = 2 · predicted + 1 exactly: Pearson 1, slope 2; a monotone but curved relation
    keeps Spearman at 1 with Pearson below it; a reversed order is −1."""
    predicted = torch.tensor([0.0, 1.0, 2.0, 3.0])
    linear = magic_attribution.correlations(predicted, 2 * predicted + 1)
    assert linear == pytest.approx({"spearman": 1.0, "pearson": 1.0, "slope": 2.0})
    curved = magic_attribution.correlations(predicted, predicted**4)
    assert curved["spearman"] == pytest.approx(1.0) and curved["pearson"] < 0.99
    assert magic_attribution.correlations(predicted, -predicted)["spearman"] == pytest.approx(-1)


def test_spread_takes_documents_through_the_whole_list():
    assert magic_attribution.spread(list(range(10)), 3) == [0, 3, 6]
    assert magic_attribution.spread([1, 2], 5) == [1, 2]


def test_the_benchmark_runs_on_the_tiny_world(tiny_home, tmp_path):
    cfg = magic_attribution.Config(
        world_preset="tiny",
        n_forget_docs=8,
        n_retain_docs=8,
        magic=MagicSettings(magic_steps=3, magic_batch_size=4),
        n_subsets=4,
        results=str(tmp_path),
        device="cpu",
    )
    record = magic_attribution.main(cfg)
    on_disk = json.loads((tmp_path / "magic_attribution.json").read_text())
    assert (tmp_path / "magic_attribution.md").read_text() == magic_attribution.markdown(on_disk)
    assert on_disk["git_sha"] and on_disk["machine"] and on_disk["command"]
    assert record["magic"]["num_steps"] == 3 and record["n_forget_docs"] == 8
    lds = record["lds"]
    assert lds["n_subsets"] == 4 and len(lds["measured"]["forget_dev"]) == 4
    for name in ("magic", "first_order"):
        for target in ("forget_dev", "retain"):
            assert -1 <= lds[name][target]["spearman"] <= 1
    truth = record["ground_truth"]
    assert truth["values"]["precision"] == truth["values"]["recall"] == 1.0
    assert truth["magic, top 0.2"]["fraction"] == pytest.approx(0.2, abs=0.01)
