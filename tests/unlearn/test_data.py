"""Tests for unlearn.data: value-token masks, right padding, and `PairedBatches` scheduling.

A word-level tokenizer over a hand-written vocabulary makes every token's character span known, so
the expected masks are written out by hand.
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from unlearn.data import Batch, PairedBatches, TokenizedDocuments, tokenize_documents

WORDS = ["<s>", "<pad>", "<unk>", "Alice", "Smith", "lives", "in", "Paris", ".", "bakes"]
WORDS += [f"w{i}" for i in range(10)]
ID = {word: i for i, word in enumerate(WORDS)}
BOS, PAD = ID["<s>"], ID["<pad>"]


@pytest.fixture(scope="module")
def tokenizer():
    """Whitespace + punctuation split over WORDS: character offsets are the words' positions."""
    backend = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>")


ALICE = {
    "text": "Alice Smith lives in Paris.",
    # Alice [0,5) Smith [6,11) lives [12,17) in [18,20) Paris [21,26) . [26,27)
    "facts": [["name", "Alice Smith", 0, 11], ["city", "Paris", 21, 26]],
}


def _docs(tokenizer, n: int, **kwargs) -> TokenizedDocuments:
    """Document i is the word w{i} repeated 1 + i % 3 times (distinct ids, unequal lengths)."""
    docs = [{"text": " ".join([f"w{i}"] * (1 + i % 3))} for i in range(n)]
    return tokenize_documents(tokenizer, docs, max_len=8, **kwargs)


def _doc_indices(batch: Batch) -> list[int]:
    """Recover each row's document index from its first token after BOS (w{i})."""
    assert (batch.input_ids[:, 0] == BOS).all()
    return [int(token) - ID["w0"] for token in batch.input_ids[:, 1]]


def test_value_mask_marks_exactly_the_value_tokens(tokenizer):
    docs = tokenize_documents(tokenizer, [ALICE], max_len=16)
    ids = [BOS, ID["Alice"], ID["Smith"], ID["lives"], ID["in"], ID["Paris"], ID["."]]
    assert docs.ids == [ids]
    assert docs.value_masks == [[False, True, True, False, False, True, False]]
    assert docs.pad_id == PAD


def test_value_mask_uses_half_open_overlap(tokenizer):
    """A span covering part of a word marks that word; the space between two words marks nothing.

    "ris" of "Paris" is [23, 26): overlaps Paris [21, 26). The space [20, 21) touches "in" [18, 20)
    and "Paris" [21, 26) only at their ends, so no token overlaps it.
    """
    partial = {"text": ALICE["text"], "facts": [["city", "ris", 23, 26]]}
    space = {"text": ALICE["text"], "facts": [["gap", " ", 20, 21]]}
    no_facts = {"text": ALICE["text"]}
    docs = tokenize_documents(tokenizer, [partial, space, no_facts], max_len=16)
    assert docs.value_masks[0] == [False, False, False, False, False, True, False]
    assert docs.value_masks[1] == [False] * 7
    assert docs.value_masks[2] == [False] * 7


def test_bos_and_truncation(tokenizer):
    truncated = tokenize_documents(tokenizer, [ALICE], max_len=3)
    assert truncated.ids == [[BOS, ID["Alice"], ID["Smith"]]]
    assert truncated.value_masks == [[False, True, True]]
    no_bos = tokenize_documents(tokenizer, [ALICE], max_len=5, prepend_bos=False)
    assert no_bos.ids == [[ID["Alice"], ID["Smith"], ID["lives"], ID["in"], ID["Paris"]]]
    assert no_bos.value_masks == [[True, True, False, False, True]]


