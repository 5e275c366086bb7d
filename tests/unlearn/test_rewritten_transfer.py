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
from unlearn.alignment import align_tokens
from unlearn.config import from_dict, replace_flat
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


SITES = ("hook_resid_post", "hook_mlp_out", "unembed")


def _frozen_outputs(model, ids):
    """Block outputs and MLP outputs [layer pos d] (plain forward hooks) and logits [1 pos vocab]
    of one row, without grad (HF's last hidden state is after the final norm, so hooks it is)."""
    blocks, mlps = [], []
    hooks = [
        module.register_forward_hook(lambda module, args, output, out=out: out.append(output))
        for layer in model.gpt_neox.layers
        for module, out in ((layer, blocks), (layer.mlp, mlps))
    ]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
    finally:
        for hook in hooks:
            hook.remove()
    first = [o[0] if isinstance(o, tuple) else o for o in blocks]
    return {
        "hook_resid_post": torch.stack([o[0] for o in first]),
        "hook_mlp_out": torch.stack([o[0] for o in mlps]),
        "unembed": logits,
    }


def _first_diff(a, b):
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


def test_targets_are_the_frozen_models_aligned_outputs(tiny_lm, setup):
    """Targets at every site kind are the frozen model's outputs on the twin, read at the aligned
    positions; tokens are the twin's aligned tokens. Before the first rewrite the twin's prefix is
    the original's, so there the target equals the model's own output on the original: the MSE
    has no signal at the position that predicts the first rewritten token."""
    model, _ = tiny_lm
    forget, rewritten, _ = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[0, 1], sites=SITES, batch_size=3)
    assert len(targets) == 4 and targets.layers == (0, 1) and targets.sites == SITES
    for doc in range(4):
        index = align_tokens(forget.ids[doc], rewritten.ids[doc]).index
        on_twin = _frozen_outputs(model, rewritten.ids[doc])
        on_original = _frozen_outputs(model, forget.ids[doc])
        first_diff = _first_diff(forget.ids[doc], rewritten.ids[doc])
        twin = rewritten.ids[doc]
        for t in range(len(forget.ids[doc])):  # label of t: x'_{π(t-1)+1}, if the twin has it
            has = t > 0 and index[t - 1] + 1 < len(twin)
            assert targets.labeled[doc][t] == has
            assert targets.labels[doc][t] == (twin[index[t - 1] + 1] if has else 0)
        assert targets.labels[doc][first_diff] == rewritten.ids[doc][first_diff]
        for kind in SITES:
            got = targets.acts[kind][doc]
            assert got.shape == (1 if kind == "unembed" else 2, len(forget.ids[doc]), got.shape[-1])
            torch.testing.assert_close(got, on_twin[kind][:, index], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                got[:, :first_diff], on_original[kind][:, :first_diff], atol=1e-5, rtol=0
            )
            after = (got[:, first_diff:] - on_original[kind][:, first_diff:]).abs().max()
            assert after > 1e-4, kind  # the rewrite changes the activations from there on


def test_mse_is_the_mean_over_site_layer_modules(tiny_lm, setup):
    """With sites (block outputs, logits) at layer 0 there are two modules, so the forget term is
    (MSE_block0 + MSE_logits) / 2, each MSE = Σ_s m_s mean_d (a_s − t_{π(s)})² / Σ m over the
    batch's real tokens, a from plain hooks on the (perturbed) trainable model and t from plain
    hooks on the frozen model reading the twin at the aligned position π(s)."""
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    sites = ("hook_resid_post", "unembed")
    targets = rewritten_targets(model, forget, rewritten, layers=[0], sites=sites)
    method = RewrittenTransfer(RewrittenTransferConfig(layers=[0], sites=sites), 2, targets)
    trainable, _, step = _wire(model, method)
    with torch.no_grad():
        for param in trainable.parameters():
            param.add_(0.05 * torch.randn_like(param))
    sums = {"hook_resid_post": 0.0, "unembed": 0.0}
    count = 0
    for doc in batches[FORGET].rows.tolist():
        index = align_tokens(forget.ids[doc], rewritten.ids[doc]).index
        own, twin = (
            _frozen_outputs(trainable, forget.ids[doc]),
            _frozen_outputs(model, rewritten.ids[doc]),
        )
        sums["hook_resid_post"] += (
            (own["hook_resid_post"][0] - twin["hook_resid_post"][0, index]).square().mean(-1).sum()
        )
        sums["unembed"] += (own["unembed"][0] - twin["unembed"][0, index]).square().mean(-1).sum()
        count += len(forget.ids[doc])
    expected = (sums["hook_resid_post"] / count + sums["unembed"] / count) / 2
    got = _losses(method, step, batches)["forget"]
    torch.testing.assert_close(got.detach(), torch.as_tensor(expected).float(), rtol=1e-5, atol=0)


