"""`unlearn.alignment.align_tokens` on hand-made pairs (expected maps derived in each docstring)."""

import pytest

from unlearn.alignment import align_tokens


def _index(original, rewritten) -> list[int]:
    return align_tokens(original, rewritten).index.tolist()


def test_identical_sequences_map_one_to_one():
    alignment = align_tokens([1, 2, 3, 4], [1, 2, 3, 4])
    assert alignment.index.tolist() == [0, 1, 2, 3]
    assert alignment.valid.all() and alignment.matched.all()


def test_substitution_maps_gap_to_gap():
    """Anchors [1 2] and [4]; the one-token gaps {2} and {2} map one to one."""
    alignment = align_tokens([1, 2, 3, 4], [1, 2, 9, 4])
    assert alignment.index.tolist() == [0, 1, 2, 3]
    assert alignment.matched.tolist() == [True, True, False, True]


def test_longer_rewritten_gap_interpolates_centres():
    """Original gap [1, 2) (g=1) against rewritten gap [1, 4) (h=3): 1 + floor(0.5·3/1) = 2."""
    assert _index([1, 5, 4], [1, 7, 8, 9, 4]) == [0, 2, 4]


def test_insertion_in_rewritten_skips_inserted_tokens():
    """Empty original gap at position 2: nothing to map; the anchor after shifts by two."""
    assert _index([1, 2, 3, 4], [1, 2, 8, 9, 3, 4]) == [0, 1, 4, 5]


def test_deletion_maps_to_nearest_anchor_boundary():
    """Original gap [2, 5) against an empty rewritten gap at 2: positions 2, 3 are at distances
    (1, 3) and (2, 2) from the anchors before/after (ties to before) -> rewritten 1; position 4 at
    (3, 1) -> rewritten 2, the first token of the next anchor."""
    alignment = align_tokens([1, 2, 7, 8, 9, 3, 4], [1, 2, 3, 4])
    assert alignment.index.tolist() == [0, 1, 1, 1, 2, 2, 3]
    assert alignment.valid.all()
    assert alignment.matched.tolist() == [True, True, False, False, False, True, True]


def test_empty_gap_at_the_edges_uses_the_only_boundary():
    """A leading deletion maps to the first anchor token (0); a trailing one to the last (1)."""
    assert _index([7, 1, 2], [1, 2]) == [0, 0, 1]
    assert _index([1, 2, 7, 8], [1, 2]) == [0, 1, 1, 1]


def test_longer_original_gap_compresses():
    """Original gap [1, 5) (g=4) against rewritten [1, 3) (h=2): 1 + floor((k+0.5)·2/4) for
    k = 0..3 -> 1, 1, 2, 2."""
    assert _index([1, 5, 6, 7, 8, 4], [1, 9, 9, 4]) == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize(
    "original, rewritten",
    [([1, 2, 3], [4, 5, 6, 7, 8]), ([1, 2, 3, 4, 5, 6], [9]), ([1, 2, 3], [3, 2, 1, 1])],
)
def test_different_lengths_stay_in_range_and_monotone(original, rewritten):
    index = _index(original, rewritten)
    assert len(index) == len(original)
    assert all(0 <= i < len(rewritten) for i in index)
    assert index == sorted(index)


def test_no_common_token_interpolates_whole_sequences():
    """One gap: original [0, 2) against rewritten [0, 4): floor((k+0.5)·2) for k = 0, 1 -> 1, 3."""
    alignment = align_tokens([1, 2], [5, 6, 7, 8])
    assert alignment.index.tolist() == [1, 3]
    assert not alignment.matched.any()


def test_empty_rewritten_is_invalid():
    alignment = align_tokens([1, 2, 3], [])
    assert not alignment.valid.any() and alignment.index.tolist() == [0, 0, 0]
    assert align_tokens([], [1, 2]).index.numel() == 0