def test_batch_pads_on_the_right(tokenizer):
    short = {"text": "Alice bakes.", "facts": [["name", "Alice", 0, 5]]}
    docs = tokenize_documents(tokenizer, [ALICE, short], max_len=16)
    batch = docs.batch([1, 0])
    assert batch.input_ids.tolist() == [
        [BOS, ID["Alice"], ID["bakes"], ID["."], PAD, PAD, PAD],
        [BOS, ID["Alice"], ID["Smith"], ID["lives"], ID["in"], ID["Paris"], ID["."]],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch.attention_mask.dtype == torch.long and batch.input_ids.dtype == torch.long
    assert batch.token_mask.tolist() == [[True] * 4 + [False] * 3, [True] * 7]
    values = docs.with_token_masks(docs.value_masks).batch([1, 0]).token_mask
    assert values.tolist() == [
        [False, True, False, False, False, False, False],
        [False, True, True, False, False, True, False],
    ]
    assert len(batch) == 2 and len(docs) == 2
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_empty_inputs_raise(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        tokenize_documents(tokenizer, [], max_len=8)
    with pytest.raises(ValueError, match="no tokens"):
        tokenize_documents(tokenizer, [{"text": ""}], max_len=8)
    docs = _docs(tokenizer, 3)
    empty = TokenizedDocuments([], [], PAD)
    with pytest.raises(ValueError, match="forget"):
        PairedBatches(empty, docs, batch_size=2)
    with pytest.raises(ValueError, match="retain"):
        PairedBatches(docs, empty, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PairedBatches(docs, docs, batch_size=0)


def test_paired_batches_are_deterministic_in_seed_and_step(tokenizer):
    docs = _docs(tokenizer, 7)
    first = PairedBatches(docs, docs, batch_size=3, seed=5)
    second = PairedBatches(docs, docs, batch_size=3, seed=5)
    # Query in different orders: cached epoch orders must not change the answer.
    forward = [first.rows_at(step) for step in range(8)]
    backward = [second.rows_at(step) for step in reversed(range(8))][::-1]
    assert forward == backward
    for step in (0, 6, 2):
        forget_a, retain_a = first.at(step)
        forget_b, retain_b = second.at(step)
        assert torch.equal(forget_a.input_ids, forget_b.input_ids)
        assert torch.equal(retain_a.input_ids, retain_b.input_ids)
    other = PairedBatches(docs, docs, batch_size=3, seed=6)
    assert [other.rows_at(step) for step in range(8)] != forward


def test_each_epoch_walks_every_document_once(tokenizer):
    """5 forget and 3 retain docs, batch 2: every run of 5 (resp. 3) stream positions is a
    permutation; epochs are reshuffled, and forget and retain orders are independent."""
    batches = PairedBatches(_docs(tokenizer, 5), _docs(tokenizer, 3), batch_size=2, seed=0)
    forget_stream, retain_stream = [], []
    for step in range(15):
        forget_rows, retain_rows = batches.rows_at(step)
        forget_stream += forget_rows
        retain_stream += retain_rows
    forget_epochs = [forget_stream[i : i + 5] for i in range(0, 30, 5)]
    retain_epochs = [retain_stream[i : i + 3] for i in range(0, 30, 3)]
    assert all(sorted(epoch) == list(range(5)) for epoch in forget_epochs)
    assert all(sorted(epoch) == list(range(3)) for epoch in retain_epochs)
    assert len({tuple(epoch) for epoch in forget_epochs}) > 1


def test_rank_and_micro_slices_partition_the_global_batch(tokenizer):
    docs = _docs(tokenizer, 10)
    batches = PairedBatches(docs, docs, batch_size=8, seed=3)
    for step in (0, 1, 2):
        forget_rows, retain_rows = batches.rows_at(step)
        for world_size, n_micro in [(1, 1), (2, 2), (4, 1), (1, 4), (2, 1)]:
            forget_seen, retain_seen = [], []
            for rank in range(world_size):
                for micro in range(n_micro):
                    forget, retain = batches.at(step, rank, world_size, micro, n_micro)
                    assert len(forget) == len(retain) == 8 // (world_size * n_micro)
                    forget_seen += _doc_indices(forget)
                    retain_seen += _doc_indices(retain)
            assert forget_seen == forget_rows, (world_size, n_micro)
            assert retain_seen == retain_rows, (world_size, n_micro)


def test_value_mask_applies_to_forget_batches_only(tokenizer):
    docs = tokenize_documents(tokenizer, [ALICE], max_len=16)
    forget = docs.with_token_masks(docs.value_masks)
    forget_batch, retain_batch = PairedBatches(forget, docs, batch_size=1).at(0)
    assert forget_batch.token_mask.tolist() == [[False, True, True, False, False, True, False]]
    assert retain_batch.token_mask.tolist() == [[True] * 7]
    # The mask selects loss positions only: ids and attention are those of the unmasked rows.
    plain, _ = PairedBatches(docs, docs, batch_size=1).at(0)
    assert torch.equal(forget_batch.input_ids, plain.input_ids)
    assert torch.equal(forget_batch.attention_mask, plain.attention_mask)


def test_offsets_are_each_tokens_character_span_bos_empty(tokenizer):
    docs = tokenize_documents(tokenizer, [ALICE], max_len=16)
    assert docs.offsets == [[(0, 0), (0, 5), (6, 11), (12, 17), (18, 20), (21, 26), (26, 27)]]
    assert tokenize_documents(tokenizer, [ALICE], max_len=3).offsets == [[(0, 0), (0, 5), (6, 11)]]


def test_token_masks_must_fit_the_rows(tokenizer):
    docs = _docs(tokenizer, 3)  # rows of 2, 3 and 4 tokens
    with pytest.raises(ValueError, match="2 rows but there are 3 documents"):
        docs.with_token_masks([[True, True], [True] * 3])
    with pytest.raises(ValueError, match="row 1 has 2 tokens but document 1 has 3"):
        docs.with_token_masks([[True, True], [True, True], [True] * 4])


def test_batches_walk_only_rows_whose_mask_selects_a_token(tokenizer):
    """Rows 1 and 3 select nothing: every step's forget rows come from 0, 2, 4, 5, each epoch a
    permutation of them; retain batches are unaffected; a mask selecting nothing is refused."""
    docs = _docs(tokenizer, 6)
    masks = [[False] + [i not in (1, 3)] * (len(row) - 1) for i, row in enumerate(docs.ids)]
    forget = docs.with_token_masks(masks)
    assert forget.selecting_rows() == [0, 2, 4, 5]
    batches = PairedBatches(forget, docs, batch_size=2, seed=3)
    seen = [row for step in range(4) for row in batches.rows_at(step)[0]]
    assert sorted(seen[:4]) == sorted(seen[4:]) == [0, 2, 4, 5]
    unmasked = PairedBatches(docs, docs, batch_size=2, seed=3)
    assert [batches.rows_at(s)[1] for s in range(4)] == [unmasked.rows_at(s)[1] for s in range(4)]
    nothing = docs.with_token_masks([[False] * len(row) for row in docs.ids])
    with pytest.raises(ValueError, match="selects no token of any document"):
        PairedBatches(nothing, docs, batch_size=2)


def test_uneven_split_raises(tokenizer):
    batches = PairedBatches(_docs(tokenizer, 4), _docs(tokenizer, 4), batch_size=6)
    with pytest.raises(ValueError, match="multiple of 4"):
        batches.at(0, rank=0, world_size=2, micro=0, n_micro=2)


def test_batches_cover_every_row_in_order_in_consecutive_batches():
    """5 rows in batches of 2: rows [0, 1], [2, 3], [4]; each padded like `batch` pads them."""
    docs = TokenizedDocuments(
        ids=[[1] * n for n in (1, 2, 3, 4, 5)], value_masks=[[]] * 5, pad_id=0
    )
    batches = docs.batches(2)
    assert [b.rows.tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    for b in batches:
        expected = docs.batch(b.rows.tolist())
        assert torch.equal(b.input_ids, expected.input_ids)
        assert torch.equal(b.attention_mask, expected.attention_mask)
