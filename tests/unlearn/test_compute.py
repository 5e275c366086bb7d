"""Compute accounting: FLOP counts against hand formulas, and the training core's counts."""

import json

import torch
from transformers import GPTNeoXForCausalLM

from unlearn.compute import FlopCount, pretraining_flops, step_flops
from unlearn.toyworld.config import get_preset
from unlearn.toyworld.pretrain import neox_config


def test_flop_count_scopes_add_and_exclude():
    """A [4, 5] @ [5, 6] matmul is 2 * 4 * 5 * 6 = 240 FLOPs; nested scopes count in both."""
    a, b = torch.ones(4, 5), torch.ones(5, 6)
    count = FlopCount()
    with count.scope("outer"):
        a @ b
        with count.scope("inner"):
            a @ b
    assert count.flops == {"flops_outer": 480, "flops_inner": 240}
    assert count.run("outer", torch.matmul, a, b).shape == (4, 6)
    assert count.flops["flops_outer"] == 720
    count.exclude("outer", "inner")
    assert count.flops == {"flops_outer": 480}
    disabled = FlopCount(enabled=False)
    with disabled.scope("x"):
        a @ b
    assert disabled.flops == {}


def _step_flops_by_hand(d, layers, d_mlp, vocab, batch, ctx):
    """Matmul FLOPs of one GPT-NeoX training step. Forward, per token: every layer's QKV (3d^2),
    output (d^2) and MLP (2 d d_mlp) weights twice (multiply-add), the unembedding 2 d V; the
    backward pass twice that (input and weight gradients). Attention: scores and weighted sum,
    2 * ctx * d each per token and layer (the full square: the causal mask is not discounted),
    and 2.5 x that backward (the four gradient matmuls and the recomputed scores)."""
    weights = layers * 2 * (4 * d * d + 2 * d * d_mlp) + 2 * d * vocab
    attention = layers * 2 * 2 * ctx * d
    return batch * ctx * (3 * weights + 3.5 * attention)


def test_a_training_step_by_hand():
    d, layers, heads, d_mlp, vocab, batch, ctx = 32, 2, 2, 64, 384, 3, 16
    config = neox_config(
        vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_mlp=d_mlp, n_ctx=ctx
    )
    model = GPTNeoXForCausalLM(config)
    ids = torch.randint(2, vocab, (batch, ctx))
    assert step_flops(model, ids) == _step_flops_by_hand(d, layers, d_mlp, vocab, batch, ctx)
    assert all(p.grad is None for p in model.parameters())


def test_pretraining_flops_is_one_step_times_the_schedule():
    cfg = get_preset("tiny")
    config = neox_config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        n_ctx=cfg.n_ctx,
    )
    model = GPTNeoXForCausalLM(config)
    step = _step_flops_by_hand(
        cfg.d_model, cfg.n_layers, cfg.d_mlp, cfg.vocab_size, cfg.batch_size, cfg.n_ctx
    )
    assert pretraining_flops(model, cfg) == step * cfg.num_steps


def test_a_run_counts_training_without_its_evaluations(tiny_home, tmp_path):
    """--count_flops writes flops_prepare/flops_train; evaluating every step changes neither."""
    from recipes import unlearn as generic

    counts = []
    for eval_every in ("0", "1"):
        out = tmp_path / f"eval{eval_every}"
        args = ["--method", "grad_diff", "--world_preset", "tiny", "--out", str(out)]
        args += ["--num_steps", "2", "--batch_size", "4", "--eval_every", eval_every]
        generic.main([*args, "--count_flops", "true"])
        results = json.loads((out / "results.json").read_text())
        counts.append((results["flops_prepare"], results["flops_train"]))
    assert counts[0] == counts[1]
    assert counts[0][0] == 0 and counts[0][1] > 0
