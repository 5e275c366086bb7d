"""What a real model knows of each candidate attribute of the real-facts world, and the choice.

For each direction (forget = elements, retain = countries; and the reverse) a real-facts world
with every candidate attribute of both domains (`unlearn.realfacts.domains`) is built and the
model's 4-way accuracy measured per attribute and split with the built-in scorer
(`unlearn.realfacts.measure_attributes`; forget_test inside `reporting()`). Per attribute, the
accuracy that the choice reads is the non-test one: the attack and dev entities when the domain is
forgotten, every entity when it is retained; a 95% Wilson interval comes with it. An attribute is
chosen when its interval's lower end is at least `MIN_LOWER` in both directions (well above the
25% of chance), and the forget domain is the one that gives more forget_test items of chosen
attributes (the reported number's sample). `tests/unlearn/test_realfacts.py` fails when the
domains' defaults (`Domain.default_attributes`, `RealFactsConfig.forget_domain`) and the committed
choice disagree.

Writes <results>.json (every accuracy with its per-item credit, the choice, config, command,
machine, git SHA) and <results>.md.

Commands:
    python -m benchmarks.realfacts                 # SmolLM2-135M, about 10 minutes on 2 CPU cores
    python -m benchmarks.realfacts --max_forget_entities 8 --max_retain_entities 8 \
        --results /tmp/realfacts_smoke                # smoke test
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simple_parsing import parse

from unlearn.eval import encode_credit
from unlearn.models import load_model, model_key
from unlearn.provenance import git_sha, machine, portable_paths
from unlearn.realfacts import DOMAINS, RealFactsConfig, build_realfacts, measure_attributes
from unlearn.realfacts.domains import package_versions

RESULTS = Path(__file__).resolve().parent / "results" / "realfacts_smollm2"

MIN_LOWER = 0.4
"""Lowest 95% interval end that counts as knowing an attribute well above chance (25%)."""

NON_TEST = {"forget": ("forget_attack", "forget_dev"), "retain": ("retain",)}
"""The splits a choice may read, by the domain's role."""


