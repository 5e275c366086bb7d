"""Tests for unlearn.training.train: schedules and metrics, resume after a kill, NaN stops,
gradient accumulation, DDP parity (2 gloo processes on CPU), and `train_plan`'s phases that train
a subset of the parameters.

Every run trains a deep copy of the session's tiny random GPT-NeoX (`tiny_lm`) for 2 to 6 steps
into `tmp_path`. Expected losses are recomputed here from the model's logits with plain torch ops.
"""

import copy
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from interventions import Read, Write
from tests.conftest import TINY_TEXTS
from tests.ranks import start_ranks, wait_ranks
from unlearn.config import replace_flat
from unlearn.data import PairedBatches, TokenizedDocuments, tokenize_documents
from unlearn.methods import FORGET, REGISTRY, TRAINABLE, LensUnlearn, Phase, Stacked, Term
from unlearn.training import (
    METRICS_FILE,
    STATE_FILE,
    LoraSettings,
    OptimSettings,
    add_lora,
    make_optimizer,
    train,
    train_plan,
)

N_LAYERS = 2


def _method(**kwargs):
    """lens_unlearn with the exact max-entropy forget loss unless told otherwise (the hand
    computations below use it)."""
    kwargs.setdefault("forget_loss", "max_entropy")
    return LensUnlearn(replace_flat(REGISTRY["lens_unlearn"].config(), **kwargs), N_LAYERS)


def _documents(tokenizer, lengths: list[int], max_len: int = 24):
    """One document per TINY_TEXT (cycled), its text cut to the given number of characters."""
    docs = [{"text": TINY_TEXTS[i % len(TINY_TEXTS)][:n]} for i, n in enumerate(lengths)]
    return tokenize_documents(tokenizer, docs, max_len=max_len)


@pytest.fixture(scope="module")
def data(tiny_lm):
    """Forget and retain sets of unequal row lengths (batches are padded)."""
    _, tokenizer = tiny_lm
    forget = _documents(tokenizer, [12, 30, 20, 40, 16, 25])
    retain = _documents(tokenizer, [35, 10, 22, 28, 18])
    return forget, retain


def _records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()]


def _train_records(out_dir: Path) -> list[dict]:
    return [r for r in _records(out_dir) if "loss/total" in r]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_moved(trained: nn.Module, original: nn.Module) -> None:
    before = _params(original)
    assert any(not torch.equal(value, before[name]) for name, value in _params(trained).items())


def _without_readout(model: nn.Module) -> nn.Module:
    """A copy of `model` whose unembedding and final norm are zeroed (excluded from comparison)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in (model.lm_head, model.gpt_neox.final_layer_norm):
            for param in module.parameters():
                param.zero_()
    return model


def _assert_same_params(actual: nn.Module, expected: nn.Module, **tolerance) -> None:
    actual_params, expected_params = _params(actual), _params(expected)
    assert actual_params.keys() == expected_params.keys()
    for name, value in expected_params.items():
        torch.testing.assert_close(actual_params[name], value, msg=name, **tolerance)


def _max_entropy_by_hand(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean of KL(U ‖ softmax(z)) / log V = (logsumexp z − mean z) / log V − 1,
    over the positions t whose next token is selected (mask[t + 1])."""
    log_vocab = math.log(logits.shape[-1])
    per_token = (logits.logsumexp(-1) - logits.mean(-1) - log_vocab) / log_vocab
    predicting = torch.zeros_like(mask, dtype=torch.float)
    predicting[..., :-1] = mask[..., 1:].float()
    return (per_token * predicting).sum() / predicting.sum()


# --- schedules and metrics ---------------------------------------------------------------------


