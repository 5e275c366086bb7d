"""Detractor learning: score normalization by hand, and both variants end to end on the tiny toy
world through the generic recipe (2 steps, MAGIC scores computed once and then read back from
the cache)."""

import json

import pytest
import torch

from unlearn.methods.detractor import RowWeights, token_weights


def test_token_weights_by_hand():
    """Scores (0, 2, −4) and (6,): mean |s| over the nonzero ones = (2 + 4 + 6) / 3 = 4, so weights
    (0, 0.5, −1) and (1.5,); positives only: mean of (2, 6) = 4, so (0, 0.5, 0) and (1.5,)."""
    scores = [torch.tensor([0.0, 2.0, -4.0]), torch.tensor([6.0])]
    weighted = token_weights(scores)
    assert [w.tolist() for w in weighted] == [[0.0, 0.5, -1.0], [1.5]]
    detractors = token_weights(scores, positive_only=True)
    assert [w.tolist() for w in detractors] == [[0.0, 0.5, 0.0], [1.5]]
    with pytest.raises(ValueError, match="positive attribution score"):
        token_weights([torch.tensor([0.0, -1.0])], positive_only=True)


def test_row_weights_follow_the_batch_rows():
    from unlearn.data import Batch

    weights = RowWeights([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])])
    ids = torch.zeros(2, 2, dtype=torch.long)
    batch = Batch(
        ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), torch.tensor([1, 0])
    )
    assert weights(batch).tolist() == [[3.0, 4.0], [1.0, 2.0]]


def test_the_mask_variant_is_ascent_on_masked_forget_tokens_and_descent_on_retain():
    """train_on="mask": forget term = +mean log p over the masked forget targets (weight −1),
    retain term = −mean log p over the retain targets (weight +1), by hand from log_softmax."""
    from unlearn.data import Batch
    from unlearn.methods.detractor import DetractorConfig, DetractorLearning

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (2, 4), generator=gen)
    logits = torch.randn(2, 4, 5, generator=gen)
    ones = torch.ones_like(ids)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    forget = Batch(ids, ones, mask, torch.tensor([0, 1]))
    retain = Batch(ids, ones, torch.ones_like(mask), torch.tensor([0, 1]))
    method = DetractorLearning(DetractorConfig(train_on="mask"), None)
    terms = {term.name: term for term in method.terms}
    acts = {"forget_logits": logits, "retain_logits": logits}
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    # a target t is scored when the mask selects it (the prediction from position t - 1)
    forget_hand = logp[mask[:, 1:]].mean()
    retain_hand = -logp.mean()
    forget_loss = terms["forget"].fn(acts, forget, retain)
    retain_loss = terms["attributed_retain"].fn(acts, forget, retain)
    torch.testing.assert_close(forget_loss, forget_hand)
    torch.testing.assert_close(retain_loss, retain_hand)
    with pytest.raises(ValueError, match="needs attribution scores"):
        DetractorLearning(DetractorConfig(train_on="weighted"), None)


@pytest.mark.parametrize("train_on", ["weighted", "detractors", "mask"])
def test_every_variant_runs_two_steps_on_the_tiny_world(train_on, tiny_home, tmp_path):
    from recipes import unlearn as generic

    out = tmp_path / train_on
    args = ["--method", "detractor", "--world_preset", "tiny", "--out", str(out)]
    args += ["--num_steps", "2", "--batch_size", "4", "--eval_every", "0", "--lr", "1e-3"]
    args += ["--train_on", train_on, "--magic_steps", "3", "--magic_batch_size", "4"]
    if train_on == "mask":
        args += ["--token_mask", "values"]
    generic.main(args)
    results = json.loads((out / "results.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    assert results["num_steps"] == 2
    if train_on == "mask":  # no attribution: no scores computed or recorded
        assert "scores_key" not in info["config"]
    else:
        assert 0 < info["config"]["detractor_share"] < 1 and info["config"]["scores_key"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {key for record in records for key in record if key.startswith("loss/")}
    weighted = train_on in ("weighted", "mask")
    expected = {"forget", "attributed_retain"} if weighted else {"detractors"}
    assert {f"loss/{name}" for name in expected} <= losses
    if train_on == "mask":  # ascent: the forget term is a negative mean NLL
        assert all(r["loss/forget"] < 0 for r in records if "loss/forget" in r)
    else:
        assert (tiny_home.root.parent.parent / "magic_scores").is_dir()


def test_the_detractors_variant_refuses_a_forget_token_mask(tmp_path):
    """It trains on retain tokens only: a forget token mask would silently do nothing."""
    from unlearn.config import DataConfig, ModelConfig
    from unlearn.methods.detractor import REGISTRATION, DetractorConfig

    for mask, refused in (("values", True), ("all", False)):
        data = DataConfig(token_mask=mask)
        cfg = DetractorConfig(train_on="detractors")
        if refused:
            with pytest.raises(ValueError, match="--train_on detractors trains on retain tokens"):
                REGISTRATION.inputs(cfg, ModelConfig(), data)
        else:
            assert REGISTRATION.inputs(cfg, ModelConfig(), data) == {"paths": {"scores_path": None}}
    assert REGISTRATION.inputs(DetractorConfig(), ModelConfig(), DataConfig(token_mask="values"))
