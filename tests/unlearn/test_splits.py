"""The dev/test split of the held-out forget entities, and the rule that test items are scored only
in final reporting: enforced by `unlearn.eval`, and checked here over every recipe's code paths by
instrumenting the item scorer."""

import inspect
import json
from pathlib import Path

import pytest
from simple_parsing import parse

import unlearn.eval as eval_module
from unlearn.eval import ReportOnlyItemsError, evaluate_mc, reporting
from unlearn.toyworld import get_preset
from unlearn.toyworld.generator import generate_world
from unlearn.toyworld.world import DEV, TEST, split_heldout


def test_dev_and_test_are_entity_disjoint_halves_of_the_heldout_split(tiny_world):
    parts = tiny_world.heldout_entities()
    heldout = tiny_world.items("forget_heldout", template=None)
    dev, test = tiny_world.items(DEV, template=None), tiny_world.items(TEST, template=None)
    assert {i["entity"] for i in dev} == set(parts[DEV])
    assert {i["entity"] for i in test} == set(parts[TEST])
    assert not set(parts[DEV]) & set(parts[TEST])
    assert len(dev) + len(test) == len(heldout)
    assert {i["split"] for i in dev} == {DEV} and {i["split"] for i in test} == {TEST}
    assert TEST not in tiny_world.items_by_split("reserved")
    assert tiny_world.test_items() == test


def test_the_default_world_has_300_items_and_150_facts_in_each_part():
    """Generated in memory (no training): 60 held-out pathogens x 5 attributes x 2 templates."""
    world = generate_world(get_preset("default"))
    heldout = world["items"]["forget_heldout"]
    parts = split_heldout(item["entity"] for item in heldout)
    for part in (DEV, TEST):
        items = [i for i in heldout if i["entity"] in set(parts[part])]
        facts = {(i["entity"], i["attribute"]) for i in items}
        assert len(items) >= 300 and len(facts) >= 150, part


def test_test_items_are_scored_only_inside_reporting(tiny_lm):
    model, tokenizer = tiny_lm
    items = [{"prompt": "The pathogen", "choices": [" a", " b"], "answer": 0, "split": TEST}]
    with pytest.raises(ReportOnlyItemsError, match="outside final reporting"):
        evaluate_mc(model, tokenizer, items)
    with reporting():
        assert evaluate_mc(model, tokenizer, items).n == 1
    evaluate_mc(model, tokenizer, [{**items[0], "split": DEV}])


REPORTERS = {("unlearn/experiment.py", "report"), ("unlearn/tamper.py", "evaluate")}
REPO = Path(__file__).resolve().parents[2]


def _in_repo(filename: str) -> str:
    """A frame's file relative to the repository (wherever it is checked out), else as given."""
    path = Path(filename).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else filename


"""The final-reporting functions: an unlearning run's report and the attack's evaluation."""


def test_no_code_path_but_final_reporting_scores_a_test_item(tiny_home, tmp_path, monkeypatch):
    """Instrument the item scorer and run the recipes whose paths score items (teacher sweeps, map
    and probe fitting, the tuned lens, training-time evaluation, the attack and its controls):
    every scoring of test items happens inside `reporting()`, entered from a final-reporting
    function, and both kinds of final reporting did score test items."""
    from recipes import checkpoint_transfer, probe_unlearn, sequential, tuned_lens

    calls = []
    original = eval_module.check_not_test

    def spy(items):
        if any(item.get("split") == TEST for item in items):
            frames = {(_in_repo(f.filename), f.function) for f in inspect.stack()}
            calls.append((eval_module.is_reporting(), frames & REPORTERS))
        return original(items)

    monkeypatch.setattr(eval_module, "check_not_test", spy)
    tiny = "--world_preset tiny --num_steps 2 --batch_size 4"
    runs = [
        (checkpoint_transfer, f"{tiny} --margin 0.3 --map_docs 40 --tamper_steps 2"),
        (probe_unlearn, f"{tiny} --margin 0.3 --probe_steps 2 --probe_docs 40 --d_probe 16"),
        (sequential, tiny),
        (tuned_lens, "--world_preset tiny --num_steps 2"),
    ]
    for recipe, flags in runs:
        out = tmp_path / recipe.__name__.rsplit(".", 1)[-1]
        recipe.main(parse(recipe.Config, args=["--out", str(out), *flags.split()]))
    assert calls and all(inside and reporters for inside, reporters in calls)
    assert {r for _, reporters in calls for r in reporters} == REPORTERS
    sweep = json.loads(
        (tmp_path / "checkpoint_transfer" / "teacher_sweep" / "sweep.json").read_text()
    )
    assert sweep["scores"]  # the sweep scored (attack and dev) items, never test ones


def test_the_tuned_lens_never_trains_on_test_facts(tiny_home, tmp_path, monkeypatch):
    from recipes import tuned_lens

    seen = []
    real = tuned_lens.tokenize_documents

    def capture(tokenizer, docs, *args, **kwargs):
        seen.extend(docs)
        return real(tokenizer, docs, *args, **kwargs)

    monkeypatch.setattr(tuned_lens, "tokenize_documents", capture)
    args = ["--out", str(tmp_path), "--world_preset", "tiny", "--num_steps", "1"]
    tuned_lens.main(parse(tuned_lens.Config, args=args))
    test_entities = set(tiny_home.heldout_entities()[TEST])
    assert seen and not {doc["entity"] for doc in seen} & test_entities
    assert {doc["entity"] for doc in seen} & set(tiny_home.heldout_entities()[DEV])
