"""Log-probabilities reduced inside the trace (`interventions.scoring`) against plain PyTorch.

The reference runs the plain Hugging Face module on each row alone, unpadded, and sums
log_softmax(logits[t - 1])[ids[t]] over the row's marked tokens t in float64; the code under test
runs one padded batch, through a trace or not, on either padding side.
"""

from __future__ import annotations

import pytest
import torch

from interventions import choice_logprobs, token_logprobs, unwrap, wrap_lm
from tests.interventions.conftest import make_model, make_tokenizer

PAD = 1
ROWS = [[0, 5, 6, 7, 8, 9], [0, 10, 11], [0, 12, 13, 14, 15]]
"""Unpadded rows (0 stands for BOS, 1 is padding)."""
N_SCORED = [2, 1, 3]
"""How many trailing tokens of each row are the choice being scored."""


def _reference(model, rows, n_scored) -> torch.Tensor:
    """sum_{t in the last k tokens} log p(ids[t] | ids[:t]), one unpadded forward pass per row."""
    scores = []
    for row, k in zip(rows, n_scored, strict=True):
        with torch.no_grad():
            logprobs = model(torch.tensor([row])).logits[0].double().log_softmax(-1)
        scores.append(sum(float(logprobs[t - 1, row[t]]) for t in range(len(row) - k, len(row))))
    return torch.tensor(scores, dtype=torch.float64)


def _batch(side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROWS padded on one side: token ids, attention mask, and the mask of the scored tokens."""
    width = max(len(row) for row in ROWS)
    ids = torch.full((len(ROWS), width), PAD)
    mask = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, k) in enumerate(zip(ROWS, N_SCORED, strict=True)):
        end = width if side == "left" else len(row)
        ids[i, end - len(row) : end] = torch.tensor(row)
        mask[i, end - len(row) : end] = 1
        target[i, end - k : end] = True
    return ids, mask, target


@pytest.fixture
def model():
    return make_model("gpt_neox").requires_grad_(False)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["module", "nnsight"])
def test_choice_logprobs_match_plain_pytorch(model, side, wrapped):
    ids, mask, target = _batch(side)
    subject = wrap_lm(model, make_tokenizer()) if wrapped else model
    scores = choice_logprobs(subject, ids, mask, target)
    assert scores.dtype == torch.float64 and scores.shape == (len(ROWS),)
    torch.testing.assert_close(scores, _reference(model, ROWS, N_SCORED), atol=1e-5, rtol=1e-5)


def test_simulated_remote_run_gives_the_same_numbers(model):
    """remote="local" serializes the trace (reduction included) as NDIF would, then runs it."""
    ids, mask, target = _batch("left")
    torch.testing.assert_close(
        choice_logprobs(model, ids, mask, target, remote="local"),
        choice_logprobs(model, ids, mask, target),
        atol=0,
        rtol=0,
    )
    torch.testing.assert_close(
        token_logprobs(model, ids, mask, remote="local"), token_logprobs(model, ids, mask)
    )


def test_token_logprobs_sum_to_choice_logprobs(model):
    """token_logprobs[b, t] scores token t + 1, the last position is 0, and the sum agrees."""
    ids, mask, target = _batch("right")
    logprobs = token_logprobs(wrap_lm(model, make_tokenizer()), ids, mask)
    assert logprobs.shape == ids.shape and (logprobs[:, -1] == 0).all()
    assert (logprobs[:, :-1] <= 0).all()
    summed = torch.where(target[:, 1:], logprobs[:, :-1].double(), 0.0).sum(1)
    torch.testing.assert_close(summed, choice_logprobs(model, ids, mask, target))


def test_bad_target_mask_raises(model):
    """A mask of the wrong dtype or shape raises (TypeError under jaxtyping's runtime checks)."""
    ids, mask, target = _batch("right")
    with pytest.raises((ValueError, TypeError), match="bool"):
        choice_logprobs(model, ids, mask, target.long())
    with pytest.raises((ValueError, TypeError)):
        choice_logprobs(model, ids, mask, target[:, 1:])
    first = torch.zeros_like(target)
    first[0, 0] = True
    with pytest.raises(ValueError, match="first token"):
        choice_logprobs(model, ids, mask, first)


def test_unwrap_returns_the_module_the_wrapper_shares(model):
    wrapped = wrap_lm(model, make_tokenizer())
    assert unwrap(wrapped) is model
    assert unwrap(model) is model
