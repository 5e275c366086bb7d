"""benchmarks.lora_memory on the tiny world: a LoRA run's original costs no copy of the weights."""

import json

import pytest

from benchmarks.lora_memory import Config, main


def test_the_adapter_disabled_original_saves_one_copy(tiny_home, tmp_path):
    """One step of NPO both ways: the step graph's models hold the weights twice with the copy,
    once without, and the peak of torch's CPU allocations drops by the copy."""
    cfg = Config(methods=["npo"], world_preset="tiny", num_steps=1, batch_size=4, out_dir=tmp_path)
    info = main(cfg)
    rows = {row["way"]: row for row in info["results"]}
    weights = info["model_weight_bytes"]
    copied, shared = rows["copy"], rows["adapters_disabled"]
    assert copied["step_graph_unique_bytes"] - shared["step_graph_unique_bytes"] == weights
    saved = copied["peak_allocated_bytes"] - shared["peak_allocated_bytes"]
    assert saved == pytest.approx(weights, rel=0.01)  # a few scalars more or less at the peak
    assert json.loads((tmp_path / "lora_memory.json").read_text())["results"] == info["results"]
    assert "| npo | adapters_disabled |" in (tmp_path / "lora_memory.md").read_text()
