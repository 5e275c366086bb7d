"""Keyword selection: every token whose character span overlaps a keyword match.

ALGORITHMS.md section 4.1. Keywords come from a file, one a line (blank lines and lines starting
with "#" are skipped); the toy world writes its own (`ToyWorld.keyword_file`: the forget domain's
entity names and attribute values). Matching is case-insensitive. Every occurrence of every keyword
counts, overlapping ones too ("Zan" and "Zanvex" in "Zanvexosis" both match; "abc" and "bcd" in
"abcd" cover all four letters), which a single alternation regex would miss: at each start
position only its longest match is taken, and a shorter keyword starting there lies inside it.
A token is marked when its character span (`TokenizedDocuments.offsets`, the same tokenization as
the training rows) overlaps a match, so a keyword that ends inside a sub-word token marks that
whole token. With `whole_words`, a match must not touch a letter, digit or underscore on either
side.

The reference (`keyword_masks.py`) read a `blocklist.csv` that was never shipped; here a missing
or empty keyword file is an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unlearn.data import overlap_mask
from unlearn.selection.base import Selection, SelectionInputs


@dataclass(frozen=True)
class KeywordSettings:
    """Keyword matching."""

    whole_words: bool = False
    """Match only whole words (no letter, digit or underscore right before or after a match);
    the reference matched anywhere, as the default does."""


def read_keywords(path: str | os.PathLike[str]) -> list[str]:
    """The keywords of a file: one a line, stripped; blank lines and "#" comments skipped.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file holds no keyword.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"keyword file {file} does not exist")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    keywords = [line for line in lines if line and not line.startswith("#")]
    if not keywords:
        raise ValueError(
            f"keyword file {file} holds no keywords: write one keyword a line (blank lines and "
            "lines starting with # are skipped)"
        )
    return keywords


def keyword_pattern(keywords: Sequence[str], whole_words: bool = False) -> re.Pattern[str]:
    """A case-insensitive regex whose matches, at each position, are the longest keyword there.

    The alternation sits in a lookahead, so `finditer` tries every start position and the
    matches may overlap; group 1 is the keyword's span.

    Raises:
        ValueError: No keywords (after stripping).
    """
    words = sorted({k.strip() for k in keywords if k.strip()}, key=lambda k: (-len(k), k))
    if not words:
        raise ValueError("no keywords to match: the keyword list is empty")
    alternation = "|".join(re.escape(word) for word in words)
    if whole_words:
        alternation = rf"(?<!\w)(?:{alternation})(?!\w)"
    return re.compile(rf"(?=({alternation}))", re.IGNORECASE)


def keyword_spans(text: str, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Character spans of every keyword match in `text` (overlapping matches included)."""
    return [match.span(1) for match in pattern.finditer(text)]


def keyword_masks(
    texts: Sequence[str],
    offsets: Sequence[Sequence[tuple[int, int]]],
    keywords: Sequence[str],
    whole_words: bool = False,
) -> list[list[bool]]:
    """Per token of every row: does its character span overlap a keyword match.

    Args:
        texts: The documents' texts.
        offsets: Each row's token character spans (`TokenizedDocuments.offsets`).
        keywords: The keywords.
        whole_words: See `KeywordSettings.whole_words`.

    Raises:
        ValueError: No keywords, or texts and rows that do not pair up.
    """
    if len(texts) != len(offsets):
        raise ValueError(f"{len(texts)} texts but {len(offsets)} tokenized rows")
    pattern = keyword_pattern(keywords, whole_words)
    return [
        overlap_mask(row, keyword_spans(text, pattern))
        for text, row in zip(texts, offsets, strict=True)
    ]


def select(settings: KeywordSettings, inputs: SelectionInputs) -> Selection:
    """Mark the forget tokens that overlap a keyword match."""
    keywords = inputs.require_keywords("keywords")
    forget = inputs.forget
    assert forget.offsets is not None  # tokenize_documents keeps them
    texts = [doc["text"] for doc in inputs.forget_docs]
    masks = keyword_masks(texts, forget.offsets, keywords, settings.whole_words)
    return Selection(masks, {"n_keywords": len(keywords)})
