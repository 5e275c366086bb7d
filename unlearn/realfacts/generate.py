"""Generate a real-facts world: entity splits, documents, rewritten false twins and 4-way items.

Pure Python and deterministic for a `RealFactsConfig` (and the installed package data): every
random choice draws from a `random.Random` seeded by a string naming the config's seed and the
purpose, and the draws about one entity (its documents, false values, distractors) are seeded by
that entity's name, so a capped world (`max_forget_entities`) asks the same items and writes the
same documents about the entities it keeps (in its own, smaller splits).

Splits by entity, as in the toy world: the forget domain's entities are shuffled and cut into
forget_test (items for final reporting only), forget_dev (items for tuning) and forget_attack (the
rest: documents for unlearning and the tamper attack, and items); every retain-domain entity is in
retain (documents and items). Dev and test entities appear in no document.

Corpora (documents `{"id", "entity", "domain", "split", "templates", "text", "facts"}`, where
`facts` lists `[attribute, value, start, end]`, the character span of the value in `text`, as the
toy world writes them; each document is one to `max_sentences` sentences about one entity, each
sentence a different attribute in a template other than the items'):
    forget_attack: about the attack entities; unlearning methods and the tamper attack train on it.
    forget_rewritten: forget_attack with every value replaced by the entity's fixed false value of
        the same attribute (`false_pools`: a value some other non-held-out entity holds, never one
        of the entity's own); line i is the twin of line i, with the
        same templates, and its id is line i's id plus "-rewritten" (what rewritten transfer
        checks).
    retain: about the retain entities.

Items (`{"id", "split", "entity", "domain", "attribute", "template", "prompt", "choices",
"answer"}`): one 4-way cloze item per fact in the items' template; the three distractors are
distinct values of the same attribute held by other entities, each choice starting with a space.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from unlearn.realfacts.domains import (
    DOMAINS,
    ITEMS_TEMPLATE,
    DomainName,
    Entity,
    cloze_prompt,
    fill,
    load_entities,
)

FORGET_SPLITS = ("forget_attack", "forget_dev", "forget_test")
"""The forget domain's entity splits."""

ITEM_SPLITS = (*FORGET_SPLITS, "retain")
"""Every item split, one file each."""

CORPUS_NAMES = ("forget_attack", "forget_rewritten", "retain")
"""The document corpora a world writes."""

N_CHOICES = 4
"""Choices per item (one true value, three distractors): chance is 25%."""

GENERATOR_VERSION = 1
"""Bumped whenever generation changes what a given config builds (part of the world's key)."""


@dataclass(frozen=True)
class RealFactsConfig:
    """What a real-facts world contains."""

    forget_domain: DomainName = "countries"
    """The domain to forget; the other one is retained."""
    forget_attributes: list[str] | None = None
    """The forget domain's attributes (default: its measured choice, `default_attributes`)."""
    retain_attributes: list[str] | None = None
    """The retain domain's attributes (default: its measured choice)."""
    max_atomic_number: int = 92
    """Heaviest element kept (92: hydrogen through uranium)."""
    min_population: int = 1_000_000
    """Smallest country kept (people)."""
    dev_frac: float = 0.25
    """Share of forget entities whose items are for tuning (forget_dev)."""
    test_frac: float = 0.25
    """Share of forget entities whose items are for final reporting (forget_test)."""
    docs_per_entity: int = 4
    """Documents per attack or retain entity."""
    max_sentences: int = 2
    """Most sentences (facts) in one document (at least one; at most one per attribute)."""
    max_forget_entities: int | None = None
    """Keep only this many forget entities (after the seeded shuffle; None: all), for smoke runs."""
    max_retain_entities: int | None = None
    """Keep only this many retain entities (None: all)."""
    seed: int = 0
    """Seed of the splits, documents, false values and distractors."""

    def __post_init__(self) -> None:
        if self.forget_domain not in DOMAINS:
            raise ValueError(
                f"unknown forget domain {self.forget_domain!r}; choose one of {list(DOMAINS)}"
            )
        DOMAINS[self.forget_domain].check_attributes(self.attributes("forget"), "forget_attributes")
        DOMAINS[self.retain_domain].check_attributes(self.attributes("retain"), "retain_attributes")
        if not (self.dev_frac > 0 and self.test_frac > 0 and self.dev_frac + self.test_frac < 1):
            raise ValueError(
                f"dev_frac {self.dev_frac} and test_frac {self.test_frac} must be positive and sum "
                "to less than 1 (the rest of the forget entities are the attack split)"
            )
        # One forget entity per split at least.
        minimums = {
            "docs_per_entity": 1,
            "max_sentences": 1,
            "max_forget_entities": 3,
            "max_retain_entities": 1,
        }
        too_small = [
            f"{name} must be >= {least}, got {getattr(self, name)}"
            for name, least in minimums.items()
            if getattr(self, name) is not None and getattr(self, name) < least
        ]
        if too_small:
            raise ValueError("; ".join(too_small))

    @property
    def retain_domain(self) -> DomainName:
        """The domain that is not forgotten."""
        return "elements" if self.forget_domain == "countries" else "countries"

    def domain(self, role: str) -> DomainName:
        """The domain of a role ("forget" or "retain")."""
        return self.forget_domain if role == "forget" else self.retain_domain

    def attributes(self, role: str) -> tuple[str, ...]:
        """The attributes of a role ("forget" or "retain"), defaults resolved."""
        chosen = self.forget_attributes if role == "forget" else self.retain_attributes
        if chosen is None:
            return DOMAINS[self.domain(role)].default_attributes
        return tuple(chosen)

    def resolved(self) -> dict[str, Any]:
        """The config as a dict with the default attributes filled in (what a world is keyed by)."""
        return {
            **asdict(self),
            "forget_attributes": list(self.attributes("forget")),
            "retain_attributes": list(self.attributes("retain")),
        }


