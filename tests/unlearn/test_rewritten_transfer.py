"""Rewritten activation transfer on the tiny random GPT-NeoX, and its recipe on the tiny world.

Wired as `unlearn.training.train` wires methods: "trainable" and "base" (a deep copy) compiled
through `interventions.StepGraph`; the targets come from the frozen model on rewritten twins.
"""

import copy
import dataclasses
import json

import pytest
import simple_parsing
import torch

from interventions import StepGraph
from tests.conftest import TINY_TEXTS
from unlearn.data import PairedBatches, tokenize_documents
from unlearn.methods.base import BASE, FORGET, RETAIN, TRAINABLE
from unlearn.methods.rewritten_transfer import (
    RewrittenTransfer,
    RewrittenTransferConfig,
    rewritten_targets,
)

REWRITES = {
    "ticks": "mosquitoes",
    "Paris": "Rome",
    "baker": "pilot",
    "green": "blue",
    "fever": "rash",
}


def _rewrite(text: str) -> str:
    for true, false in REWRITES.items():
        text = text.replace(true, false)
    return text


@pytest.fixture(scope="module")
def setup(tiny_lm):
    """Forget docs (the tiny texts), their rewrites, retain docs, and batches of 4 rows."""
    model, tokenizer = tiny_lm
    forget = tokenize_documents(tokenizer, [{"text": t} for t in TINY_TEXTS], max_len=64)
    rewritten = tokenize_documents(tokenizer, [{"text": _rewrite(t)} for t in TINY_TEXTS], 64)
    retain = tokenize_documents(tokenizer, [{"text": t[:20]} for t in TINY_TEXTS], max_len=64)
    forget_batch, retain_batch = PairedBatches(forget, retain, batch_size=4, seed=1).at(0)
    assert forget_batch.rows is not None and sorted(forget_batch.rows.tolist()) == [0, 1, 2, 3]
    assert forget_batch.rows.tolist() != [0, 1, 2, 3]  # a shuffled order exercises the lookup
    return forget, rewritten, {FORGET: forget_batch, RETAIN: retain_batch}


def _wire(model, method):
    base = copy.deepcopy(model).eval().requires_grad_(True)  # catches reads that leak grad
    trainable = copy.deepcopy(model).train().requires_grad_(True)
    step = StepGraph(list(method.nodes)).compile({TRAINABLE: trainable, BASE: base})
    return trainable, base, step


def _losses(method, step, batches):
    acts = step(batches)
    return {term.name: term.fn(acts, batches[FORGET], batches[RETAIN]) for term in method.terms}


def test_targets_are_the_frozen_models_aligned_block_outputs(tiny_lm, setup):
    """At a matched prefix position (before the first rewrite) the rewritten text is identical, so
    the target equals the model's own block output on the original there."""
    model, _ = tiny_lm
    forget, rewritten, _ = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[0, 1], batch_size=3)
    assert len(targets) == 4 and targets.layers == (0, 1)
    outputs = []  # block outputs from plain hooks (HF's last hidden state is after the final norm)
    hooks = [
        block.register_forward_hook(lambda module, args, output: outputs.append(output))
        for block in model.gpt_neox.layers
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([forget.ids[0]]))
    finally:
        for hook in hooks:
            hook.remove()
    first_diff = next(
        i for i, (a, b) in enumerate(zip(forget.ids[0], rewritten.ids[0], strict=False)) if a != b
    )
    for layer in (0, 1):
        block_out = outputs[layer][0] if isinstance(outputs[layer], tuple) else outputs[layer]
        torch.testing.assert_close(
            targets.acts[0][layer, :first_diff], block_out[0, :first_diff], atol=1e-5, rtol=0
        )
        assert not torch.allclose(targets.acts[0][layer, -1], block_out[0, -1], atol=1e-3)
    assert targets.acts[0].shape == (2, len(forget.ids[0]), model.config.hidden_size)


@pytest.mark.parametrize("retain_loss", ["kl", "nll", "l2"])
def test_loss_is_finite_and_grads_reach_only_trainable(tiny_lm, setup, retain_loss):
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[0, 1])
    cfg = RewrittenTransferConfig(retain_loss=retain_loss)
    method = RewrittenTransfer(cfg, 2, targets)
    trainable, base, step = _wire(model, method)
    with torch.no_grad():  # move off θ0 so the retain terms have a gradient too
        for param in trainable.parameters():
            param.add_(0.02 * torch.randn_like(param))
    losses = _losses(method, step, batches)
    assert set(losses) == {"forget", "retain"}
    for name, loss in losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), name
        assert loss.requires_grad, f"{name} carries no gradient"
        grads = torch.autograd.grad(
            loss, list(trainable.parameters()), allow_unused=True, retain_graph=True
        )
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: zero gradient"
    sum(losses.values()).backward()
    assert all(p.grad is None for p in base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())


def test_one_step_lowers_the_forget_mse(tiny_lm, setup):
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[1])
    method = RewrittenTransfer(RewrittenTransferConfig(layers=[1], retain_coef=0.0), 2, targets)
    trainable, _, step = _wire(model, method)
    before = _losses(method, step, batches)["forget"]
    assert before > 0  # the rewrites change the activations after them
    before.backward()
    with torch.no_grad():
        params = [p for p in trainable.parameters() if p.grad is not None]
        norm = torch.stack([p.grad.norm() for p in params]).norm()
        for param in params:
            param.sub_(1e-3 * param.grad / norm)
    after = _losses(method, step, batches)["forget"]
    assert after < before, (float(after), float(before))


def test_matched_only_and_layer_mismatch(tiny_lm, setup):
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[1])
    method = RewrittenTransfer(RewrittenTransferConfig(layers=[1], matched_only=True), 2, targets)
    _, _, step = _wire(model, method)
    assert torch.isfinite(_losses(method, step, batches)["forget"])
    with pytest.raises(ValueError, match="layers"):
        RewrittenTransfer(RewrittenTransferConfig(layers=[0]), 2, targets)
    unindexed = dataclasses.replace(batches[FORGET], rows=None)
    with pytest.raises(ValueError, match="document indices"):
        targets.gather(unindexed)
    with pytest.raises(ValueError, match="rewritten"):
        rewritten_targets(
            model, forget, tokenize_documents(_tokenizer(tiny_lm), [{"text": "a"}], 8), [1]
        )


def _tokenizer(tiny_lm):
    return tiny_lm[1]


def test_config_round_trips():
    cfg = RewrittenTransferConfig(layers=[1, 2], retain_loss="l2", matched_only=True)
    assert RewrittenTransferConfig(**dataclasses.asdict(cfg)) == cfg
    args = ["--layers", "1", "2", "--retain_loss", "l2", "--matched_only", "true"]
    assert simple_parsing.parse(RewrittenTransferConfig, args=args) == cfg


@pytest.mark.filterwarnings("error")
def test_recipe_end_to_end(tiny_home, tmp_path):
    from recipes import rewritten_transfer

    out = tmp_path / "run"
    cfg = simple_parsing.parse(
        rewritten_transfer.Config,
        args=["--out", str(out), "--world_preset", "tiny", "--num_steps", "2", "--batch_size", "4"],
    )
    results = rewritten_transfer.main(cfg)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == pytest.approx(results)
    for key in ("forget_acc", "retain_acc", "forget_acc_before", "retain_acc_before"):
        assert 0.0 <= results[key] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/forget" in r]
    assert [r["step"] for r in losses] == [1, 2]
    assert all(r["loss/forget"] > 0 and "loss/retain" in r for r in losses)
    assert (out / "model" / "config.json").exists() and (out / "run_info.json").exists()