def test_rewritten_ce_at_the_first_rewrite_is_the_twins_own_ce(tiny_lm, setup):
    """Scored only at each row's first rewritten token f, the term is
    mean_rows −log softmax(logits_θ(x')[f − 1])[x'_f]: the cross-entropy of the twin itself,
    computed here by running the model on the twin (the term reads the original, whose prefix up
    to f − 1 is the same)."""
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[1])
    cfg = replace_flat(
        RewrittenTransferConfig(), layers=[1], rewritten_ce_coef=1.0, retain_coef=0.0
    )
    method = RewrittenTransfer(cfg, 2, targets)
    _, _, step = _wire(model, method)
    rows = batches[FORGET].rows.tolist()
    token_mask = torch.zeros_like(batches[FORGET].token_mask)
    expected = []
    for r, doc in enumerate(rows):
        f = _first_diff(forget.ids[doc], rewritten.ids[doc])
        token_mask[r, f] = True
        logits = _frozen_outputs(model, rewritten.ids[doc])["unembed"][0]
        expected.append(-torch.log_softmax(logits[f - 1], -1)[rewritten.ids[doc][f]])
    only_first = {**batches, FORGET: dataclasses.replace(batches[FORGET], token_mask=token_mask)}
    got = _losses(method, step, only_first)["rewritten_ce"]
    torch.testing.assert_close(got.detach(), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("retain_loss", ["kl", "nll", "l2"])
def test_every_term_carries_gradient_to_trainable_only(tiny_lm, setup, retain_loss):
    """The reference's (1−λ)·CE was a Python float; here every term, MSE at every site kind,
    rewritten CE and retain, has a grad_fn and a nonzero gradient on the trainable weights."""
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[0, 1], sites=SITES)
    cfg = replace_flat(
        RewrittenTransferConfig(), sites=SITES, rewritten_ce_coef=0.5, retain_loss=retain_loss
    )
    method = RewrittenTransfer(cfg, 2, targets)
    trainable, base, step = _wire(model, method)
    with torch.no_grad():  # move off θ0 so the retain terms have a gradient too
        for param in trainable.parameters():
            param.add_(0.02 * torch.randn_like(param))
    losses = _losses(method, step, batches)
    assert set(losses) == {"forget", "rewritten_ce", "retain"}
    for name, loss in losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), name
        assert loss.grad_fn is not None, f"{name} carries no gradient"
        grads = torch.autograd.grad(
            loss, list(trainable.parameters()), allow_unused=True, retain_graph=True
        )
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: zero gradient"
    sum(losses.values()).backward()
    assert all(p.grad is None for p in base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())


@pytest.mark.parametrize("term", ["forget", "rewritten_ce"])
def test_one_step_lowers_each_forget_term(tiny_lm, setup, term):
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[1])
    cfg = replace_flat(
        RewrittenTransferConfig(), layers=[1], rewritten_ce_coef=1.0, retain_coef=0.0
    )
    method = RewrittenTransfer(cfg, 2, targets)
    trainable, _, step = _wire(model, method)
    before = _losses(method, step, batches)[term]
    assert before > 0  # the rewrites change the activations after them and the target tokens
    before.backward()
    with torch.no_grad():
        params = [p for p in trainable.parameters() if p.grad is not None]
        norm = torch.stack([p.grad.norm() for p in params]).norm()
        for param in params:
            param.sub_(1e-3 * param.grad / norm)
    after = _losses(method, step, batches)[term]
    assert after < before, (float(after), float(before))


def test_matched_only_and_mismatches(tiny_lm, setup):
    model, _ = tiny_lm
    forget, rewritten, batches = setup
    targets = rewritten_targets(model, forget, rewritten, layers=[1])
    method = RewrittenTransfer(RewrittenTransferConfig(layers=[1], matched_only=True), 2, targets)
    _, _, step = _wire(model, method)
    assert torch.isfinite(_losses(method, step, batches)["forget"])
    covered = targets.gather(batches[FORGET], matched_only=True).covered
    for r, doc in enumerate(batches[FORGET].rows.tolist()):
        index = align_tokens(forget.ids[doc], rewritten.ids[doc]).index.tolist()
        same = [a == rewritten.ids[doc][j] for a, j in zip(forget.ids[doc], index, strict=True)]
        assert covered[r, : len(same)].tolist() == same
        assert not covered[r, len(same) :].any()
    with pytest.raises(ValueError, match="layers"):
        RewrittenTransfer(RewrittenTransferConfig(layers=[0]), 2, targets)
    with pytest.raises(ValueError, match="sites"):
        RewrittenTransfer(RewrittenTransferConfig(layers=[1], sites=("hook_mlp_out",)), 2, targets)
    with pytest.raises(ValueError, match="sites"):
        RewrittenTransferConfig(sites=())
    with pytest.raises(ValueError, match="repeats"):
        RewrittenTransferConfig(sites=("unembed", "unembed"))
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
    cfg = replace_flat(
        RewrittenTransferConfig(),
        layers=[1, 2],
        sites=("hook_mlp_out", "unembed"),
        rewritten_ce_coef=0.5,
        retain_loss="l2",
        matched_only=True,
    )
    assert from_dict(RewrittenTransferConfig, dataclasses.asdict(cfg)) == cfg
    args = ["--layers", "1", "2", "--sites", "hook_mlp_out", "unembed", "--rewritten_ce_coef"]
    args += ["0.5", "--retain_loss", "l2", "--matched_only", "true"]
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
    assert all(r["loss/forget"] > 0 and r["loss/rewritten_ce"] > 0 for r in losses)
    assert all("loss/retain" in r for r in losses)
    assert (out / "model" / "config.json").exists() and (out / "run_info.json").exists()
