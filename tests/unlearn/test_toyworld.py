import json
import re

import datasets
import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from unlearn.models import list_checkpoints, load_model
from unlearn.toyworld import ITEM_SPLITS, ToyWorldConfig, generate_world, get_preset
from unlearn.toyworld import pretrain as pretrain_module
from unlearn.toyworld.domains import DOMAINS, RESERVED_TEMPLATE, cloze_prompt
from unlearn.toyworld.pretrain import batch_at, pretrain, token_stream
from unlearn.toyworld.world import write_jsonl

POST_CORPORA = ("forget_attack", "forget_rewritten", "retain")


@pytest.fixture(scope="module")
def default_world():
    return generate_world(get_preset("default"))


def test_generation_is_byte_identical_for_a_seed(tmp_path):
    cfg = get_preset("tiny")
    for run in ("a", "b"):
        world = generate_world(cfg)
        for name, rows in {**world["corpora"], **world["items"]}.items():
            write_jsonl(tmp_path / run / f"{name}.jsonl", rows)
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    other = generate_world(get_preset("tiny", seed=1))
    assert other["corpora"]["pretrain_forget"] != generate_world(cfg)["corpora"]["pretrain_forget"]


def test_default_world_sizes(default_world):
    items = default_world["items"]
    # One reserved-template and one seen-template item per fact.
    facts = {split: len(items[split]) // 2 for split in ITEM_SPLITS}
    assert facts["forget_attack"] + facts["forget_heldout"] >= 500
    assert facts["retain"] >= 500
    assert facts["forget_heldout"] >= 200
    for domain in DOMAINS.values():
        assert all(len(t) >= 4 for t in domain.templates.values())


def test_no_heldout_fact_in_post_pretraining_text(default_world):
    """Held-out pathogens are named only in pretraining and validation text."""
    heldout = [e for e, s in default_world["splits"].items() if s == "forget_heldout"]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, heldout)) + r")\b")
    for corpus in POST_CORPORA:
        for doc in default_world["corpora"][corpus]:
            assert pattern.search(doc["text"]) is None, (corpus, doc["id"])
    assert any(pattern.search(d["text"]) for d in default_world["corpora"]["pretrain_forget"])


def test_reserved_template_only_in_pretraining(default_world):
    for corpus in POST_CORPORA:
        for doc in default_world["corpora"][corpus]:
            assert RESERVED_TEMPLATE not in doc["templates"]
            domain = DOMAINS["forget" if doc["split"].startswith("forget") else "retain"]
            for attribute, *_ in doc["facts"]:
                reserved = domain.templates[attribute][RESERVED_TEMPLATE]
                assert cloze_prompt(reserved, doc["entity"]) not in doc["text"]
    used = {t for d in default_world["corpora"]["pretrain_forget"] for t in d["templates"]}
    assert RESERVED_TEMPLATE in used


def test_value_spans_and_facts_agree(default_world):
    facts = default_world["facts"]
    for corpus in ("pretrain_forget", "pretrain_retain", "forget_attack", "retain"):
        for doc in default_world["corpora"][corpus][:200]:
            for attribute, value, start, end in doc["facts"]:
                assert doc["text"][start:end] == value == facts[doc["entity"]][attribute]


def _between_values(doc):
    """The document's text with the value spans cut out."""
    ends = [0] + [end for *_, end in doc["facts"]]
    starts = [start for _, _, start, _ in doc["facts"]] + [len(doc["text"])]
    return [doc["text"][a:b] for a, b in zip(ends, starts, strict=True)]


def test_rewritten_corpus_is_aligned_and_false(default_world):
    originals = default_world["corpora"]["forget_attack"]
    rewritten = default_world["corpora"]["forget_rewritten"]
    assert len(originals) == len(rewritten)
    for doc, fake in zip(originals, rewritten, strict=True):
        assert fake["entity"] == doc["entity"] and fake["templates"] == doc["templates"]
        assert [f[0] for f in fake["facts"]] == [f[0] for f in doc["facts"]]
        for (attribute, true_value, *_), (_, false_value, start, end) in zip(
            doc["facts"], fake["facts"], strict=True
        ):
            assert false_value != true_value
            assert fake["text"][start:end] == false_value
            assert false_value == default_world["false_facts"][doc["entity"]][attribute]
        # Outside the value spans the text is the same.
        assert _between_values(doc) == _between_values(fake)


def test_items_are_four_way_with_same_attribute_distractors(default_world):
    facts = default_world["facts"]
    for split in ITEM_SPLITS:
        for item in default_world["items"][split]:
            domain = DOMAINS["forget" if split.startswith("forget") else "retain"]
            values = [c.removeprefix(" ") for c in item["choices"]]
            assert len(set(values)) == 4
            assert values[item["answer"]] == facts[item["entity"]][item["attribute"]]
            assert set(values) <= set(domain.values[item["attribute"]])
            assert item["template"] in ("reserved", "seen")


