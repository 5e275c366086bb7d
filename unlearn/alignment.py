"""Token alignment of a document with its rewritten twin: original position -> rewritten position.

Rewritten activation transfer (`unlearn.methods.rewritten_transfer`) compares the model's
activation at each token of an original document with the frozen model's activation at the
"same" token of a rewritten version of it (facts replaced, wording otherwise kept). `align_tokens`
finds that correspondence on token ids alone:

1. Anchors: the longest common runs of tokens (`difflib.SequenceMatcher` without its junk
   heuristic: the longest common run first, then recursively left and right of it, so anchors never
   cross). Inside an anchor, positions map one to one.
2. Gaps: between consecutive anchors (and before the first / after the last) lie an original gap
   `[a0, a1)` and a rewritten gap `[b0, b1)`. If the rewritten gap is non-empty, original position
   `i` maps by linear interpolation of the gap centres: `b0 + floor((i - a0 + 0.5) * h / g)` with
   `g = a1 - a0`, `h = b1 - b0` (equal gaps map one to one; a longer original gap maps several
   tokens onto one). If the rewritten gap is empty (original tokens deleted), each position maps
   to the nearest anchor boundary: the last token of the anchor before (`b0 - 1`) or the first
   token of the anchor after (`b1`), ties to the one before; at a sequence edge, to the only
   boundary there is.

Every position is then mapped; `valid` is False only when the rewritten sequence is empty (there
is nothing to map to). `matched` marks positions inside anchors (identical tokens).

Usage:
    >>> alignment = align_tokens([5, 6, 7, 8], [5, 9, 9, 8])
    >>> alignment.index.tolist()
    [0, 1, 2, 3]
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class Alignment(NamedTuple):
    """Per original position, where it lands in the rewritten sequence."""

    index: Int[Tensor, " pos"]
    """Aligned rewritten position of each original position (0 where not `valid`)."""
    valid: Bool[Tensor, " pos"]
    """The position has a rewritten counterpart (False only for an empty rewritten sequence)."""
    matched: Bool[Tensor, " pos"]
    """The position lies inside an anchor: its token equals the rewritten token it maps to."""


def _fill_gap(index: list[int], a0: int, a1: int, b0: int, b1: int, n_rewritten: int) -> None:
    """Map original positions [a0, a1) into the rewritten gap [b0, b1) (rules: module docstring)."""
    g, h = a1 - a0, b1 - b0
    for i in range(a0, a1):
        if h > 0:
            index[i] = b0 + int((i - a0 + 0.5) * h / g)
        elif b0 == 0:  # no anchor before: only the one after
            index[i] = b1
        elif b1 >= n_rewritten:  # no anchor after
            index[i] = b0 - 1
        else:  # distance to the anchor before vs after, ties to before
            index[i] = b0 - 1 if (i - a0 + 1) <= (a1 - i) else b1


def align_tokens(original: Sequence[int], rewritten: Sequence[int]) -> Alignment:
    """Align two token-id sequences (anchors on the longest common runs, gaps interpolated).

    Args:
        original: Token ids of the original document.
        rewritten: Token ids of its rewritten version.

    Returns:
        For each original position, its rewritten position, validity and whether it is matched.
    """
    original, rewritten = list(original), list(rewritten)
    n, m = len(original), len(rewritten)
    if m == 0:
        zeros = torch.zeros(n, dtype=torch.long)
        return Alignment(zeros, torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))
    matcher = difflib.SequenceMatcher(None, original, rewritten, autojunk=False)
    index = [0] * n
    matched = [False] * n
    a_prev, b_prev = 0, 0  # end of the previous anchor in each sequence
    # The last block is the (n, m, 0) sentinel, which closes the trailing gap.
    for a, b, size in matcher.get_matching_blocks():
        _fill_gap(index, a_prev, a, b_prev, b, m)
        for k in range(size):
            index[a + k] = b + k
            matched[a + k] = True
        a_prev, b_prev = a + size, b + size
    return Alignment(
        torch.tensor(index, dtype=torch.long),
        torch.ones(n, dtype=torch.bool),
        torch.tensor(matched, dtype=torch.bool),
    )