def _rng(cfg: RealFactsConfig, *purpose: str) -> random.Random:
    return random.Random(":".join(("realfacts", str(cfg.seed), *purpose)))


def split_entities(cfg: RealFactsConfig, entities: list[Entity]) -> dict[str, list[Entity]]:
    """The forget entities by split: a seeded shuffle, cut into test, dev and the attack rest.

    Raises:
        ValueError: Too few entities for one per split.
    """
    shuffled = list(entities)
    _rng(cfg, "split").shuffle(shuffled)
    shuffled = shuffled[: cfg.max_forget_entities]
    n = len(shuffled)
    n_test, n_dev = max(1, round(cfg.test_frac * n)), max(1, round(cfg.dev_frac * n))
    if n - n_test - n_dev < 1:
        raise ValueError(f"{n} forget entities cannot fill the attack, dev and test splits")
    return {
        "forget_test": shuffled[:n_test],
        "forget_dev": shuffled[n_test : n_test + n_dev],
        "forget_attack": shuffled[n_test + n_dev :],
    }


def value_pools(entities: list[Entity], attributes: tuple[str, ...]) -> dict[str, list[str]]:
    """Each attribute's distinct values over `entities`, sorted (what distractors come from)."""
    return {a: sorted({e.values[a] for e in entities}) for a in attributes}


def false_pools(
    entities: list[Entity], held_out: list[Entity], attributes: tuple[str, ...]
) -> dict[str, list[str]]:
    """The values a false twin may state, per attribute: those some non-held-out entity holds.

    A value that only dev or test entities hold is left out (a twin saying "Burkina Faso's capital
    is Singapore" would train on a held-out country's capital); values shared with attack or
    capped-out entities ("Euro", "Asia") stay.

    Args:
        entities: Every entity of the domain (the cap aside).
        held_out: The dev and test entities.
        attributes: The attributes.
    """
    held_out_names = {e.name for e in held_out}
    return {
        attribute: sorted({e.values[attribute] for e in entities if e.name not in held_out_names})
        for attribute in attributes
    }


def false_values(
    cfg: RealFactsConfig, domain: str, entity: Entity, pools: dict[str, list[str]]
) -> dict[str, str]:
    """The entity's fixed false value per attribute from `pools`, never one of its own values.

    Raises:
        ValueError: An attribute with no value to swap in.
    """
    own = set(entity.values.values())
    chosen = {}
    for attribute, pool in pools.items():
        others = [v for v in pool if v not in own]
        if not others:
            raise ValueError(f"the {domain} attribute {attribute!r} has no false value to use")
        chosen[attribute] = _rng(cfg, "false", domain, attribute, entity.name).choice(others)
    return chosen


def render(
    domain: str, entity: str, attributes: list[str], templates: list[int], values: dict[str, str]
) -> tuple[str, list[list[Any]]]:
    """One sentence per (attribute, template) joined into a text, and the values' spans.

    Returns:
        The text and its facts, `[attribute, value, start, end]` per sentence.
    """
    text, facts = "", []
    for attribute, template_id in zip(attributes, templates, strict=True):
        before, after = DOMAINS[domain].templates[attribute][template_id].split("{v}")
        prefix = text + (" " if text else "") + fill(before, entity)
        value = values[attribute]
        facts.append([attribute, value, len(prefix), len(prefix) + len(value)])
        text = prefix + value + fill(after, entity)
    return text, facts


