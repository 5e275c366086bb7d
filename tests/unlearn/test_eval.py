import copy
import math

import pytest
import torch
from nnsight import TransformersModel

from unlearn.eval import evaluate_mc, position_ids_from_mask, score_continuations

PROMPTS = ["Alice Smith lives in", "The pathogen Velkor is transmitted by", "Bruno Jones has a pet"]
CHOICES = [" Paris", " ticks", " parrot"]


def _hand_score(model, tokenizer, prompt, continuation):
    """Summed log p(continuation tokens | BOS + prompt), from one unpadded forward pass.

    ids = [BOS] + tok(prompt) + tok(cont); token i is predicted by the logits at i - 1, so the
    score is sum_{i in cont} log_softmax(logits[i - 1])[ids[i]].
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt_ids)] == prompt_ids
    ids = [tokenizer.eos_token_id] + whole
    first = 1 + len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(first, len(ids)))


def test_scores_match_hand_computed_loglikelihood(tiny_lm):
    model, tokenizer = tiny_lm
    scores = score_continuations(model, tokenizer, PROMPTS, CHOICES, batch_size=2)
    expected = [_hand_score(model, tokenizer, p, c) for p, c in zip(PROMPTS, CHOICES, strict=True)]
    torch.testing.assert_close(
        scores, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5
    )
    assert all(s < 0 for s in expected)


def test_left_and_right_padding_score_the_same(tiny_lm):
    model, tokenizer = tiny_lm
    right = score_continuations(model, tokenizer, PROMPTS, CHOICES, padding_side="right")
    left = score_continuations(model, tokenizer, PROMPTS, CHOICES, padding_side="left")
    one_by_one = score_continuations(model, tokenizer, PROMPTS, CHOICES, batch_size=1)
    torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(one_by_one, right, atol=1e-4, rtol=1e-5)


def test_nnsight_wrapper_scores_like_the_module(tiny_lm):
    model, tokenizer = tiny_lm
    wrapped = TransformersModel(copy.deepcopy(model), tokenizer=tokenizer)
    torch.testing.assert_close(
        score_continuations(wrapped, tokenizer, PROMPTS, CHOICES, padding_side="left"),
        score_continuations(model, tokenizer, PROMPTS, CHOICES),
        atol=1e-4,
        rtol=1e-5,
    )


def test_accuracy_picks_the_highest_score_and_norm_divides_by_bytes(tiny_lm):
    """acc takes argmax of summed log-likelihood; acc_norm argmax of log-likelihood / bytes."""
    model, tokenizer = tiny_lm
    choices = [" Paris", " ticks", " parrot", " green"]
    items = [{"prompt": p, "choices": choices, "answer": a} for p in PROMPTS for a in range(4)]
    result = evaluate_mc(model, tokenizer, items)
    expected, expected_norm = [], []
    for item in items:
        scores = [_hand_score(model, tokenizer, item["prompt"], c) for c in choices]
        per_byte = [s / len(c.encode()) for s, c in zip(scores, choices, strict=True)]
        expected.append(float(max(range(4), key=scores.__getitem__) == item["answer"]))
        expected_norm.append(float(max(range(4), key=per_byte.__getitem__) == item["answer"]))
    assert result.n == 12
    assert result.correct == tuple(expected)
    assert result.acc == pytest.approx(sum(expected) / 12)
    assert result.acc_norm == pytest.approx(sum(expected_norm) / 12)
    # Each prompt is asked with every answer index, so exactly one of its four items is right.
    assert result.acc == pytest.approx(0.25)


def test_flat_model_ties_share_credit(tiny_lm):
    """Zero unembedding -> every logit 0 -> uniform p; equal-length choices tie 4 ways -> 1/4."""
    model, tokenizer = tiny_lm
    flat = type(model)(model.config).eval()
    torch.nn.init.zeros_(
        flat.embed_out.weight if hasattr(flat, "embed_out") else flat.lm_head.weight
    )
    lengths = {
        c: len(tokenizer(c, add_special_tokens=False)["input_ids"])
        for c in (" Paris", " ticks", " parrot", " green", " water", " fever")
    }
    same = [c for c in lengths if lengths[c] == lengths[" Paris"]][:2]
    assert len(same) == 2
    items = [{"prompt": PROMPTS[0], "choices": same, "answer": 0}]
    result = evaluate_mc(flat, tokenizer, items)
    assert result.correct == (0.5,)
    scores = score_continuations(flat, tokenizer, [PROMPTS[0]], [" Paris"])
    assert scores.item() == pytest.approx(-lengths[" Paris"] * math.log(len(tokenizer)), rel=1e-5)


def test_position_ids_count_only_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_bad_inputs_raise(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="empty"):
        evaluate_mc(model, tokenizer, [])
    with pytest.raises(ValueError, match="same number of choices"):
        evaluate_mc(
            model,
            tokenizer,
            [
                {"prompt": "a", "choices": [" b", " c"], "answer": 0},
                {"prompt": "a", "choices": [" b"], "answer": 0},
            ],
        )
    with pytest.raises(ValueError, match="answer index"):
        evaluate_mc(model, tokenizer, [{"prompt": "a", "choices": [" b", " c"], "answer": 2}])


def test_non_finite_scores_raise_instead_of_scoring(tiny_lm):
    model, tokenizer = tiny_lm
    broken = type(model)(model.config).eval()
    with torch.no_grad():
        broken.gpt_neox.final_layer_norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        evaluate_mc(broken, tokenizer, [{"prompt": "a", "choices": [" b", " c"], "answer": 0}])
