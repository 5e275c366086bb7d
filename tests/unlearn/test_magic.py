"""Tests for unlearn.selection.magic and magic_scores: the metagradient against finite differences
of retraining on the tiny toy world, the weighted loss and the first-order coefficients by hand,
and the score files and their cache."""

import dataclasses
import math

import pytest
import torch

from unlearn.data import tokenize_documents
from unlearn.models import load_model
from unlearn.selection.magic import (
    MagicSettings,
    answer_rows,
    first_order_coefficients,
    metagradients,
    retrained_losses,
    weighted_nll_loss,
)
from unlearn.selection.magic_scores import (
    cached_token_scores,
    load_token_scores,
    save_token_scores,
)
from unlearn.toyworld.world import DEV

FD_STEP = 1e-3
"""Central finite-difference step on one token's weight."""
FD_RTOL = 1e-6
"""In float64 the central difference's error is its truncation, O(h²) ≈ 1e-6 · |f'''| relative to
the slope, plus rounding, ≈ 1e-16 · |E| / h ≈ 1e-12: on the tiny world they agree to about 1e-9
(measured while writing this test), so 1e-6 leaves a thousandfold margin and still fails on any
real error of the reverse pass (a missing momentum term or a wrong sign is off by O(1))."""


@pytest.fixture(scope="module")
def tiny_run(tiny_world):
    """The tiny world's model, 6 forget and 6 retain rows, and two targets (dev, retain)."""
    loaded = load_model(tiny_world.model_dir())
    tokenizer = loaded.tokenizer
    forget = tokenize_documents(tokenizer, tiny_world.corpus("forget_attack")[:6], 64)
    retain = tokenize_documents(tokenizer, tiny_world.corpus("retain")[:6], 64)
    targets = {
        "forget_dev": answer_rows(tokenizer, tiny_world.items(DEV, None), 64),
        "retain": answer_rows(tokenizer, tiny_world.items("retain")[:20], 64),
    }
    return loaded.hf_model, forget, retain, targets


SETTINGS = MagicSettings(
    magic_steps=4,
    magic_batch_size=2,
    magic_lr=0.05,
    magic_momentum=0.9,
    magic_checkpoint_every=3,  # segments of 3 and 1 steps: the recomputation is exercised
    magic_dtype="float64",
)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_the_metagradient_is_the_finite_difference_of_retraining(tiny_run, momentum):
    """dE/dw_i of both targets for the 2 largest-magnitude tokens and one retain token, against
    (E(w + h e_i) − E(w − h e_i)) / 2h with the whole run repeated each time."""
    model, forget, retain, targets = tiny_run
    settings = dataclasses.replace(SETTINGS, magic_momentum=momentum)
    result = metagradients(model, forget, retain, targets, settings)
    scores = result.scores["forget_dev"]
    n_tokens = len(scores)
    assert n_tokens == sum(map(len, forget.ids)) + sum(map(len, retain.ids))
    rerun = retrained_losses(model, forget, retain, targets, settings)
    assert result.losses == pytest.approx(rerun, rel=1e-12)
    retain_side = result.retain_scores("forget_dev").abs().argmax() + result.n_forget_tokens
    tokens = [*scores.abs().argsort(descending=True)[:2].tolist(), int(retain_side)]
    for i in tokens:
        shifted = []
        for sign in (1, -1):
            weights = torch.ones(n_tokens, dtype=torch.float64)
            weights[i] += sign * FD_STEP
            shifted.append(retrained_losses(model, forget, retain, targets, settings, weights))
        for target, values in result.scores.items():
            slope = (shifted[0][target] - shifted[1][target]) / (2 * FD_STEP)
            assert float(values[i]) == pytest.approx(slope, rel=FD_RTOL), (i, target)
            assert abs(slope) > 1e-6  # a real slope, not two zeros agreeing


def test_checkpoint_spacing_does_not_change_the_metagradient(tiny_run):
    """Keeping every state (k=1) or recomputing from every other (k=2) is the same computation."""
    model, forget, retain, targets = tiny_run
    every = [
        metagradients(
            model, forget, retain, targets, dataclasses.replace(SETTINGS, magic_checkpoint_every=k)
        ).scores["forget_dev"]
        for k in (1, 2)
    ]
    torch.testing.assert_close(every[0], every[1], rtol=1e-12, atol=1e-15)
    assert (every[0][0] == 0).all()  # the first forget row's BOS is never scored