def documents(
    cfg: RealFactsConfig,
    domain: str,
    entities: list[Entity],
    attributes: tuple[str, ...],
    split: str,
) -> list[dict[str, Any]]:
    """`docs_per_entity` documents per entity in document templates, shuffled (seeded)."""
    n_templates = len(DOMAINS[domain].templates[attributes[0]])
    doc_templates = [t for t in range(n_templates) if t != ITEMS_TEMPLATE]
    docs = []
    for entity in entities:
        rng = _rng(cfg, "documents", domain, entity.name)
        for k in range(cfg.docs_per_entity):
            n_sentences = rng.randint(1, min(cfg.max_sentences, len(attributes)))
            chosen = rng.sample(list(attributes), n_sentences)
            templates = [rng.choice(doc_templates) for _ in chosen]
            text, facts = render(domain, entity.name, chosen, templates, entity.values)
            docs.append(
                {
                    "id": f"{domain}-{entity.slug}-{k:02d}",
                    "entity": entity.name,
                    "domain": domain,
                    "split": split,
                    "templates": templates,
                    "text": text,
                    "facts": facts,
                }
            )
    _rng(cfg, "order", split).shuffle(docs)
    return docs


def rewrite(docs: list[dict[str, Any]], false: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """The documents with every value replaced by its entity's false value, line for line."""
    twins = []
    for doc in docs:
        attributes = [fact[0] for fact in doc["facts"]]
        text, facts = render(
            doc["domain"], doc["entity"], attributes, doc["templates"], false[doc["entity"]]
        )
        twins.append({**doc, "id": doc["id"] + "-rewritten", "text": text, "facts": facts})
    return twins


def items(
    cfg: RealFactsConfig,
    domain: str,
    entities: list[Entity],
    attributes: tuple[str, ...],
    pools: dict[str, list[str]],
    split: str,
) -> list[dict[str, Any]]:
    """One 4-way item per (entity, attribute) in the items' template, distractors seeded.

    Raises:
        ValueError: An attribute with fewer than 4 distinct values.
    """
    rows = []
    for entity in entities:
        for attribute in attributes:
            true_value = entity.values[attribute]
            others = [v for v in pools[attribute] if v != true_value]
            if len(others) < N_CHOICES - 1:
                raise ValueError(
                    f"the {domain} attribute {attribute!r} has {len(others) + 1} distinct values; "
                    f"a {N_CHOICES}-way item needs {N_CHOICES}"
                )
            rng = _rng(cfg, "items", domain, attribute, entity.name)
            choices = [true_value, *rng.sample(others, N_CHOICES - 1)]
            rng.shuffle(choices)
            template = DOMAINS[domain].templates[attribute][ITEMS_TEMPLATE]
            rows.append(
                {
                    "id": f"{domain}-{entity.slug}-{attribute}",
                    "split": split,
                    "entity": entity.name,
                    "domain": domain,
                    "attribute": attribute,
                    "template": "reserved",
                    "prompt": cloze_prompt(template, entity.name),
                    "choices": [" " + choice for choice in choices],
                    "answer": choices.index(true_value),
                }
            )
    return rows


def generate_realfacts(cfg: RealFactsConfig) -> dict[str, Any]:
    """Generate all documents and items of a real-facts world.

    Returns:
        A dict with "facts" (one row per entity: name, domain, split, true values, and an attack
        entity's false values), "corpora" (name -> documents) and "items" (split -> items).

    Raises:
        ImportError: A domain's package is not installed (the message says what to install).
        ValueError: Too few entities or values for the config.
    """
    filters = {"max_atomic_number": cfg.max_atomic_number, "min_population": cfg.min_population}
    forget_entities = load_entities(cfg.forget_domain, cfg.attributes("forget"), **filters)
    retain_entities = load_entities(cfg.retain_domain, cfg.attributes("retain"), **filters)
    by_split = split_entities(cfg, forget_entities)
    _rng(cfg, "retain").shuffle(retain_entities)
    by_split["retain"] = retain_entities[: cfg.max_retain_entities]
    # Distractors come from every kept entity's values (not only a split's): the same items at
    # any cap.
    pools = {
        "forget": value_pools(forget_entities, cfg.attributes("forget")),
        "retain": value_pools(retain_entities, cfg.attributes("retain")),
    }
    held_out = by_split["forget_dev"] + by_split["forget_test"]
    twin_pools = false_pools(forget_entities, held_out, cfg.attributes("forget"))
    false = {
        entity.name: false_values(cfg, cfg.forget_domain, entity, twin_pools)
        for entity in by_split["forget_attack"]
    }

    facts, corpora, all_items = [], {}, {}
    for split in ITEM_SPLITS:
        role = "retain" if split == "retain" else "forget"
        domain, attributes = cfg.domain(role), cfg.attributes(role)
        facts += [
            {
                "entity": entity.name,
                "domain": domain,
                "split": split,
                "values": {a: entity.values[a] for a in attributes},
                **({"false_values": false[entity.name]} if entity.name in false else {}),
            }
            for entity in by_split[split]
        ]
        all_items[split] = items(cfg, domain, by_split[split], attributes, pools[role], split)
        if split in CORPUS_NAMES:
            corpora[split] = documents(cfg, domain, by_split[split], attributes, split)
    corpora["forget_rewritten"] = rewrite(corpora["forget_attack"], false)
    return {"facts": facts, "corpora": corpora, "items": all_items}
