"""MAGIC's per-token scores on disk: a score file per model, rows, targets and settings; a cache.

`TokenScores` holds, for each target loss ("forget_dev": the forget dev items' answers; "retain":
the retain items'), one metagradient per token of the forget rows and of the retain rows
(`unlearn.selection.magic`), with the documents keys of the rows it was computed for, so it is
never applied to other rows (`TokenScores.check`). `save_token_scores` and `load_token_scores`
write and read it as one safetensors file. `cached_token_scores` computes it, or reads it back,
under `$UNLEARN_HOME/magic_scores/magic-<key>/`, the key hashing the settings, the model's
parameters, the rows' token ids, the target items and the library code (`unlearn.keys`), like the
selection cache (`unlearn.selection.cache`).

Usage:
    >>> scores, cached = cached_token_scores(model, tokenizer, forget_docs, retain_docs,
    ...                                      dev_items, retain_items, max_len=128,
    ...                                      settings=MagicSettings())
    >>> scores.check(forget_rows, retain_rows, "the cache")
    >>> scores.rows("forget_dev", "retain")   # one tensor per retain row
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn

from unlearn.data import TokenizedDocuments, tokenize_documents
from unlearn.keys import result_key, settings_key
from unlearn.selection.magic import MagicSettings, answer_rows, metagradients
from unlearn.selection.masks import documents_key, read_safetensors
from unlearn.toyworld.world import unlearn_home

SCORES_FILE = "scores.safetensors"
"""The name of a score file in a folder."""
KEY_FILE = "key.json"
FORGET_DEV, RETAIN_TARGET = "forget_dev", "retain"
"""Target names: the forget dev items' answer loss, the retain items' answer loss."""


@dataclass(frozen=True)
class TokenScores:
    """Per-token scores of the forget rows and the retain rows, for each target."""

    scores: dict[str, Float[Tensor, " token"]]
    """Per target: one score per token of the forget rows, then of the retain rows (row order)."""
    forget_lengths: list[int]
    """Tokens of each forget row."""
    retain_lengths: list[int]
    """Tokens of each retain row."""
    forget_key: str
    """`documents_key` of the forget rows."""
    retain_key: str
    """`documents_key` of the retain rows."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What made them: settings, losses, timings (JSON-ready)."""

    def rows(self, target: str, side: Literal["forget", "retain"]) -> list[Tensor]:
        """The target's scores of one side, one tensor per row.

        Raises:
            ValueError: An unknown target.
        """
        if target not in self.scores:
            raise ValueError(f"no scores for target {target!r}; there are {sorted(self.scores)}")
        n_forget = sum(self.forget_lengths)
        flat = self.scores[target]
        if side == "forget":
            return list(torch.split(flat[:n_forget], self.forget_lengths))
        return list(torch.split(flat[n_forget:], self.retain_lengths))

    def check(self, forget: TokenizedDocuments, retain: TokenizedDocuments, source: str) -> None:
        """Raise ValueError unless the scores were computed for exactly these rows."""
        for side, docs, key in (
            ("forget", forget, self.forget_key),
            ("retain", retain, self.retain_key),
        ):
            if key != documents_key(docs):
                raise ValueError(
                    f"the token scores from {source} were computed for other {side} rows (their "
                    "token ids differ): compute them for this run's data (same documents, "
                    "--max_forget_docs and --max_len), or leave --scores_path unset"
                )


def save_token_scores(scores: TokenScores, path: str | os.PathLike[str]) -> Path:
    """Write a score file (a folder gets `scores.safetensors` inside); the file's path."""
    file = Path(path)
    if file.suffix != ".safetensors":
        file = file / SCORES_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"scores.{name}": s.double().contiguous() for name, s in scores.scores.items()}
    tensors["forget_lengths"] = torch.tensor(scores.forget_lengths, dtype=torch.long)
    tensors["retain_lengths"] = torch.tensor(scores.retain_lengths, dtype=torch.long)
    metadata = {
        "forget": scores.forget_key,
        "retain": scores.retain_key,
        "meta": json.dumps(scores.meta, sort_keys=True),
    }
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(file)
    return file