def test_the_model_is_left_as_it_was(tiny_run):
    model, forget, retain, targets = tiny_run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metagradients(model, forget, retain, {"forget_dev": targets["forget_dev"]}, SETTINGS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_weighted_nll_by_hand():
    """Uniform logits over 2 tokens: every ℓ_t = log 2. Tokens 1..3 scored (token 0 never),
    weights (·, 1, −2, 3): Σ w ℓ / 3 = 2 log 2 / 3; with the last token masked out, (1 − 2) log 2
    / 2; a count given as the denominator replaces |T|."""
    logits = torch.zeros(1, 4, 2)
    tokens = torch.tensor([[0, 1, 0, 1]])
    weights = torch.tensor([[5.0, 1.0, -2.0, 3.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    log2 = math.log(2)
    assert float(weighted_nll_loss(logits, tokens, weights, mask)) == pytest.approx(2 * log2 / 3)
    mask[0, 3] = False
    assert float(weighted_nll_loss(logits, tokens, weights, mask)) == pytest.approx(-log2 / 2)
    assert float(weighted_nll_loss(logits, tokens, weights, mask, 4)) == pytest.approx(-log2 / 4)
    with pytest.raises(ValueError, match="scores no token"):
        weighted_nll_loss(logits, tokens, weights, torch.zeros(1, 4, dtype=torch.bool))


def test_first_order_coefficients_add_up_to_the_steps_total_rate(tiny_run):
    """Each step spreads η (1 − μ^{T−s}) / (1 − μ) over its n_s scored tokens, so with T = 3,
    η = 0.1, μ = 0.5 the coefficients sum to 0.1 · (1.75 + 1.5 + 1) = 0.425; BOS gets 0."""
    _, forget, retain, _ = tiny_run
    settings = MagicSettings(magic_steps=3, magic_batch_size=2, magic_lr=0.1, magic_momentum=0.5)
    coefficients = first_order_coefficients(forget, retain, settings)
    assert float(coefficients.sum()) == pytest.approx(0.425)
    assert coefficients[0] == 0 and (coefficients >= 0).all()


def test_score_files_round_trip_and_the_cache_hits(tiny_world, tmp_path):
    loaded = load_model(tiny_world.model_dir())
    forget_docs = tiny_world.corpus("forget_attack")[:3]
    retain_docs = tiny_world.corpus("retain")[:3]
    dev = tiny_world.items(DEV)[:5]
    settings = MagicSettings(magic_steps=2, magic_batch_size=2)
    args = (loaded.hf_model, loaded.tokenizer, forget_docs, retain_docs, dev, [], 64, settings)
    scores, cached = cached_token_scores(*args, root=tmp_path)
    again, cached_again = cached_token_scores(*args, root=tmp_path)
    assert not cached and cached_again and list(again.scores) == ["forget_dev"]
    torch.testing.assert_close(again.scores["forget_dev"], scores.scores["forget_dev"])
    assert [len(r) for r in scores.rows("forget_dev", "retain")] == scores.retain_lengths
    _, recomputed = cached_token_scores(*args[:-1], MagicSettings(magic_steps=3), root=tmp_path)
    assert not recomputed

    path = save_token_scores(scores, tmp_path / "file")
    read = load_token_scores(path.parent)
    assert read.meta == scores.meta and read.forget_key == scores.forget_key
    forget = tokenize_documents(loaded.tokenizer, forget_docs, 64)
    retain = tokenize_documents(loaded.tokenizer, retain_docs, 64)
    read.check(forget, retain, "here")
    with pytest.raises(ValueError, match="other retain rows"):
        read.check(forget, tokenize_documents(loaded.tokenizer, forget_docs, 64), "here")
    with pytest.raises(ValueError, match="test items"):
        cached_token_scores(*args[:4], tiny_world.test_items()[:2], *args[5:], root=tmp_path)
