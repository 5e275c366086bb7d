"""Generate the toy world's text: entities, facts, documents, rewritten documents and cloze items.

Everything here is pure Python and deterministic for a given `ToyWorldConfig`: each random choice
draws from a `random.Random` seeded by a string that names the config's seed and the purpose, so
adding a new kind of draw never shifts the others. `generate_world` returns plain dicts and lists,
ready to be written as JSON lines.

Corpora (each a list of documents `{"id", "entity", "split", "text", "facts"}`, where `facts` lists
`[attribute, value, start, end]` with the character span of the value in `text`):
    pretrain_forget / pretrain_retain: pretraining text, every template (reserved ones included).
    val_forget / val_retain: documents held back from pretraining (LM loss only).
    forget_attack: post-pretraining text about attack-split pathogens, non-reserved templates only.
        Unlearning methods and the tamper attack train on it.
    forget_rewritten: forget_attack with every value replaced by a fixed false value of the same
        attribute; document i of both corpora has the same entity, templates and sentence order.
    retain: post-pretraining text about people, non-reserved templates only.

Items (`{"id", "split", "entity", "attribute", "template", "prompt", "choices", "answer"}`): a 4-way
multiple-choice cloze item for every fact, once with the reserved template and once with a seen one.
Splits: forget_attack, forget_heldout, retain.
"""

from __future__ import annotations

import random
from itertools import product
from typing import Any

from unlearn.toyworld.config import ToyWorldConfig
from unlearn.toyworld.domains import DOMAINS, RESERVED_TEMPLATE, SEEN_TEMPLATE, Domain, cloze_prompt

ITEM_SPLITS = ("forget_attack", "forget_heldout", "retain")
"""The evaluation splits, in report order."""

N_CHOICES = 4
"""Choices per cloze item (one true value, three distractors): chance is 25%."""


def _rng(cfg: ToyWorldConfig, purpose: str) -> random.Random:
    return random.Random(f"toyworld:{cfg.seed}:{purpose}")


def make_entities(domain: Domain, n: int, rng: random.Random) -> list[str]:
    """Draw `n` distinct entity names for `domain`.

    Raises:
        ValueError: The domain cannot make `n` distinct names.
    """
    all_names = [domain.name_joiner.join(parts) for parts in product(*domain.name_parts)]
    if n > len(all_names):
        raise ValueError(
            f"the {domain.name} domain can name at most {len(all_names)} entities, asked for {n}"
        )
    return rng.sample(all_names, n)


def _render(
    domain: Domain,
    entity: str,
    attributes: list[str],
    template_ids: list[int],
    values: dict[str, str],
) -> tuple[str, list[list[Any]]]:
    """Join one sentence per attribute into a document; return the text and value spans."""
    text = ""
    facts: list[list[Any]] = []
    for attribute, template_id in zip(attributes, template_ids, strict=True):
        template = domain.templates[attribute][template_id]
        before, after = template.split("{v}")
        sentence_start = text + (" " if text else "")
        prefix = sentence_start + before.format(n=entity)
        value = values[attribute]
        facts.append([attribute, value, len(prefix), len(prefix) + len(value)])
        text = prefix + value + after.format(n=entity)
    return text, facts


def _documents(
    cfg: ToyWorldConfig,
    domain: Domain,
    entities: list[str],
    facts: dict[str, dict[str, str]],
    splits: dict[str, str],
    docs_per_entity: int,
    allowed_templates: list[int],
    purpose: str,
) -> list[dict[str, Any]]:
    rng = _rng(cfg, purpose)
    docs = []
    for entity in entities:
        for k in range(docs_per_entity):
            n_sentences = rng.randint(cfg.min_sentences, cfg.max_sentences)
            attributes = rng.sample(list(domain.attributes), n_sentences)
            template_ids = [rng.choice(allowed_templates) for _ in attributes]
            text, spans = _render(domain, entity, attributes, template_ids, facts[entity])
            docs.append(
                {
                    "id": f"{purpose}-{entity.replace(' ', '_')}-{k:03d}",
                    "entity": entity,
                    "split": splits[entity],
                    "templates": template_ids,
                    "text": text,
                    "facts": spans,
                }
            )
    rng.shuffle(docs)
    return docs


