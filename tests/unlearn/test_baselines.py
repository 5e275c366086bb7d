"""The standard baselines (RMU, NPO, SimNPO, gradient difference): their losses against values
derived by hand, RMU's fixed random direction and its parameter subset, and the rule that no
baseline trains on an evaluation item."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from interventions import StepGraph
from tests.unlearn.test_methods import FORGET_DOCS, MAX_LEN, RETAIN_DOCS, _context
from unlearn.config import replace_flat
from unlearn.data import Batch, PairedBatches, tokenize_documents
from unlearn.losses import (
    next_token_mask,
    next_token_nll_loss,
    npo_loss,
    simnpo_loss,
)
from unlearn.methods import FORGET, REGISTRY, RETAIN, TRAINABLE, registration
from unlearn.methods.rmu import RMU, RMUConfig, control_vector, rmu_layers
from unlearn.training import LoraSettings, OptimSettings, train_plan

BASELINES = ("rmu", "npo", "simnpo", "grad_diff")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- NPO and SimNPO: the losses -----------------------------------------------------------------


def test_npo_loss_at_hand_derived_log_ratios():
    """β = 1, summed over each sequence's masked tokens (column 0 and padding never count):

    row 0: log-ratios −½ln3, −½ln3 → Σ = ln(1/3): (2/β) log(1 + (1/3)^β) = 2 ln(4/3);
    row 1: log-ratios ln3 → Σ = ln 3:             (2/β) log(1 + 3^β)     = 2 ln 4;
    mean over rows: ln(4/3) + ln 4 = ln(16/3). It equals −(2/β) mean log σ(−β Σ r).
    Values under the mask (a 99 at padding) never count.
    """
    ln3 = math.log(3)
    ref = torch.tensor([[5.0, -1.0, -2.0, 0.0], [5.0, -1.0, 0.0, 0.0]])
    ratio = torch.tensor([[0.0, -ln3 / 2, -ln3 / 2, 99.0], [0.0, ln3, 99.0, 99.0]])
    mask = next_token_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    loss = npo_loss(ref + ratio, ref, mask, beta=1.0)
    assert float(loss) == pytest.approx(math.log(16 / 3), rel=1e-6)
    sums = [-ln3, ln3]
    by_sigmoid = sum(-2 * _log_sigmoid(-s) for s in sums) / 2
    assert float(loss) == pytest.approx(by_sigmoid, rel=1e-6)


def test_simnpo_loss_at_hand_derived_log_probs():
    """SimNPO = −(2/β) mean_b log σ(−(β/|T_b|) Σ_{t∈T_b} log p_t − γ).

    β = 1, γ = 0: row 0 has mean log-prob −ln3 (−ln3 ∓ ½): −2 log σ(ln 3) = −2 ln(3/4) = 2 ln(4/3);
    row 1 has mean log-prob 0: −2 log σ(0) = 2 ln 2; the mean is ln(4/3) + ln 2 = ln(8/3).
    β = 2, γ = 2 ln 3 on row 0 alone: −(2/2) log σ(2 ln 3 − 2 ln 3) = −log σ(0) = ln 2.
    A row with no masked token is left out; padding (99) never counts.
    The sign: the loss grows with the forget log-probabilities, so descent lowers them.
    """
    ln3 = math.log(3)
    logprobs = torch.tensor(
        [[0.0, -ln3 - 0.5, -ln3 + 0.5, 99.0], [0.0, 0.0, 99.0, 99.0], [0.0, 99.0, 99.0, 99.0]],
        requires_grad=True,
    )
    mask = next_token_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]))
    loss = simnpo_loss(logprobs, mask, beta=1.0)
    assert float(loss.detach()) == pytest.approx(math.log(8 / 3), rel=1e-6)
    row0 = simnpo_loss(logprobs[:1], mask[:1], beta=2.0, gamma=2 * ln3)
    assert float(row0.detach()) == pytest.approx(math.log(2), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert (grad[mask] > 0).all() and (grad[~mask] == 0).all()


def _forget_batch(tokens: torch.Tensor, token_mask: torch.Tensor) -> Batch:
    return Batch(tokens, torch.ones_like(tokens), token_mask.bool())


@pytest.mark.parametrize("name", ["npo", "simnpo", "grad_diff"])
def test_forget_terms_score_the_selected_forget_tokens(name):
    """Each method's forget term on given logits equals its formula on plain-torch per-token
    log-probabilities, log_softmax(z_{t−1})[x_t], over the tokens of `token_mask` (here a subset,
    as with per-token unlearning) past column 0:

    - npo: −(2/β) mean_b log σ(−β Σ_t (log p_θ − log p_ref)), β = 0.1;
    - simnpo: −(2/β) mean_b log σ(−β mean_t log p_θ − γ), β = 0.1, γ = 0;
    - grad_diff: + mean_t log p_θ (the negative NLL, minimized: gradient ascent on the NLL).
    """
    torch.manual_seed(0)
    tokens = torch.randint(7, (2, 5))
    token_mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]])
    logits, ref_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    phase = registration(name).build(registration(name).default_config(), _fake_ctx()).phases[0]
    term = next(t for t in phase.method.terms if t.name == "forget")
    acts = {"forget_logits": logits, "forget_ref_logits": ref_logits}
    value = float(term.fn(acts, _forget_batch(tokens, token_mask), None))

    def logp(z):
        return z[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]

    scored = token_mask[:, 1:].float()
    mean = (logp(logits) * scored).sum(-1) / scored.sum(-1)
    if name == "npo":
        beta = registration(name).default_config().beta  # 0.03, chosen on dev
        ratio = ((logp(logits) - logp(ref_logits)) * scored).sum(-1)
        expected = -(2 / beta) * F.logsigmoid(-beta * ratio).mean()
    elif name == "simnpo":
        expected = -(2 / 0.1) * F.logsigmoid(-0.1 * mean).mean()
    else:
        expected = (logp(logits) * scored).sum() / scored.sum()
    assert value == pytest.approx(float(expected), rel=1e-5)


def _fake_ctx():
    """A context for methods whose build reads only the step count (not the model)."""
    return _context(model=None, tokenizer=None, tmp_path=None)


def test_grad_diff_ascends_on_forget_and_descends_on_retain(tiny_lm):
    """Default gradient difference on the tiny model: the forget term is −NLL(forget) and the
    retain term +NLL(retain) (both by plain next-token NLL), each weighted 1 at every step; a
    small descent step on the forget term raises the forget NLL, one on the retain term lowers
    the retain NLL."""
    model, tokenizer = tiny_lm
    forget = tokenize_documents(tokenizer, FORGET_DOCS, max_len=MAX_LEN)
    retain = tokenize_documents(tokenizer, RETAIN_DOCS, max_len=MAX_LEN)
    forget_batch, retain_batch = PairedBatches(forget, retain, batch_size=4).at(0)
    batches = {FORGET: forget_batch, RETAIN: retain_batch}
    method = registration("grad_diff").build(registration("grad_diff").config(), _fake_ctx())
    method = method.phases[0].method
    trainable = copy.deepcopy(model).requires_grad_(True)
    step = StepGraph(list(method.nodes)).compile({TRAINABLE: trainable})

    def nll(batch):
        logits = trainable(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return float(next_token_nll_loss(logits, batch.input_ids, batch.attention_mask))

    acts = step(batches)
    terms = {t.name: t.fn(acts, forget_batch, retain_batch) for t in method.terms}
    assert {t.name: (t.weight(0.0), t.weight(1.0)) for t in method.terms} == {
        "forget": (1.0, 1.0),
        "retain": (1.0, 1.0),
    }
    with torch.no_grad():
        forget_nll, retain_nll = nll(forget_batch), nll(retain_batch)
    assert float(terms["forget"].detach()) == pytest.approx(-forget_nll, rel=1e-5)
    assert float(terms["retain"].detach()) == pytest.approx(retain_nll, rel=1e-5)
    params = list(trainable.parameters())
    original = [param.detach().clone() for param in params]
    grads = {
        key: torch.autograd.grad(terms[key], params, retain_graph=True, allow_unused=True)
        for key in terms
    }
    for key, batch, before, sign in (
        ("forget", forget_batch, forget_nll, 1.0),
        ("retain", retain_batch, retain_nll, -1.0),
    ):
        with torch.no_grad():
            for param, grad, value in zip(params, grads[key], original, strict=True):
                param.copy_(value if grad is None else value - 1e-2 * grad)
            assert sign * (nll(batch) - before) > 0, key


# --- RMU ------------------------------------------------------------------------------------------


def test_rmu_direction_is_fixed_by_its_seed_and_scaled_by_c():
    """u: uniform [0, 1) entries, normalized; the same seed gives the same u, another seed another;
    ‖c·u‖ = c, and doubling c doubles the vector."""
    first, again = control_vector(64, 6.5, seed=1), control_vector(64, 6.5, seed=1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, control_vector(64, 6.5, seed=2))
    assert float(first.norm()) == pytest.approx(6.5, rel=1e-6)
    assert (first >= 0).all()
    assert torch.allclose(control_vector(64, 13.0, seed=1), 2 * first)
    method = RMU(RMUConfig(steering_coef=6.5, direction_seed=1), n_layers=4, d_model=64)
    assert torch.equal(method.control_vec, first)


def test_rmu_terms_at_hand_values():
    """Forget: mean over the selected forget tokens of (1/d) ‖h − c·u‖²; with h = c·u + 1 at the
    selected tokens (1e3 at the others, which must not count) it is exactly 1.
    Default retain: the MSE at block ℓ only, (1/|R|) Σ_{t∈R} (1/d) ‖h − h0‖²; with h − h0 = 2 in
    every dimension of row 0 (3 retain tokens, 4 each) and 0 on row 1 (2 tokens): 12/5.
    Both weighted as configured, constant: forget 1, retain α = retain_coef."""
    cfg = RMUConfig(steering_coef=3.0)
    method = RMU(cfg, n_layers=4, d_model=8)
    forget_acts = method.control_vec.expand(2, 4, 8).clone() + 1.0
    token_mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    forget_acts[token_mask == 0] = 1e3
    forget = Batch(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), token_mask.bool())
    retain_ref = torch.randn(1, 2, 4, 8)
    retain_acts = retain_ref.clone()
    retain_acts[0, 0] += 2.0
    retain_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    retain = Batch(torch.zeros(2, 4, dtype=torch.long), retain_mask, retain_mask.bool())
    acts = {"forget_acts": forget_acts, "retain_acts": retain_acts, "retain_ref_acts": retain_ref}
    values = {t.name: float(t.fn(acts, forget, retain)) for t in method.terms}
    assert values == pytest.approx({"forget": 1.0, "retain": 12 / 5}, rel=1e-6)
    assert [n.layers for n in method.nodes if n.batch == RETAIN] == [[2], [2]]
    assert [n.site for n in method.nodes if n.batch == FORGET] == ["blocks.2.hook_resid_post"]
    weights = {t.name: (t.weight(0.0), t.weight(1.0)) for t in method.terms}
    assert weights == {"forget": (1.0, 1.0), "retain": (100.0, 100.0)}


def test_rmu_layers_default_to_the_wmdp_window_and_reject_bad_ones():
    """ℓ defaults to the middle block and the update blocks to ℓ−2..ℓ (WMDP: ℓ = 7 → 5, 6, 7)."""
    assert rmu_layers(RMUConfig(), 4) == (2, (0, 1, 2))
    assert rmu_layers(RMUConfig(), 2) == (1, (0, 1))
    assert rmu_layers(RMUConfig(layer=7), 32) == (7, (5, 6, 7))
    assert rmu_layers(RMUConfig(layer=0), 4) == (0, (0,))
    with pytest.raises(ValueError, match="RMU layer 4 is not a block of this 4-block model"):
        rmu_layers(RMUConfig(layer=4), 4)
    with pytest.raises(ValueError, match=r"--update_layers \[3\] must be blocks between 0 and"):
        rmu_layers(RMUConfig(layer=2, update_layers=[1, 3]), 4)
    with pytest.raises(ValueError, match="--layer must be a block index"):
        RMUConfig(layer=-1)
    with pytest.raises(ValueError, match="--update_params"):
        RMUConfig(update_params=[])
    with pytest.raises(ValueError, match="--steering_coef"):
        RMUConfig(steering_coef=float("nan"))


MLP = ("gpt_neox.layers.0.mlp.", "gpt_neox.layers.1.mlp.")


@pytest.mark.parametrize(
    "kwargs, use_lora, expected",
    [
        ({}, False, lambda name: name.startswith(MLP)),
        (
            {"update_layers": [1], "update_params": ["mlp.dense_4h_to_h.weight"]},
            False,
            lambda name: name == "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
        ),
        ({}, True, lambda name: name.startswith(MLP) and name.endswith(".weight")),
    ],
    ids=["default", "one-weight", "lora"],
)
def test_rmu_trains_only_the_chosen_parameters(kwargs, use_lora, expected, tiny_lm, tmp_path):
    """Three steps of the registered RMU plan through the training core (ℓ = 1 of the tiny model's
    2 blocks): exactly the chosen MLP parameters change (LoRA: the MLP linear weights its merged
    adapters touch); every other parameter is bitwise the original."""
    model, tokenizer = tiny_lm
    trained = copy.deepcopy(model)
    cfg = replace_flat(registration("rmu").default_config(), **kwargs)
    plan = registration("rmu").build(cfg, _context(trained, tokenizer, tmp_path))
    assert plan.info == {"rmu_layer": 1, "rmu_update_layers": kwargs.get("update_layers", [0, 1])}
    forget = tokenize_documents(tokenizer, FORGET_DOCS, max_len=MAX_LEN)
    retain = tokenize_documents(tokenizer, RETAIN_DOCS, max_len=MAX_LEN)
    results = train_plan(
        trained,
        plan.phases,
        PairedBatches(forget, retain, batch_size=4),
        out_dir=tmp_path / "run",
        optim=OptimSettings(lr=1e-2, warmup_steps=1),
        lora=LoraSettings(lora_rank=4) if use_lora else None,
    )
    after = dict(results[-1].model.named_parameters())
    before = dict(model.named_parameters())
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    assert changed == {name for name in before if expected(name)}


# --- training data -----------------------------------------------------------------------------


def _answer_texts(items) -> set[str]:
    """Each item's prompt followed by its correct answer, the text that states the fact."""
    return {item["prompt"] + item["choices"][item["answer"]] for item in items}