def test_train_logs_coefficients_losses_lr_and_evals(tiny_lm, data, tmp_path):
    """4 steps of lens_unlearn (forget 2·(1 − 0.25c), retain 3·(0.1 + 0.9c), c = step/4 with the
    0-based optimizer step, i.e. record step − 1); lr warms up linearly over 2 steps; evals at
    steps 0, 2 and 4."""
    model, _ = tiny_lm
    calls = []

    def eval_fn(trained):
        calls.append(trained.training)
        return {"calls": float(len(calls))}

    num_steps, lr = 4, 1e-4
    result = train(
        copy.deepcopy(model),
        _method(forget_coef=2.0, retain_coef=3.0),
        PairedBatches(*data, batch_size=2),
        num_steps=num_steps,
        out_dir=tmp_path,
        optim=OptimSettings(lr=lr, warmup_steps=2),
        eval_fn=eval_fn,
        eval_every=2,
        save_every=10,
    )
    records = _records(tmp_path)
    assert result.history == records
    assert calls == [False, False, False]  # evaluated in eval mode, three times
    evals = [(r["step"], r["eval/calls"]) for r in records if "eval/calls" in r]
    assert evals == [(0, 1.0), (2, 2.0), (4, 3.0)]

    trained = _train_records(tmp_path)
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    assert trained[-1]["coef/forget"] == pytest.approx(2.0 * 0.75)  # the ramp's end value
    for record in trained:
        # Progress runs from 0 at the first optimizer step to 1 at the last.
        progress = (record["step"] - 1) / (num_steps - 1)
        assert record["coef/forget"] == pytest.approx(2.0 * (1 - 0.25 * progress))
        assert record["coef/retain"] == pytest.approx(3.0 * (0.1 + 0.9 * progress))
        assert record["lr"] == pytest.approx(lr * min(1.0, record["step"] / 2))
        total = record["coef/forget"] * record["loss/forget"]
        total += record["coef/retain"] * record["loss/retain"]
        assert record["loss/total"] == pytest.approx(total, rel=1e-5)
        assert math.isfinite(record["grad_norm"])
    # Step 1 runs on θ0: the retain KL to the frozen copy is exactly 0.
    assert trained[0]["loss/retain"] == 0.0
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["step"] == num_steps


def test_first_logged_loss_matches_a_hand_computation(tiny_lm, data, tmp_path):
    """Forget term on the last layer only: the logit lens of the last block is the model's output,
    so loss/forget at step 1 is the max-entropy loss of the model's logits on the forget rows, at
    the positions that predict a selected token."""
    model, _ = tiny_lm
    batches = PairedBatches(*data, batch_size=2)
    train(
        copy.deepcopy(model),
        _method(layers=[N_LAYERS - 1]),
        batches,
        num_steps=1,
        out_dir=tmp_path,
        optim=OptimSettings(lr=1e-4),
    )
    forget, _ = batches.at(0)
    with torch.no_grad():
        logits = model(input_ids=forget.input_ids, attention_mask=forget.attention_mask).logits
    expected = _max_entropy_by_hand(logits, forget.token_mask)
    (record,) = _train_records(tmp_path)
    assert record["loss/forget"] == pytest.approx(float(expected), rel=1e-5)


def test_train_rejects_bad_arguments(tiny_lm, data, tmp_path):
    model, _ = tiny_lm
    with pytest.raises(ValueError, match="num_steps"):
        train(
            copy.deepcopy(model), _method(), PairedBatches(*data, 2), num_steps=0, out_dir=tmp_path
        )

    class Unknown(nn.Module):
        config = type("Config", (), {"model_type": "unknown_arch"})()

    with pytest.raises(ValueError, match="lora_targets"):
        add_lora(Unknown(), LoraSettings())


def test_muon_takes_matrices_and_adamw_the_rest():
    params = [
        nn.Parameter(torch.zeros(4, 3)),
        nn.Parameter(torch.zeros(3)),
        nn.Parameter(torch.zeros(50_000, 2)),
    ]
    muon, adamw = make_optimizer(params, OptimSettings(optimizer="muon", lr=0.5))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert [p is params[0] for p in muon.param_groups[0]["params"]] == [True]
    assert {id(p) for p in adamw.param_groups[0]["params"]} == {id(params[1]), id(params[2])}
    (only,) = make_optimizer(params, OptimSettings())
    assert isinstance(only, torch.optim.AdamW) and only.param_groups[0]["betas"] == (0.9, 0.95)