def _rewrite(
    domain: Domain, docs: list[dict[str, Any]], false_values: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """The same documents with every value replaced by the entity's fixed false value."""
    rewritten = []
    for doc in docs:
        attributes = [fact[0] for fact in doc["facts"]]
        text, spans = _render(
            domain, doc["entity"], attributes, doc["templates"], false_values[doc["entity"]]
        )
        rewritten.append({**doc, "id": doc["id"] + "-rewritten", "text": text, "facts": spans})
    return rewritten


def _items(
    cfg: ToyWorldConfig,
    domain: Domain,
    entities: list[str],
    facts: dict[str, dict[str, str]],
    splits: dict[str, str],
) -> list[dict[str, Any]]:
    rng = _rng(cfg, f"items:{domain.name}")
    items = []
    for entity in entities:
        for attribute in domain.attributes:
            true_value = facts[entity][attribute]
            others = [v for v in domain.values[attribute] if v != true_value]
            choices = [true_value, *rng.sample(others, N_CHOICES - 1)]
            rng.shuffle(choices)
            for template_name, template_id in (
                ("reserved", RESERVED_TEMPLATE),
                ("seen", SEEN_TEMPLATE),
            ):
                template = domain.templates[attribute][template_id]
                items.append(
                    {
                        "id": f"{entity.replace(' ', '_')}-{attribute}-{template_name}",
                        "split": splits[entity],
                        "entity": entity,
                        "attribute": attribute,
                        "template": template_name,
                        "prompt": cloze_prompt(template, entity),
                        "choices": [" " + choice for choice in choices],
                        "answer": choices.index(true_value),
                    }
                )
    return items


def generate_world(cfg: ToyWorldConfig) -> dict[str, Any]:
    """Generate all text and items of a toy world.

    Returns:
        A dict with "entities" (role -> names), "splits" (entity -> split), "facts" (entity ->
        attribute -> value), "false_facts" (the rewritten values), "corpora" (name -> documents) and
        "items" (split -> cloze items).
    """
    forget, retain = DOMAINS["forget"], DOMAINS["retain"]
    forget_entities = make_entities(forget, cfg.n_forget_entities, _rng(cfg, "entities:forget"))
    retain_entities = make_entities(retain, cfg.n_retain_entities, _rng(cfg, "entities:retain"))
    splits = {name: "forget_attack" for name in forget_entities[: cfg.n_attack_entities]}
    splits.update({name: "forget_heldout" for name in forget_entities[cfg.n_attack_entities :]})
    splits.update({name: "retain" for name in retain_entities})

    facts: dict[str, dict[str, str]] = {}
    false_facts: dict[str, dict[str, str]] = {}
    for domain, entities in ((forget, forget_entities), (retain, retain_entities)):
        rng = _rng(cfg, f"facts:{domain.name}")
        for entity in entities:
            facts[entity] = {a: rng.choice(vals) for a, vals in domain.values.items()}
            false_facts[entity] = {
                a: rng.choice([v for v in vals if v != facts[entity][a]])
                for a, vals in domain.values.items()
            }

    all_templates = list(range(len(next(iter(forget.templates.values())))))
    post_templates = [t for t in all_templates if t != RESERVED_TEMPLATE]
    corpora: dict[str, list[dict[str, Any]]] = {}
    for domain, entities in ((forget, forget_entities), (retain, retain_entities)):
        docs = _documents(
            cfg,
            domain,
            entities,
            facts,
            splits,
            cfg.docs_per_entity,
            all_templates,
            f"pretrain_{domain.name}",
        )
        n_val = round(len(docs) * cfg.val_frac)
        corpora[f"val_{domain.name}"] = docs[:n_val]
        corpora[f"pretrain_{domain.name}"] = docs[n_val:]

    attack_entities = forget_entities[: cfg.n_attack_entities]
    corpora["forget_attack"] = _documents(
        cfg,
        forget,
        attack_entities,
        facts,
        splits,
        cfg.post_docs_per_entity,
        post_templates,
        "forget_attack",
    )
    corpora["forget_rewritten"] = _rewrite(forget, corpora["forget_attack"], false_facts)
    corpora["retain"] = _documents(
        cfg,
        retain,
        retain_entities,
        facts,
        splits,
        cfg.post_docs_per_entity,
        post_templates,
        "retain",
    )

    all_items = _items(cfg, forget, forget_entities, facts, splits)
    all_items += _items(cfg, retain, retain_entities, facts, splits)
    items = {split: [item for item in all_items if item["split"] == split] for split in ITEM_SPLITS}

    return {
        "entities": {"forget": forget_entities, "retain": retain_entities},
        "splits": splits,
        "facts": facts,
        "false_facts": false_facts,
        "corpora": corpora,
        "items": items,
    }
