"""Forget and retain batching: documents -> padded token batches with masks, paired step by step.

A document is a mapping with "text" and, optionally, "facts" (`[attribute, value, start, end]`
character spans, as the toy world writes them). `tokenize_documents` turns documents into one row
each (truncated to `max_len`), keeping each token's character span and a per-token mask marking
the tokens that overlap a value span (the ground truth of per-token unlearning). A forget set may
carry token masks (`TokenizedDocuments.with_token_masks`: the value mask, or one that a selector of
`unlearn.selection` made); they become `Batch.token_mask`, the positions a forget loss scores, and
never reach the attention mask. `PairedBatches` pairs forget and retain rows for every optimizer
step, deterministically from (seed, step), so a resumed run sees the same data, and every DDP rank
takes its own slice of the same global batch.

`read_documents` and `read_items` read JSON-lines files and check every line (valid JSON, the
required fields) before anything is tokenized or loaded, naming the file and line of an error.

Usage:
    >>> docs = read_documents("forget.jsonl")   # [{"text": ...}, ...]
    >>> forget = tokenize_documents(tokenizer, world.corpus("forget_attack"), max_len=128)
    >>> retain = tokenize_documents(tokenizer, world.corpus("retain"), max_len=128)
    >>> forget = forget.with_token_masks(forget.value_masks)   # optional: value tokens only
    >>> batches = PairedBatches(forget, retain, batch_size=16, seed=0)
    >>> forget_batch, retain_batch = batches.at(step=0)
"""

from __future__ import annotations

import dataclasses
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
    offsets: list[list[tuple[int, int]]] | None = None
    """Per token: its character span in the document's text ((0, 0) for the BOS separator); None
    for rows built by hand."""
    token_masks: list[list[bool]] | None = None
    """Per token: may a forget loss score it (`Batch.token_mask`); None: every token may."""

    def __len__(self) -> int:
        return len(self.ids)

    def with_token_masks(self, masks: Sequence[Sequence[bool]]) -> TokenizedDocuments:
        """The same rows with per-token loss masks (one bool per token of every row).

        Raises:
            ValueError: A mask with another number of rows, or a row of another length.
        """
        if len(masks) != len(self.ids):
            raise ValueError(
                f"the token mask has {len(masks)} rows but there are {len(self.ids)} documents: "
                "make the mask for these documents (same data, --max_forget_docs and --max_len)"
            )
        bad = [
            i
            for i, (row, mask) in enumerate(zip(self.ids, masks, strict=True))
            if len(row) != len(mask)
        ]
        if bad:
            i = bad[0]
            raise ValueError(
                f"the token mask's row {i} has {len(masks[i])} tokens but document {i} has "
                f"{len(self.ids[i])} ({len(bad)} rows differ): make the mask with the same "
                "tokenizer and --max_len"
            )
        return dataclasses.replace(self, token_masks=[[bool(x) for x in row] for row in masks])

    def selecting_rows(self) -> list[int]:
        """Rows whose token mask selects at least one token (every row without a mask)."""
        if self.token_masks is None:
            return list(range(len(self)))
        return [i for i, mask in enumerate(self.token_masks) if any(mask)]

    def batch(self, rows: Sequence[int]) -> Batch:
        """Pad the given rows into a `Batch` (right padding, to the longest row).

        `token_mask` is the rows' token masks, or every real token without them.

        Args:
            rows: Document indices.
        """
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        token_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, i in enumerate(rows):
            n = len(self.ids[i])
            ids[r, :n] = torch.tensor(self.ids[i])
            attention[r, :n] = 1
            token_mask[r, :n] = torch.tensor(self.token_masks[i]) if self.token_masks else True
        return Batch(ids, attention, token_mask, torch.tensor(list(rows), dtype=torch.long))

    def batches(self, size: int) -> list[Batch]:
        """Every row in order, in consecutive batches of `size` rows (the last may be smaller)."""
        return [self.batch(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]


def overlap_mask(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """Per token: does its character span overlap any of `spans` (half-open intervals).

    A token [a, b) overlaps a span [start, end) when a < end and b > start; an empty token span
    (the BOS separator's (0, 0)) overlaps nothing.
    """
    return [any(a < end and b > start for start, end in spans) for a, b in offsets]


def tokenize_documents(
    tokenizer: Any,
    documents: Sequence[Mapping[str, Any]],
    max_len: int,
    prepend_bos: bool = True,
) -> TokenizedDocuments:
    """Tokenize documents one per row, truncated to `max_len` tokens, with value-token masks.

    Each row keeps its tokens' character spans (`TokenizedDocuments.offsets`), so a token mask
    made from the text (`unlearn.selection`) lines up with these very rows.

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
    all_ids, all_masks, all_offsets = [], [], []
    for doc, ids, offsets in zip(
        documents, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        if not ids:
            raise ValueError(f"document {doc.get('id', doc['text'][:40])!r} has no tokens")
        offsets = [(int(a), int(b)) for a, b in offsets]
        if prepend_bos and bos is not None:
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        spans = [(start, end) for *_, start, end in doc.get("facts", [])]
        all_ids.append(ids[:max_len])
        all_offsets.append(offsets[:max_len])
        all_masks.append(overlap_mask(offsets[:max_len], spans))
    return TokenizedDocuments(all_ids, all_masks, pad, all_offsets)


class PairedBatches:
    """Forget and retain batches for every optimizer step, deterministic in (seed, step).

    Each data set is walked in a fresh random order every epoch (an epoch of the forget set and of
    the retain set end independently). With token masks on the forget set, its walk skips the rows
    whose mask selects no token (`TokenizedDocuments.selecting_rows`): they have nothing for a
    forget loss to score, and a batch of only such rows would have no loss at all. Step `s` takes
    rows `[s*B, (s+1)*B)` of that infinite stream; under DDP, rank `r` of `w` takes its contiguous
    share of those `B` rows, and a micro-batch is a contiguous share of the rank's rows.
    """

    def __init__(
        self,
        forget: TokenizedDocuments,
        retain: TokenizedDocuments,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        """Pair two tokenized data sets.

        Args:
            forget: Forget documents (with token masks for per-token unlearning).
            retain: Retain documents (their batches' `token_mask` is every real token).
            batch_size: Global rows per optimizer step, from each data set.
            seed: Seed of the epoch orders.

        Raises:
            ValueError: `batch_size` < 1, an empty data set, or forget token masks that select
                no token at all.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, docs in (("forget", forget), ("retain", retain)):
            if len(docs) == 0:
                raise ValueError(f"the {name} data set is empty: nothing to batch")
        self.forget_rows = forget.selecting_rows()
        """The forget rows the batches walk (those whose token mask selects a token)."""
        if not self.forget_rows:
            raise ValueError(
                "the forget token mask selects no token of any document: nothing to unlearn; "
                "check --token_mask"
            )
        self.forget, self.retain = forget, retain
        self.batch_size, self.seed = batch_size, seed
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

    def _rows(self, pool: Sequence[int], salt: int, step: int) -> list[int]:
        n_docs = len(pool)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [pool[self._order(n_docs, salt, p // n_docs)[p % n_docs]] for p in positions]

    def rows_at(self, step: int) -> tuple[list[int], list[int]]:
        """Global forget and retain row indices of optimizer step `step`."""
        return (self._rows(self.forget_rows, 1, step), self._rows(range(len(self.retain)), 2, step))

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
            self.forget.batch(forget_rows[start : start + share]),
            self.retain.batch(retain_rows[start : start + share]),
        )
