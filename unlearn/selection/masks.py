"""Token-mask files, and how good a mask is against the ground-truth value tokens.

A mask file (`mask.safetensors`) holds one bool per token of every forget row, flat ("mask") with
each row's length ("lengths"), and in its metadata the key of the rows it was made for (a hash of
their token ids: same documents, tokenizer and row length) and what made it (selector, settings,
what the selector chose). `load_token_mask` reads one (a file, or a folder holding one);
`TokenMask.rows_for` checks it against the rows a run tokenized and says how to fix a mismatch.

Usage:
    >>> save_token_mask(TokenMask(masks, documents_key(forget), {"selector": "keywords"}), out)
    >>> forget = forget.with_token_masks(load_token_mask(out).rows_for(forget, str(out)))
    >>> mask_quality(masks, forget.value_masks).f1
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from unlearn.data import TokenizedDocuments
from unlearn.keys import settings_key

MASK_FILE = "mask.safetensors"
"""The name of a mask file in a folder (what `python -m recipes.select_tokens` writes)."""


def documents_key(docs: TokenizedDocuments) -> str:
    """Key of tokenized rows: a hash of every row's token ids."""
    return settings_key(docs.ids)


@dataclass(frozen=True)
class TokenMask:
    """A per-token mask over some tokenized documents."""

    rows: list[list[bool]]
    """One bool per token of every row."""
    documents: str
    """`documents_key` of the rows it was made for."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What made it: selector, settings, what the selector chose (JSON-ready)."""

    def rows_for(self, docs: TokenizedDocuments, source: str) -> list[list[bool]]:
        """The mask's rows, checked to belong to `docs`.

        Args:
            docs: The rows the mask is to be used with.
            source: Where the mask came from, for messages (e.g. its path).

        Raises:
            ValueError: Another number of rows, rows of other lengths, or other token ids.
        """
        lengths = [len(row) for row in docs.ids]
        if len(self.rows) != len(lengths) or [len(r) for r in self.rows] != lengths:
            differ = sum(len(a) != b for a, b in zip(self.rows, lengths, strict=False))
            raise ValueError(
                f"token mask {source} has {len(self.rows)} rows ({sum(map(len, self.rows))} "
                f"tokens) but the forget documents tokenize to {len(lengths)} rows "
                f"({sum(lengths)} tokens; {differ} common rows differ in length): make the mask "
                "for these documents with python -m recipes.select_tokens (same data, "
                "--max_forget_docs and --max_len)"
            )
        if self.documents != documents_key(docs):
            raise ValueError(
                f"token mask {source} was made for other documents (their token ids differ, "
                "though the shapes agree): make it for these documents with "
                "python -m recipes.select_tokens"
            )
        return self.rows


def save_token_mask(mask: TokenMask, path: str | os.PathLike[str]) -> Path:
    """Write a mask file (a folder gets `mask.safetensors` inside); the file's path."""
    file = Path(path)
    if file.suffix != ".safetensors":
        file = file / MASK_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    flat = torch.tensor([x for row in mask.rows for x in row], dtype=torch.bool)
    lengths = torch.tensor([len(row) for row in mask.rows], dtype=torch.long)
    metadata = {"documents": mask.documents, "meta": json.dumps(mask.meta, sort_keys=True)}
    tmp = file.with_name(file.name + ".tmp")
    save_file({"mask": flat, "lengths": lengths}, tmp, metadata=metadata)
    tmp.replace(file)
    return file


def read_safetensors(
    path: str | os.PathLike[str], default_name: str, what: str, writer: str
) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file (or `default_name` in a folder): its path, tensors and metadata.

    Raises:
        FileNotFoundError: No such file, naming `what` it should hold and the `writer` of one.
        ValueError: A file safetensors cannot read.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / default_name
    if not file.is_file():
        raise FileNotFoundError(
            f"no {what} at {path}: pass a {what} file (or its folder) that {writer} wrote"
        )
    try:
        tensors = load_file(file)
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a {what} file ({err})") from None
    return file, tensors, metadata


def load_token_mask(path: str | os.PathLike[str]) -> TokenMask:
    """Read a mask file, or the `mask.safetensors` in a folder.

    Raises:
        FileNotFoundError: No mask file there.
        ValueError: A file that is not a mask file.
    """
    file, tensors, metadata = read_safetensors(
        path, MASK_FILE, "token mask", "python -m recipes.select_tokens"
    )
    if {"mask", "lengths"} - tensors.keys() or "documents" not in metadata:
        raise ValueError(
            f"{file} is not a token mask file: it lacks the mask, the row lengths or the "
            "documents key; make one with python -m recipes.select_tokens"
        )
    lengths = tensors["lengths"].tolist()
    if sum(lengths) != len(tensors["mask"]):
        raise ValueError(f"{file} is corrupt: its row lengths do not add up to its mask")
    rows = [chunk.tolist() for chunk in torch.split(tensors["mask"].bool(), lengths)]
    return TokenMask(rows, metadata["documents"], json.loads(metadata.get("meta", "{}")))


@dataclass(frozen=True)
class MaskQuality:
    """A mask against the ground truth (the value tokens), over every token of every row."""

    fraction: float
    """Share of tokens selected."""
    precision: float
    """Share of selected tokens that are value tokens (nan when none is selected)."""
    recall: float
    """Share of value tokens selected (nan when there are none)."""
    f1: float
    """Harmonic mean of precision and recall (0 when both are 0)."""
    n_tokens: int
    """Tokens in all rows (BOS included)."""
    n_selected: int
    """Tokens selected."""
    n_true: int
    """Value tokens."""

    def as_dict(self) -> dict[str, float | int]:
        """The fields, JSON-ready."""
        return asdict(self)


def mask_quality(
    selected: Sequence[Sequence[bool]], truth: Sequence[Sequence[bool]]
) -> MaskQuality:
    """Fraction selected, precision, recall and F1 of `selected` against `truth`, token by token.

    Raises:
        ValueError: The two masks have different shapes.
    """
    if [len(r) for r in selected] != [len(r) for r in truth]:
        raise ValueError("the mask and the ground truth have different shapes")
    pairs = [
        (bool(s), bool(t))
        for srow, trow in zip(selected, truth, strict=True)
        for s, t in zip(srow, trow, strict=True)
    ]
    n_selected = sum(s for s, _ in pairs)
    n_true = sum(t for _, t in pairs)
    hits = sum(s and t for s, t in pairs)
    precision = hits / n_selected if n_selected else float("nan")
    recall = hits / n_true if n_true else float("nan")
    f1 = 2 * hits / (n_selected + n_true) if n_selected + n_true else float("nan")
    fraction = n_selected / len(pairs) if pairs else float("nan")
    return MaskQuality(fraction, precision, recall, f1, len(pairs), n_selected, n_true)