@pytest.mark.parametrize("name", BASELINES)
def test_no_baseline_trains_on_an_evaluation_item(name, tiny_home, tmp_path, monkeypatch):
    """A one-step run of each baseline through the generic recipe on the tiny world, with the
    method's `build` and the training core spied on. The documents `build` sees are the world's
    forget_attack and retain corpora, its tuning items hold no test split, and the text the
    training core batches (decoded) names no dev or test entity and states no dev or test item's
    fact. It does state some attack items' facts (seen template): the check can fail."""
    from recipes import unlearn as generic
    from unlearn import experiment
    from unlearn.toyworld.world import DEV, TEST

    seen = {}
    real_build, real_train_plan = REGISTRY[name].build, experiment.train_plan

    def build(cfg, ctx):
        seen["ctx"] = ctx
        return real_build(cfg, ctx)

    def spy_train_plan(model, phases, batches, **kwargs):
        seen["batches"] = batches
        return real_train_plan(model, phases, batches, **kwargs)

    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], build=build))
    monkeypatch.setattr(experiment, "train_plan", spy_train_plan)
    args = ["--method", name, "--world_preset", "tiny", "--num_steps", "1", "--batch_size", "4"]
    generic.main([*args, "--eval_every", "0", "--out", str(tmp_path / name)])

    world, ctx, batches = tiny_home, seen["ctx"], seen["batches"]
    assert ctx.forget_docs == world.corpus("forget_attack")
    assert ctx.retain_docs == world.corpus("retain")
    assert all(TEST not in splits for splits in ctx.items.values())
    texts = [
        ctx.tokenizer.decode(ids, skip_special_tokens=True)
        for docs in (batches.forget, batches.retain)
        for ids in docs.ids
    ]
    assert len(texts) == len(ctx.forget_docs) + len(ctx.retain_docs)
    held_out = world.items(DEV, template=None) + world.items(TEST, template=None)
    entities = {item["entity"] for item in held_out}
    facts = _answer_texts(held_out)
    assert entities and facts
    assert not [e for e in entities if any(e in text for text in texts)]
    assert not [f for f in facts if any(f in text for text in texts)]
    attack = _answer_texts(world.items("forget_attack", template="seen"))
    assert any(f in text for f in attack for text in texts)
