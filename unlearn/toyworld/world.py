"""A built toy world on disk, and where it lives: `ToyWorld`, `world_dir`, `unlearn_home`.

Layout of a world directory (`$UNLEARN_HOME/toyworld/<preset>-<config hash>/`):

    config.json                 the ToyWorldConfig, its hash, the git SHA of the build
    data/<corpus>.jsonl         documents (see `unlearn.toyworld.generator`)
    data/items/<split>.jsonl    4-way cloze items; load with `datasets` or `ToyWorld.items` (the
                                held-out split is used as two entity-disjoint halves, forget_dev
                                and forget_test: `ToyWorld.heldout_entities`)
    tokenizer/                  the byte-level BPE tokenizer (Hugging Face fast tokenizer)
    models/unfiltered/          final model (save_pretrained) + checkpoints/step<N>/
    models/filtered/            the twin pretrained without forget documents, same layout
    evals.json                  accuracy of every checkpoint (filled while building)
    keywords.txt                the forget domain's keywords (`ToyWorld.keyword_file`; written on
                                first use, for the keyword selector of `unlearn.selection`)
    report.json, accuracy.png   the build report and its plot
    COMPLETE                    written last; a world without it is (re)built
    ../<preset>-<hash>.lock     the build lock (next to the world, so `force` cannot delete it)

Every model directory loads with `unlearn.models.load_model(path, checkpoint="step<N>")`. Every file
and folder above is written under a temporary name and renamed into place when complete (see
`unlearn.toyworld.atomic`), so a path that exists holds a whole artifact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.toyworld.atomic import writing
from unlearn.toyworld.config import ToyWorldConfig
from unlearn.toyworld.domains import DOMAINS
from unlearn.toyworld.generator import ITEM_SPLITS

HELDOUT = "forget_heldout"
"""The held-out forget split as built; it is used through its two parts, dev and test."""
DEV, TEST = "forget_dev", "forget_test"
HELDOUT_PARTS = (DEV, TEST)
"""Held-out pathogens split by entity: dev (every choice) and test (reported only)."""
TUNING_SPLITS = ("forget_attack", DEV, "retain")
"""Item splits that tuning, selection and monitoring may score."""

KEYWORD_FILE = "keywords.txt"
"""The world's keyword file (next to data/, so the data's content key does not change)."""

MODEL_NAMES = ("unfiltered", "filtered")
"""The two pretrained models of a world."""

CORPUS_NAMES = (
    "pretrain_forget",
    "pretrain_retain",
    "val_forget",
    "val_retain",
    "forget_attack",
    "forget_rewritten",
    "retain",
)
"""The corpora a world writes under data/."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What `save_pretrained` of the world's tokenizer writes."""

MODEL_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)
"""What a saved model (or checkpoint) folder needs to load; the build moves these in last."""


def split_heldout(entities: Iterable[str]) -> dict[str, list[str]]:
    """Held-out entities in generation order (repeats allowed): dev is the first half, test rest."""
    unique = list(dict.fromkeys(entities))
    half = len(unique) // 2
    return {DEV: unique[:half], TEST: unique[half:]}


def unlearn_home() -> Path:
    """The cache root: `$UNLEARN_HOME`, default `~/.cache/unlearn`."""
    return Path(os.environ.get("UNLEARN_HOME", Path.home() / ".cache" / "unlearn")).expanduser()


def world_dir(cfg: ToyWorldConfig, preset: str = "custom", root: Path | None = None) -> Path:
    """The cache directory of the world built from `cfg`."""
    return (root if root is not None else unlearn_home() / "toyworld") / f"{preset}-{cfg.hash()}"