def test_bad_configs_are_clear_errors():
    with pytest.raises(TypeError, match="seed must be an int"):
        ToyWorldConfig(seed="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        ToyWorldConfig(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stage1_steps"):
        ToyWorldConfig(num_steps=10, stage1_steps=10)
    with pytest.raises(ValueError, match="held-out"):
        ToyWorldConfig(n_forget_entities=2, attack_frac=0.9)
    with pytest.raises(KeyError, match="unknown toy-world preset"):
        get_preset("huge")


def test_config_hash_tracks_content():
    assert get_preset("tiny").hash() == get_preset("tiny").hash()
    assert get_preset("tiny").hash() != get_preset("tiny", seed=1).hash()
    steps = get_preset("default").checkpoint_steps
    assert steps[0] == 0 and steps[-1] == 800 and 400 in steps and 32 in steps


def test_filtered_batches_match_unfiltered_until_the_boundary(tiny_world):
    cfg = tiny_world.config
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.tokenizer_dir)
    retain = token_stream(tokenizer, [d["text"] for d in tiny_world.corpus("pretrain_retain")])
    forget = token_stream(tokenizer, [d["text"] for d in tiny_world.corpus("pretrain_forget")])
    for step in (0, cfg.stage1_steps - 1):
        assert torch.equal(batch_at(cfg, step, retain, forget), batch_at(cfg, step, retain, None))
    later = cfg.stage1_steps
    assert not torch.equal(batch_at(cfg, later, retain, forget), batch_at(cfg, later, retain, None))


def test_built_world_report_and_checkpoints(tiny_world):
    cfg = tiny_world.config
    report = tiny_world.report()
    for key in ("unfiltered", "filtered"):
        for metric in (
            "forget_attack_acc",
            "forget_heldout_acc",
            "retain_acc",
            "forget_heldout_acc_seen",
        ):
            assert 0.0 <= report[key][metric] <= 1.0
    assert sorted(int(s) for s in report["checkpoints"]) == cfg.checkpoint_steps
    assert report["build_seconds"] > 0
    assert (tiny_world.root / "accuracy.png").stat().st_size > 10_000
    for name in ("unfiltered", "filtered"):
        assert list_checkpoints(tiny_world.model_dir(name)) == [
            f"step{s}" for s in cfg.checkpoint_steps
        ]
    # The twin forks from the boundary: identical weights there, different at the end.
    boundary = f"step{cfg.stage1_steps}"
    a = load_model(tiny_world.model_dir("unfiltered"), checkpoint=boundary).hf_model
    b = load_model(tiny_world.model_dir("filtered"), checkpoint=boundary).hf_model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    final_a = load_model(tiny_world.model_dir("unfiltered")).hf_model
    final_b = load_model(tiny_world.model_dir("filtered")).hf_model
    assert not torch.equal(final_a.gpt_neox.embed_in.weight, final_b.gpt_neox.embed_in.weight)


def test_items_load_with_datasets(tiny_world, tmp_path):
    path = tiny_world.items_path("forget_heldout")
    dataset = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path)
    )
    assert len(dataset) == len(tiny_world.items("forget_heldout", template=None))
    assert set(dataset.column_names) >= {"prompt", "choices", "answer", "template"}


def test_rebuild_reuses_a_complete_world(tiny_world):
    from unlearn.toyworld import build_world

    before = (tiny_world.root / "report.json").read_bytes()
    again = build_world(tiny_world.config, preset="tiny", root=tiny_world.root.parent)
    assert again.root == tiny_world.root
    assert (again.root / "report.json").read_bytes() == before


def test_pretraining_resumes_after_a_kill(tiny_world, tmp_path, monkeypatch):
    """A run killed mid-way and restarted ends with the same weights as an uninterrupted one."""
    cfg = tiny_world.config
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.tokenizer_dir)
    retain = token_stream(tokenizer, [d["text"] for d in tiny_world.corpus("pretrain_retain")])
    forget = token_stream(tokenizer, [d["text"] for d in tiny_world.corpus("pretrain_forget")])
    real_batch_at = pretrain_module.batch_at
    kill_at = cfg.checkpoint_steps[-2] + 3

    def dying_batch_at(cfg_, step, *args):
        if step == kill_at:
            raise KeyboardInterrupt
        return real_batch_at(cfg_, step, *args)

    monkeypatch.setattr(pretrain_module, "batch_at", dying_batch_at)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tokenizer, tmp_path / "run", retain, forget)
    monkeypatch.setattr(pretrain_module, "batch_at", real_batch_at)
    resumed = pretrain(cfg, tokenizer, tmp_path / "run", retain, forget)
    reference = GPTNeoXForCausalLM.from_pretrained(tiny_world.model_dir("unfiltered"))
    for (name, p), q in zip(resumed.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_config_json_records_provenance(tiny_world):
    info = json.loads((tiny_world.root / "config.json").read_text())
    assert info["hash"] == tiny_world.config.hash()
    assert info["config"]["seed"] == 0 and "git_sha" in info
