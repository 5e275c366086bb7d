"""Forget and retain batching: documents -> padded token batches with masks, paired step by step.

A document is a mapping with "text" and, optionally, "facts" (`[attribute, value, start, end]`
character spans, as the toy world writes them). `tokenize_documents` turns documents into one row
each (truncated to `max_len`), with a per-token mask marking the tokens that overlap a value span
(the "keyword mask" of per-token unlearning). `PairedBatches` pairs forget and retain rows for every
optimizer step, deterministically from (seed, step), so a resumed run sees the same data, and every
DDP rank takes its own slice of the same global batch.

`read_documents` and `read_items` read JSON-lines files and check every line (valid JSON, the
required fields) before anything is tokenized or loaded, naming the file and line of an error.

Usage:
    >>> docs = read_documents("forget.jsonl")   # [{"text": ...}, ...]
    >>> forget = tokenize_documents(tokenizer, world.corpus("forget_attack"), max_len=128)
    >>> retain = tokenize_documents(tokenizer, world.corpus("retain"), max_len=128)
    >>> batches = PairedBatches(forget, retain, batch_size=16, seed=0)
    >>> forget_batch, retain_batch = batches.at(step=0)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor


def _read_rows(
    path: str | os.PathLike[str], what: str, check: Callable[[dict[str, Any]], str | None]
) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped), each checked by `check`.

    Raises:
        FileNotFoundError: No file at `path`.
        ValueError: A line that is not a JSON object or fails `check` ("<path>:<line>: why"),
            or no rows at all.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"{what} file {file} does not exist" + (" (it is a directory)" if file.is_dir() else "")
        )
    rows = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file}:{number}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            problem = "not a JSON object" if not isinstance(row, dict) else check(row)
            if problem:
                raise ValueError(f"{file}:{number}: {problem}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{what} file {file} holds no rows")
    return rows


def _document_problem(row: dict[str, Any]) -> str | None:
    if not isinstance(row.get("text"), str):
        return f'a document needs a "text" string; this line has keys {sorted(row)}'
    return None


def _item_problem(row: dict[str, Any]) -> str | None:
    missing = [key for key in ("prompt", "choices", "answer") if key not in row]
    if missing:
        return f"an item needs {missing} (it has keys {sorted(row)})"
    choices, answer = row["choices"], row["answer"]
    if not isinstance(choices, list) or len(choices) < 2:
        return f'"choices" must be a list of at least 2 strings, got {choices!r}'
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        last = len(choices) - 1
        return f'"answer" must be the index of the right choice (0 to {last}), got {answer!r}'
    return None


def read_documents(path: str | os.PathLike[str], what: str = "documents") -> list[dict[str, Any]]:
    """Documents from a JSON-lines file: one object with a "text" string per line.

    Args:
        path: The file.
        what: What the file holds, for messages (e.g. "forget data").

    Raises:
        FileNotFoundError: No file at `path`.
        ValueError: Invalid JSON, a line without "text", or no documents; the message names the
            file and the line.
    """
    return _read_rows(path, what, _document_problem)


def read_items(path: str | os.PathLike[str], what: str = "items") -> list[dict[str, Any]]:
    """Multiple-choice cloze items from a JSON-lines file ("prompt", "choices", "answer").

    Raises:
        FileNotFoundError: No file at `path`.
        ValueError: Invalid JSON, a missing or malformed field, or no items; the message names
            the file and the line.
    """
    return _read_rows(path, what, _item_problem)


@dataclass(frozen=True)
class Batch:
    """A padded batch of token rows (right padding)."""

    input_ids: Int[Tensor, "batch pos"]
    """Token ids; padding positions hold the pad id."""
    attention_mask: Int[Tensor, "batch pos"]
    """1 for real tokens, 0 for padding."""
    token_mask: Bool[Tensor, "batch pos"]
    """Tokens a per-token loss may use (default: every real token; a subset for keyword masks)."""
    rows: Int[Tensor, " batch"] | None = None
    """Document index of each row in its `TokenizedDocuments` (None when built by hand); lets a
    method look up per-document data such as rewritten-text targets."""

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on another device."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.token_mask.to(device),
            None if self.rows is None else self.rows.to(device),
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class TokenizedDocuments:
    """Documents tokenized one per row, not yet padded."""

    ids: list[list[int]]
    """Token ids of each document (BOS first if asked for)."""
    value_masks: list[list[bool]]
    """Per token: does it overlap a value span of the document's facts."""
    pad_id: int
    """Id used for padding."""

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Sequence[int], use_value_mask: bool = False) -> Batch:
        """Pad the given rows into a `Batch` (right padding, to the longest row).

        Args:
            rows: Document indices.
            use_value_mask: Make `token_mask` the value tokens only (else every real token).
        """
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        token_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, i in enumerate(rows):
            n = len(self.ids[i])
            ids[r, :n] = torch.tensor(self.ids[i])
            attention[r, :n] = 1
            token_mask[r, :n] = torch.tensor(self.value_masks[i]) if use_value_mask else True
        return Batch(ids, attention, token_mask, torch.tensor(list(rows), dtype=torch.long))

    def batches(self, size: int) -> list[Batch]:
        """Every row in order, in consecutive batches of `size` rows (the last may be smaller)."""
        return [self.batch(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]


def tokenize_documents(
    tokenizer: Any,
    documents: Sequence[Mapping[str, Any]],
    max_len: int,
    prepend_bos: bool = True,
) -> TokenizedDocuments:
    """Tokenize documents one per row, truncated to `max_len` tokens, with value-token masks.

    Args:
        tokenizer: A Hugging Face fast tokenizer (offsets are needed for value masks).
        documents: Mappings with "text" and optionally "facts" (value character spans).
        max_len: Longest row, BOS included.
        prepend_bos: Start each row with the BOS (or EOS) token, the document separator the toy
            world's models were pretrained with.

    Raises:
        ValueError: No documents, or a document that tokenizes to nothing.
    """
    if len(documents) == 0:
        raise ValueError("no documents to tokenize: the data set is empty")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = tokenizer(
        [doc["text"] for doc in documents], add_special_tokens=False, return_offsets_mapping=True
    )
    all_ids, all_masks = [], []
    for doc, ids, offsets in zip(
        documents, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        if not ids:
            raise ValueError(f"document {doc.get('id', doc['text'][:40])!r} has no tokens")
        spans = [(start, end) for *_, start, end in doc.get("facts", [])]
        mask = [any(a < end and b > start for start, end in spans) for a, b in offsets]
        if prepend_bos and bos is not None:
            ids, mask = [bos, *ids], [False, *mask]
        all_ids.append(ids[:max_len])
        all_masks.append(mask[:max_len])
    return TokenizedDocuments(all_ids, all_masks, pad)


class PairedBatches:
    """Forget and retain batches for every optimizer step, deterministic in (seed, step).

    Each data set is walked in a fresh random order every epoch (an epoch of the forget set and of
    the retain set end independently). Step `s` takes rows `[s*B, (s+1)*B)` of that infinite
    stream; under DDP, rank `r` of `w` takes its contiguous share of those `B` rows, and a
    micro-batch is a contiguous share of the rank's rows.
    """

    def __init__(
        self,
        forget: TokenizedDocuments,
        retain: TokenizedDocuments,
        batch_size: int,
        seed: int = 0,
        use_value_mask: bool = False,
    ) -> None:
        """Pair two tokenized data sets.

        Args:
            forget: Forget documents.
            retain: Retain documents.
            batch_size: Global rows per optimizer step, from each data set.
            seed: Seed of the epoch orders.
            use_value_mask: Forget batches' `token_mask` marks value tokens only.

        Raises:
            ValueError: `batch_size` < 1, or an empty data set.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, docs in (("forget", forget), ("retain", retain)):
            if len(docs) == 0:
                raise ValueError(f"the {name} data set is empty: nothing to batch")
        self.forget, self.retain = forget, retain
        self.batch_size, self.seed, self.use_value_mask = batch_size, seed, use_value_mask
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, n_docs: int, salt: int, epoch: int) -> list[int]:
        key = (salt, epoch)
        if key not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 7919 + salt * 104729 + epoch)
            self._orders = {
                key: torch.randperm(n_docs, generator=generator).tolist(),
                **{k: v for k, v in self._orders.items() if k[0] != salt},
            }
        return self._orders[key]

    def _rows(self, n_docs: int, salt: int, step: int) -> list[int]:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self._order(n_docs, salt, p // n_docs)[p % n_docs] for p in positions]

    def rows_at(self, step: int) -> tuple[list[int], list[int]]:
        """Global forget and retain row indices of optimizer step `step`."""
        return (self._rows(len(self.forget), 1, step), self._rows(len(self.retain), 2, step))

    def at(
        self, step: int, rank: int = 0, world_size: int = 1, micro: int = 0, n_micro: int = 1
    ) -> tuple[Batch, Batch]:
        """The (forget, retain) micro-batch of one rank at one optimizer step.

        Raises:
            ValueError: The global batch does not split evenly over ranks and micro-batches.
        """
        share = self.batch_size // (world_size * n_micro)
        if share * world_size * n_micro != self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into {world_size} ranks x "
                f"{n_micro} micro-batches; choose a multiple of {world_size * n_micro}"
            )
        start = (rank * n_micro + micro) * share
        forget_rows, retain_rows = self.rows_at(step)
        return (
            self.forget.batch(forget_rows[start : start + share], self.use_value_mask),
            self.retain.batch(retain_rows[start : start + share]),
        )