# --- resume after a kill ------------------------------------------------------------------------


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_resume_after_kill_matches_uninterrupted_run(
    tiny_lm, data, tmp_path, monkeypatch, use_lora
):
    """5 steps, grad_accum 2, warmup 3, saved every 2 steps, random-target CE forget term (so the
    per-step reseeding matters). The killed run dies at step 4 (after logging step 3 but with
    state saved at step 2); the rerun on a fresh copy of θ0 must end where the uninterrupted run
    ends and leave exactly one record per step."""
    model, _ = tiny_lm
    method = _method(forget_loss="random_ce", forget_coef=5.0)
    kwargs = dict(
        num_steps=5,
        optim=OptimSettings(lr=3e-3, warmup_steps=3, grad_accum=2),
        lora=LoraSettings(lora_rank=4) if use_lora else None,
        save_every=2,
    )
    batches = PairedBatches(*data, batch_size=4)
    whole = train(copy.deepcopy(model), method, batches, out_dir=tmp_path / "whole", **kwargs)

    original_at = PairedBatches.at

    def dies_at_step_4(self, step, *args, **kw):
        if step == 3:  # 0-based: the fourth optimizer step
            raise KeyboardInterrupt
        return original_at(self, step, *args, **kw)

    resumed_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(PairedBatches, "at", dies_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(model), method, batches, out_dir=resumed_dir, **kwargs)
    assert torch.load(resumed_dir / STATE_FILE, weights_only=False)["step"] == 2
    assert [r["step"] for r in _train_records(resumed_dir)] == [1, 2, 3]

    resumed = train(copy.deepcopy(model), method, batches, out_dir=resumed_dir, **kwargs)
    _assert_same_params(resumed.model, whole.model, rtol=1e-6, atol=1e-7)
    _assert_moved(whole.model, model)
    resumed_records, whole_records = _train_records(resumed_dir), _train_records(tmp_path / "whole")
    assert [r["step"] for r in resumed_records] == [1, 2, 3, 4, 5]
    for got, want in zip(resumed_records, whole_records, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    saved_whole = torch.load(tmp_path / "whole" / STATE_FILE, weights_only=False)["params"]
    saved_resumed = torch.load(resumed_dir / STATE_FILE, weights_only=False)["params"]
    torch.testing.assert_close(saved_resumed, saved_whole, rtol=1e-6, atol=1e-7)
    if use_lora:
        assert saved_whole and all("lora_" in name for name in saved_whole)


def test_kill_before_the_first_save_starts_over(tiny_lm, data, tmp_path, monkeypatch):
    """No state on disk yet: the rerun starts from step 0 and keeps one step-0 evaluation."""
    model, _ = tiny_lm
    kwargs = dict(
        num_steps=2, eval_fn=lambda m: {"one": 1.0}, save_every=10, optim=OptimSettings(lr=1e-4)
    )
    batches = PairedBatches(*data, batch_size=2)
    original_at = PairedBatches.at

    def dies_at_step_2(self, step, *args, **kw):
        if step == 1:
            raise KeyboardInterrupt
        return original_at(self, step, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(PairedBatches, "at", dies_at_step_2)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(model), _method(), batches, out_dir=tmp_path, **kwargs)
    assert not (tmp_path / STATE_FILE).exists()
    train(copy.deepcopy(model), _method(), batches, out_dir=tmp_path, **kwargs)
    assert [(r["step"], "eval/one" in r) for r in _records(tmp_path)] == [
        (0, True),
        (1, False),
        (2, False),
        (2, True),
    ]


def test_lora_init_does_not_depend_on_the_global_generator(tiny_lm, data, tmp_path):
    """Two LoRA runs from different global RNG states end equal: the adapters' random init is
    seeded by `seed` (otherwise DDP ranks, and reruns without a saved state, start apart)."""
    model, _ = tiny_lm
    results = []
    for draw in (1, 2):
        torch.manual_seed(draw)
        results.append(
            train(
                copy.deepcopy(model),
                _method(),
                PairedBatches(*data, batch_size=2),
                num_steps=1,
                out_dir=tmp_path / str(draw),
                lora=LoraSettings(lora_rank=4),
                optim=OptimSettings(lr=1e-2, warmup_steps=0),
            )
        )
    first = torch.load(tmp_path / "1" / STATE_FILE, weights_only=False)["params"]
    second = torch.load(tmp_path / "2" / STATE_FILE, weights_only=False)["params"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    _assert_same_params(results[0].model, results[1].model, rtol=0, atol=0)


def test_resume_with_other_trainable_parameters_raises(tiny_lm, data, tmp_path):
    model, _ = tiny_lm
    batches = PairedBatches(*data, batch_size=2)
    train(copy.deepcopy(model), _method(), batches, num_steps=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="other trainable parameters"):
        train(
            copy.deepcopy(model),
            _method(),
            batches,
            num_steps=2,
            out_dir=tmp_path,
            lora=LoraSettings(lora_rank=4),
        )


# --- NaN stop -----------------------------------------------------------------------------------


def test_nan_loss_stops_with_the_last_good_state_on_disk(tiny_lm, data, tmp_path):
    """A term that turns NaN at step 4 (1-based, as metrics.jsonl numbers steps); states are saved
    every 2 steps, so the state on disk is step 2, finite, and metrics stop at step 3."""
    model, _ = tiny_lm
    calls = []

    def nll_then_nan(acts, forget, retain):
        calls.append(None)
        logits = acts["logits"].float()
        loss = -logits.log_softmax(-1)[..., 0].mean()
        return loss * float("nan") if len(calls) == 4 else loss

    method = Stacked(
        nodes=(Read("logits", "unembed", model=TRAINABLE, batch=FORGET),),
        terms=(Term("forget", nll_then_nan),),
    )
    with pytest.raises(FloatingPointError) as error:
        train(
            copy.deepcopy(model),
            method,
            PairedBatches(*data, batch_size=2),
            num_steps=6,
            out_dir=tmp_path,
            save_every=2,
            optim=OptimSettings(lr=1e-3),
        )
    message = str(error.value)
    assert re.search(r"\bat step 4\b", message), message
    assert re.search(r"last good state \(step 2\)", message), message
    assert str(tmp_path) in message
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["step"] == 2 < 4
    assert all(torch.isfinite(p).all() for p in state["params"].values())
    assert [r["step"] for r in _train_records(tmp_path)] == [1, 2, 3]
    assert all(math.isfinite(r["loss/total"]) for r in _train_records(tmp_path))


# --- gradient accumulation ----------------------------------------------------------------------


def _accum_runs(model, forget, retain, root: Path):
    """Two steps of lens_unlearn (max-entropy + KL, deterministic) at grad_accum 1 and 2."""
    runs = {}
    for grad_accum in (1, 2):
        runs[grad_accum] = train(
            copy.deepcopy(model),
            _method(),
            PairedBatches(forget, retain, batch_size=4),
            num_steps=2,
            out_dir=root / f"accum{grad_accum}",
            optim=OptimSettings(lr=1e-3, warmup_steps=0, grad_accum=grad_accum),
        )
    return runs


def test_grad_accum_matches_one_batch_on_equal_token_counts(tiny_lm, tmp_path):
    """Every row truncated to 10 tokens (no padding): each micro-batch loss is a mean over the same
    number of tokens, so the mean of the 2 micro-batch means is the mean over the 4 rows, and
    grad_accum=2 takes the same step as grad_accum=1."""
    model, tokenizer = tiny_lm
    forget = _documents(tokenizer, [40] * 6, max_len=10)
    retain = _documents(tokenizer, [40] * 5, max_len=10)
    assert {len(row) for row in forget.ids + retain.ids} == {10}
    runs = _accum_runs(model, forget, retain, tmp_path)
    # The lens decodes through a frozen readout, so at step 1 the unembedding and final norm get
    # only the KL retain term's gradient, which is zero at θ0 up to rounding (~1e-10); Adam turns
    # rounding noise into steps of a few percent of lr, different for each split of the batch.
    # Every other parameter's step must match.
    _assert_same_params(
        _without_readout(runs[2].model), _without_readout(runs[1].model), rtol=1e-5, atol=1e-6
    )
    for got, want in zip(
        _train_records(tmp_path / "accum2"), _train_records(tmp_path / "accum1"), strict=True
    ):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_grad_accum_weights_micro_batches_not_tokens(tiny_lm, data, tmp_path):
    """With unequal token counts the two differ, by design: grad_accum=2 averages the two
    micro-batch means (each weighs 1/2), grad_accum=1 averages over all tokens of the 4 rows.

    The forget rows are laid out so that micro-batch 0 holds two long rows and micro-batch 1 two
    short ones. Checked on loss/forget at step 1 (θ0), restricted to the last layer so that it is
    the max-entropy loss of the model's own logits; the unembedding is scaled by 30 so that
    per-token losses vary."""
    model = copy.deepcopy(tiny_lm[0])
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    tokenizer, (_, retain) = tiny_lm[1], data
    four = TokenizedDocuments([[0]] * 4, [[False]] * 4, pad_id=1)
    order, _ = PairedBatches(four, retain, batch_size=4).rows_at(0)  # depends on counts only
    lengths = [0] * 4
    for position, doc in enumerate(order):
        lengths[doc] = 60 if position < 2 else 4
    forget = _documents(tokenizer, lengths)
    batches = PairedBatches(forget, retain, batch_size=4)
    for grad_accum in (1, 2):
        train(
            copy.deepcopy(model),
            _method(layers=[N_LAYERS - 1]),
            batches,
            num_steps=1,
            out_dir=tmp_path / f"accum{grad_accum}",
            optim=OptimSettings(lr=1e-3, grad_accum=grad_accum),
        )
    batch, _ = batches.at(0)
    assert batch.token_mask[:2].sum() > 5 * batch.token_mask[2:].sum()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    token_mean = _max_entropy_by_hand(logits, batch.token_mask)
    micro_means = [_max_entropy_by_hand(logits[r], batch.token_mask[r]) for r in ([0, 1], [2, 3])]
    (one,) = _train_records(tmp_path / "accum1")
    (two,) = _train_records(tmp_path / "accum2")
    assert one["loss/forget"] == pytest.approx(float(token_mean), rel=1e-5)
    assert two["loss/forget"] == pytest.approx(float(sum(micro_means) / 2), rel=1e-5)
    assert one["loss/forget"] != pytest.approx(two["loss/forget"], rel=1e-3)


# --- DDP parity ---------------------------------------------------------------------------------

DDP_STEPS = 3


def _ddp_run(root: Path, grad_accum: int):
    """What every process runs: load the saved model and data, train, save the final weights."""
    model = torch.load(root / "model.pt", weights_only=False)
    forget, retain = torch.load(root / "data.pt", weights_only=False)
    return train(
        model,
        _method(),
        PairedBatches(forget, retain, batch_size=4),
        num_steps=DDP_STEPS,
        out_dir=root / f"accum{grad_accum}",
        optim=OptimSettings(lr=3e-3, warmup_steps=0, grad_accum=grad_accum),
        desc="ddp",
    )


def ddp_worker(root: str) -> None:
    """Entry point of each torchrun-style process (RANK, WORLD_SIZE, MASTER_* in the env)."""
    import torch.distributed as dist

    result = _ddp_run(Path(root), grad_accum=1)
    torch.save(result.model.state_dict(), Path(root) / f"final_rank{os.environ['RANK']}.pt")
    dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process_with_grad_accum(tiny_lm, data, tmp_path):
    """2 gloo ranks x grad_accum 1 on a global batch of 4 == 1 process x grad_accum 2: the same
    micro-batches (rank r's rows are micro-batch r's), gradients averaged across ranks, metrics
    averaged too. Compares rank 0's metrics.jsonl and the final weights of both ranks."""
    model, _ = tiny_lm
    # A fresh module (not the fixture itself, which other tests may have wrapped with nnsight,
    # leaving unpicklable hooks on it).
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    torch.save(fresh, tmp_path / "model.pt")
    torch.save(data, tmp_path / "data.pt")
    code = "import sys; from tests.unlearn.test_training import ddp_worker; ddp_worker(sys.argv[1])"
    procs = start_ranks(code, [str(tmp_path)])
    single = _ddp_run(tmp_path, grad_accum=2)  # while the ranks run
    wait_ranks(procs, timeout=180)

    ddp_records = _train_records(tmp_path / "accum1")
    single_records = _train_records(tmp_path / "accum2")
    assert [r["step"] for r in ddp_records] == list(range(1, DDP_STEPS + 1))
    for got, want in zip(ddp_records, single_records, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    expected = _params(single.model)
    for rank in range(2):
        final = torch.load(tmp_path / f"final_rank{rank}.pt", weights_only=True)
        # AdamW divides by the root of tiny second moments: a reduction order's 1e-7 changes in
        # a near-zero gradient move a few weights by ~1e-6 in 3 steps.
        torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-5)
    _assert_moved(single.model, model)


# --- phases that train a subset of the parameters ----------------------------------------------


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_a_phase_trains_only_the_block_parameters_its_patterns_match(
    use_lora, tiny_lm, data, tmp_path
):
    """`Phase(parameters=("attention.*",))` without `blocks`: in every block only the attention
    parameters change (LoRA: the attention linear layers' weights, where the merged adapters sit);
    embeddings, MLPs, norms, the final norm and the unembedding stay bitwise the original, and no
    parameter requires grad afterwards."""
    model, _ = tiny_lm
    phase = Phase(_method(), num_steps=2, parameters=("attention.*",))
    results = train_plan(
        copy.deepcopy(model),
        [phase],
        PairedBatches(*data, batch_size=2),
        out_dir=tmp_path,
        optim=OptimSettings(lr=1e-2, warmup_steps=1),
        lora=LoraSettings(lora_rank=4) if use_lora else None,
    )
    before, after = dict(model.named_parameters()), dict(results[-1].model.named_parameters())
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    attention = {name for name in before if ".attention." in name}
    if use_lora:
        attention = {name for name in attention if name.endswith(".weight")}
    assert changed == attention and len({name.split(".")[2] for name in changed}) == N_LAYERS
    assert not any(p.requires_grad for p in results[-1].model.parameters())


def test_parameter_patterns_that_match_nothing_are_a_clear_error(tiny_lm, data, tmp_path):
    model, _ = tiny_lm
    batches = PairedBatches(*data, batch_size=2)
    typo = Phase(_method(), num_steps=1, blocks=(0,), parameters=("mlp.fc.*",))
    with pytest.raises(ValueError, match=r"no parameter of block 0 .* matches \['mlp.fc.\*'\]"):
        train_plan(copy.deepcopy(model), [typo], batches, out_dir=tmp_path / "typo")
    norms = Phase(_method(), num_steps=1, blocks=(0,), parameters=("input_layernorm.*",))
    with pytest.raises(ValueError, match="no LoRA target .* has a weight matching"):
        train_plan(
            copy.deepcopy(model),
            [norms],
            batches,
            out_dir=tmp_path / "norms",
            lora=LoraSettings(lora_rank=4),
        )


# --- activation checkpointing ------------------------------------------------------------------


def test_activation_checkpointing_recomputes_blocks_to_the_same_losses_and_weights(
    tiny_lm, data, tmp_path, monkeypatch
):
    """With `activation_checkpointing` every block's forward runs again in the backward pass (its
    MLP's forward calls counted), and the run logs the same losses and gradient norms and ends
    with the same weights as without it; a method writing into the trained model refuses it."""
    model, _ = tiny_lm
    calls, results = {}, {}
    mlp = type(type(model)(model.config).gpt_neox.layers[0].mlp)  # the class, as constructed
    forward = mlp.forward
    for flag in (False, True):
        # A fresh module, not a copy of the fixture: another test's nnsight wrapping may have left
        # its own forward on the fixture's modules, which the class-level count would miss.
        fresh = type(model)(model.config)
        fresh.load_state_dict(model.state_dict())
        count = []

        def counted(self, *args, count=count, **kwargs):
            count.append(1)
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(mlp, "forward", counted)
        results[flag] = train(
            fresh,
            _method(),
            PairedBatches(*data, batch_size=2),
            num_steps=2,
            out_dir=tmp_path / str(flag),
            optim=OptimSettings(lr=1e-2, warmup_steps=0, activation_checkpointing=flag),
        )
        calls[flag] = len(count)
        monkeypatch.setattr(mlp, "forward", forward)
    assert calls[True] > calls[False] > 0
    for got, want in zip(
        _train_records(tmp_path / "True"), _train_records(tmp_path / "False"), strict=True
    ):
        assert got == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(_params(results[True].model), _params(results[False].model))
    _assert_moved(results[True].model, model)

    writing = Stacked(
        nodes=(
            *_method().nodes,
            Write("blocks.0.hook_resid_post", mode="add", value=0.0, model=TRAINABLE, batch=FORGET),
        ),
        terms=_method().terms,
    )
    with pytest.raises(ValueError, match="activation_checkpointing"):
        train(
            copy.deepcopy(model),
            writing,
            PairedBatches(*data, batch_size=2),
            num_steps=1,
            out_dir=tmp_path / "writes",
            optim=OptimSettings(activation_checkpointing=True),
        )
