import pytest
import torch

from tests.conftest import TINY_TEXTS
from unlearn.data import tokenize_documents
from unlearn.lens import TunedLens, lens_kl, per_token_kl, train_tuned_lens


@pytest.fixture
def batches(tiny_lm):
    _, tokenizer = tiny_lm
    rows = tokenize_documents(tokenizer, [{"text": t} for t in TINY_TEXTS], max_len=32)
    return [rows.batch([0, 1]), rows.batch([2, 3])]


def test_per_token_kl_by_hand():
    """KL([ln .5, ln .5] || [ln .75, ln .25]) = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)."""
    target = torch.log(torch.tensor([[0.5, 0.5]]))
    other = torch.log(torch.tensor([[0.75, 0.25]]))
    expected = 0.5 * torch.log(torch.tensor(4 / 3)).item()
    assert per_token_kl(target, other).item() == pytest.approx(expected)
    assert per_token_kl(target, target).item() == pytest.approx(0.0, abs=1e-7)


def test_identity_lens_equals_logit_lens(tiny_lm, batches):
    model, _ = tiny_lm
    lens = TunedLens.for_model(model)
    assert len(lens.translators) == model.config.num_hidden_layers - 1
    kl = lens_kl(model, lens, batches)
    torch.testing.assert_close(torch.tensor(kl["tuned"]), torch.tensor(kl["logit"]))


def test_logit_lens_kl_matches_a_hand_decode(tiny_lm, batches):
    """Layer-0 logit lens = lm_head(final_layer_norm(hidden_states[1])) for GPT-NeoX."""
    model, _ = tiny_lm
    batch = batches[0]
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        unembed = model.embed_out if hasattr(model, "embed_out") else model.lm_head
        lens0 = unembed(model.gpt_neox.final_layer_norm(out.hidden_states[1]))
    mask = batch.attention_mask.bool()
    expected = (per_token_kl(out.logits, lens0) * mask).sum() / mask.sum()
    kl = lens_kl(model, TunedLens.for_model(model), [batch])
    assert kl["logit"][0] == pytest.approx(expected.item(), rel=1e-4)


def test_trained_lens_beats_logit_lens_and_round_trips(tiny_lm, batches, tmp_path):
    model, _ = tiny_lm
    lens = TunedLens.for_model(model)
    losses = train_tuned_lens(model, lens, batches[:1], num_steps=40, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())
    kl = lens_kl(model, lens, batches[1:])
    assert all(t < g for t, g in zip(kl["tuned"], kl["logit"], strict=True))
    loaded = TunedLens.load(lens.save(tmp_path / "lens"))
    for a, b in zip(lens.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


def test_missing_lens_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipes.tuned_lens"):
        TunedLens.load(tmp_path)


def test_training_a_lens_leaves_the_model_trainable(tiny_lm, batches):
    model, _ = tiny_lm
    flags = [p.requires_grad for p in model.parameters()]
    train_tuned_lens(model, TunedLens.for_model(model), batches[:1], num_steps=1)
    assert [p.requires_grad for p in model.parameters()] == flags