def load_token_scores(path: str | os.PathLike[str]) -> TokenScores:
    """Read a score file, or the `scores.safetensors` in a folder.

    Raises:
        FileNotFoundError: No score file there.
        ValueError: A file that is not a score file.
    """
    file, tensors, metadata = read_safetensors(
        path, SCORES_FILE, "token score", "unlearn.selection.magic_scores"
    )
    if {"forget_lengths", "retain_lengths"} - tensors.keys() or {"forget", "retain"} - set(
        metadata
    ):
        raise ValueError(f"{file} is not a token score file: it lacks row lengths or row keys")
    scores = {k.removeprefix("scores."): v for k, v in tensors.items() if k.startswith("scores.")}
    lengths = [tensors["forget_lengths"].tolist(), tensors["retain_lengths"].tolist()]
    if any(len(s) != sum(map(sum, lengths)) for s in scores.values()):
        raise ValueError(f"{file} is corrupt: its row lengths do not add up to its scores")
    return TokenScores(
        scores, *lengths, metadata["forget"], metadata["retain"], json.loads(metadata["meta"])
    )


def parameters_key(model: nn.Module) -> str:
    """A short hash of a model's parameters (names, dtypes, shapes and values)."""
    hasher = hashlib.sha256()
    for name, param in model.named_parameters():
        hasher.update(f"{name}:{param.dtype}:{tuple(param.shape)}".encode())
        hasher.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


def cache_root() -> Path:
    """Where cached scores live: `$UNLEARN_HOME/magic_scores`."""
    return unlearn_home() / "magic_scores"


def cached_token_scores(
    model: nn.Module,
    tokenizer: Any,
    forget_docs: Sequence[Mapping[str, Any]],
    retain_docs: Sequence[Mapping[str, Any]],
    dev_items: Sequence[Mapping[str, Any]],
    retain_items: Sequence[Mapping[str, Any]],
    max_len: int,
    settings: MagicSettings,
    root: Path | None = None,
) -> tuple[TokenScores, bool]:
    """MAGIC scores of every forget and retain token, from the cache or computed (and cached).

    Args:
        model: The model to attribute (left as it was).
        tokenizer: Its tokenizer.
        forget_docs: Forget documents (tokenized as training rows, `max_len`).
        retain_docs: Retain documents.
        dev_items: Forget dev items: the "forget_dev" target (never test items).
        retain_items: Retain items: the "retain" target (none: no retain target).
        max_len: Row length of the training rows.
        settings: The attributed run.
        root: The cache folder (default `cache_root()`).

    Returns:
        The scores (their `meta` holds the settings, key, losses and timings), and whether they
        came from the cache.

    Raises:
        ValueError: No dev items or a test item among them (`answer_rows`).
    """
    forget = tokenize_documents(tokenizer, forget_docs, max_len)
    retain = tokenize_documents(tokenizer, retain_docs, max_len)
    key = result_key(
        {"scores": "magic", "settings": asdict(settings)},
        {
            "model": parameters_key(model),
            "forget": documents_key(forget),
            "retain": documents_key(retain),
            "dev_items": settings_key(list(dev_items)),
            "retain_items": settings_key(list(retain_items)),
        },
    )
    folder = (root or cache_root()) / f"magic-{key['key']}"
    if (folder / KEY_FILE).is_file() and json.loads((folder / KEY_FILE).read_text()) == key:
        return load_token_scores(folder), True
    targets = {FORGET_DEV: answer_rows(tokenizer, dev_items, max_len)}
    if retain_items:
        targets[RETAIN_TARGET] = answer_rows(tokenizer, retain_items, max_len)
    start = time.perf_counter()
    result = metagradients(model, forget, retain, targets, settings)
    meta = {
        "settings": asdict(settings),
        "key": key["key"],
        "losses": result.losses,
        "initial_losses": result.initial_losses,
        "info": result.info,
        "seconds": time.perf_counter() - start,
    }
    scores = TokenScores(
        result.scores,
        [len(row) for row in forget.ids],
        [len(row) for row in retain.ids],
        documents_key(forget),
        documents_key(retain),
        meta,
    )
    save_token_scores(scores, folder)
    tmp = folder / (KEY_FILE + ".tmp")
    tmp.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / KEY_FILE)
    return scores, False