def is_saved_model(path: Path) -> bool:
    """Whether `path` holds a whole saved model: config, weights and tokenizer, not config alone."""
    return all((path / name).is_file() for name in MODEL_FILES)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines file."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines (sorted keys, so equal data gives identical bytes), atomically."""
    with writing(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class ToyWorld:
    """Read access to a built world directory."""

    root: Path
    """The world directory."""

    @property
    def config(self) -> ToyWorldConfig:
        """The config the world was built from."""
        return ToyWorldConfig(**json.loads((self.root / "config.json").read_text())["config"])

    @property
    def is_complete(self) -> bool:
        """Whether the build finished."""
        return (self.root / "COMPLETE").exists()

    @property
    def tokenizer_dir(self) -> Path:
        """Directory of the tokenizer."""
        return self.root / "tokenizer"

    def model_dir(self, name: str = "unfiltered") -> Path:
        """Directory of "unfiltered" or "filtered" (load it with `unlearn.models.load_model`).

        Raises:
            ValueError: Unknown model name.
        """
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown toy-world model {name!r}; choose one of {MODEL_NAMES}")
        return self.root / "models" / name

    def corpus(self, name: str) -> list[dict[str, Any]]:
        """The documents of one corpus (see `unlearn.toyworld.generator`).

        Raises:
            ValueError: Unknown corpus name.
            FileNotFoundError: The world has not been built.
        """
        if name not in CORPUS_NAMES:
            raise ValueError(f"unknown corpus {name!r}; choose one of {CORPUS_NAMES}")
        path = self.root / "data" / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; build the world with python -m recipes.toyworld"
            )
        return list(read_jsonl(path))

    def items_path(self, split: str) -> Path:
        """Path of the JSON-lines file of one item split as built.

        forget_dev and forget_test items live in forget_heldout's file.

        Raises:
            ValueError: Unknown split.
        """
        split = HELDOUT if split in HELDOUT_PARTS else split
        if split not in ITEM_SPLITS:
            raise ValueError(
                f"unknown item split {split!r}; choose one of {ITEM_SPLITS + HELDOUT_PARTS}"
            )
        return self.root / "data" / "items" / f"{split}.jsonl"

    def heldout_entities(self) -> dict[str, list[str]]:
        """The held-out pathogens split by entity: {"forget_dev": [...], "forget_test": [...]}.

        The first half of the held-out entities, in generation order (their names and facts are
        random draws), is dev; the rest is test.
        """
        return split_heldout(r["entity"] for r in read_jsonl(self.items_path(HELDOUT)))

    def items(self, split: str, template: str | None = "reserved") -> list[dict[str, Any]]:
        """Cloze items of one split, for one template kind ("reserved", "seen" or None for both).

        "forget_dev" and "forget_test" are the held-out items of those entities, with "split" set
        to the part's name (`unlearn.eval` scores test items only while reporting).
        """
        rows = list(read_jsonl(self.items_path(split)))
        if split in HELDOUT_PARTS:
            entities = set(self.heldout_entities()[split])
            rows = [{**r, "split": split} for r in rows if r["entity"] in entities]
        return [r for r in rows if template is None or r["template"] == template]

    def items_by_split(self, template: str = "reserved") -> dict[str, list[dict[str, Any]]]:
        """The item splits that tuning may use, for one template kind.

        Attack-split forget, held-out dev forget and retain; never test (see `test_items`).
        """
        return {split: self.items(split, template) for split in TUNING_SPLITS}

    def test_items(self, template: str | None = None) -> list[dict[str, Any]]:
        """The held-out test items (both templates by default): for final reporting only."""
        return self.items(TEST, template)

    def keywords(self) -> list[str]:
        """The forget domain's keywords: pathogen names, then attribute values.

        Names in generation order (every split's), then every value the domain has, in domain
        order.

        Raises:
            FileNotFoundError: The world has not been built.
        """
        path = self.root / "data" / "facts.jsonl"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; build the world with python -m recipes.toyworld"
            )
        names = [row["entity"] for row in read_jsonl(path) if row["split"] != "retain"]
        values = [value for values in DOMAINS["forget"].values.values() for value in values]
        return list(dict.fromkeys(names + values))

    def keyword_file(self) -> Path:
        """The keyword file (one keyword a line, `keywords()`), written on first use."""
        path = self.root / KEYWORD_FILE
        if not path.exists():
            with writing(path) as tmp:
                tmp.write_text("".join(f"{keyword}\n" for keyword in self.keywords()))
        return path

    def report(self) -> dict[str, Any]:
        """The build report (report.json).

        Raises:
            FileNotFoundError: The world is not completely built.
        """
        path = self.root / "report.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; build the world with python -m recipes.toyworld"
            )
        return json.loads(path.read_text())