@dataclass
class Config:
    """Measure a model on every candidate attribute in both directions."""

    model: str = "smollm2-135m"
    """The model (a name `unlearn.models.load_model` takes)."""
    device: str = "cpu"
    """Device of the model."""
    seed: int = 0
    """Seed of the worlds."""
    max_forget_entities: int | None = None
    """Cap on forget entities (smoke runs)."""
    max_retain_entities: int | None = None
    """Cap on retain entities (smoke runs)."""
    root: str | None = None
    """Folder of worlds (default $UNLEARN_HOME/realfacts)."""
    results: str = str(RESULTS)
    """Output path stem: <results>.json and <results>.md."""


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (fractional successes allowed: tie credit)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def measure_direction(cfg: Config, loaded: Any, forget_domain: str) -> dict[str, Any]:
    """Build the all-attribute world of one direction and measure the model on it."""
    retain_domain = "elements" if forget_domain == "countries" else "countries"
    world_cfg = RealFactsConfig(
        forget_domain=forget_domain,  # type: ignore[arg-type]
        forget_attributes=list(DOMAINS[forget_domain].attributes),
        retain_attributes=list(DOMAINS[retain_domain].attributes),
        max_forget_entities=cfg.max_forget_entities,
        max_retain_entities=cfg.max_retain_entities,
        seed=cfg.seed,
    )
    world = build_realfacts(world_cfg, root=cfg.root)
    start = time.perf_counter()
    scores = measure_attributes(loaded.model, loaded.tokenizer, world)
    rows = []
    for role, domain in (("forget", forget_domain), ("retain", retain_domain)):
        for attribute in DOMAINS[domain].attributes:
            by_split = scores[attribute]
            credit = [c for split in NON_TEST[role] for c in by_split[split].correct]
            low, high = wilson(sum(credit), len(credit))
            rows.append(
                {
                    "domain": domain,
                    "role": role,
                    "attribute": attribute,
                    "non_test_acc": sum(credit) / len(credit),
                    "non_test_n": len(credit),
                    "non_test_ci95": [low, high],
                    "splits": {
                        split: {**result.as_dict(), "credit": encode_credit(result.correct)}
                        for split, result in by_split.items()
                    },
                }
            )
    return {
        "forget_domain": forget_domain,
        "world": portable_paths(str(world.root)),
        "world_config": world.info["config"],
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def choose(directions: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen attributes and forget domain.

    An attribute is chosen when its non-test interval's lower end clears `MIN_LOWER` in both
    directions; the forget domain is the one with more forget_test items of chosen attributes.
    """
    lowest: dict[tuple[str, str], float] = {}
    for direction in directions:
        for row in direction["rows"]:
            key = (row["domain"], row["attribute"])
            lowest[key] = min(lowest.get(key, 1.0), row["non_test_ci95"][0])
    chosen = {
        domain: [a for a in DOMAINS[domain].attributes if lowest[(domain, a)] >= MIN_LOWER]
        for domain in DOMAINS
    }
    test_items = {
        direction["forget_domain"]: sum(
            row["splits"]["forget_test"]["n"]
            for row in direction["rows"]
            if row["role"] == "forget" and row["attribute"] in chosen[row["domain"]]
        )
        for direction in directions
    }
    return {
        "attributes": chosen,
        "forget_domain": max(test_items, key=lambda domain: test_items[domain]),
        "forget_test_items": test_items,
        "min_lower": MIN_LOWER,
    }


def markdown(record: dict[str, Any]) -> str:
    """The results file's markdown: the table, the choice and why."""
    choice = record["choice"]
    lines = [
        f"# What {record['model']} knows of the real-facts world's candidate attributes",
        "",
        f"Command: `{record['command']}` at {record['git_sha'][:7]}; machine: "
        f"{record['machine']['platform']}, {record['machine']['cpu_threads']} CPU threads, "
        f"torch {record['machine']['torch']}; packages: {record['packages']}; "
        f"{record['seconds']:.0f} s.",
        "",
        "4-way multiple choice (chance 25%), built-in scorer (`unlearn.eval`: BOS first, ties "
        "share credit), one item per entity and attribute in the items' template. `non-test` is "
        "what the choice reads: attack and dev entities when the domain is forgotten, every entity "
        "when it is retained, with a 95% Wilson interval; forget_test was scored inside "
        "`reporting()` and is shown, not used.",
        "",
        "| forget domain | domain | attribute | prompt | non-test acc (95% CI) | n | "
        "attack | dev | test | retain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for direction in record["directions"]:
        for row in direction["rows"]:
            template = DOMAINS[row["domain"]].templates[row["attribute"]][0]
            low, high = row["non_test_ci95"]
            cells = [
                f"{100 * row['splits'][s]['acc']:.0f}" if s in row["splits"] else ""
                for s in ("forget_attack", "forget_dev", "forget_test", "retain")
            ]
            lines.append(
                f"| {direction['forget_domain']} | {row['domain']} | {row['attribute']} | "
                f"{template} | {100 * row['non_test_acc']:.1f} ({100 * low:.0f}-{100 * high:.0f})"
                f" | {row['non_test_n']} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        f"Choice (lower 95% end >= {100 * choice['min_lower']:.0f}% in both directions): "
        f"{choice['attributes']}; forget domain {choice['forget_domain']!r}, the direction with "
        f"more forget_test items of chosen attributes ({choice['forget_test_items']}).",
        "",
        "Why this rule: unlearning can only be seen on facts the model knows (forget accuracy that "
        "starts near chance cannot drop), and retain items detect collateral damage only where "
        "there is knowledge to damage. A 95% lower end 15 points above chance keeps the "
        "attributes whose knowledge a world's split sizes can measure; it reads attack, dev and "
        "retain items only, so no choice depends on forget_test. The forget domain is the one "
        "whose reported number (mean forget_test accuracy) rests on more items.",
        "",
    ]
    return "\n".join(lines)


def main(cfg: Config) -> dict[str, Any]:
    """Measure both directions, choose, write <results>.json and .md; return the record."""
    start = time.perf_counter()
    loaded = load_model(cfg.model, device=cfg.device)
    directions = [measure_direction(cfg, loaded, domain) for domain in ("elements", "countries")]
    record = {
        "model": cfg.model,
        "model_key": model_key(cfg.model),
        "command": ("python -m benchmarks.realfacts " + shlex.join(sys.argv[1:])).strip(),
        "config": asdict(cfg),
        "git_sha": git_sha(),
        "machine": machine(),
        "packages": package_versions(),
        "directions": directions,
        "choice": choose(directions),
        "seconds": time.perf_counter() - start,
    }
    stem = Path(cfg.results).expanduser()
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(portable_paths(record), indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main(parse(Config))
