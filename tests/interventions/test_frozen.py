"""Frozen views: a LoRA model with its adapters disabled, in a step graph, reads and routes exactly
like a frozen copy of the model made before the adapters were added."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from interventions import FrozenView, Lens, Read, Route, StepGraph, describe_model, resolve_site
from interventions.frozen import eval_mode
from tests.interventions.conftest import D_MODEL, N_LAYERS, ROPE, VOCAB

NODES = [
    Read("acts", "blocks.{l}.hook_resid_post", layers="all", model="trainable", batch="forget"),
    Read("ref_acts", "blocks.{l}.hook_resid_post", layers="all", model="base", batch="forget"),
    Read("ref_logits", "unembed", model="base", batch="retain"),
    Lens("ref_lens", "blocks.0.hook_resid_post", model="base", batch="forget"),
    Route("routed", "blocks.0.hook_resid_post", source="trainable", target="base", batch="forget"),
]
"""Reads on both models, a lens on the base, and the trainable model's block 0 routed through the
base's later blocks (sequential unlearning)."""


def _dropout_model() -> nn.Module:
    """A tiny GPT-NeoX whose attention and hidden dropout are on (p = 0.3)."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        rope_parameters=ROPE,
        attention_dropout=0.3,
        hidden_dropout=0.3,
    )
    return GPTNeoXForCausalLM(config)


def _lora(model: nn.Module) -> nn.Module:
    """LoRA with dropout on every linear layer of the blocks, B moved off zero (the adapters
    change the output), in train mode."""
    from peft import LoraConfig, get_peft_model

    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.3, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn_like(param))
    return peft_model.train()


def test_sites_resolve_through_a_view_onto_the_shared_modules():
    peft_model = _lora(_dropout_model())
    view = FrozenView(peft_model, peft_model.disable_adapter)
    assert describe_model(view).prefix == "module.base_model.model."
    site = resolve_site(view, "blocks.1.hook_resid_post")
    assert view.get_submodule(site.path) is peft_model.base_model.model.gpt_neox.layers[1]


def test_a_view_with_adapters_disabled_reads_and_routes_as_a_frozen_copy(tokens):
    """Same seed, same batches: every result equals the one with a frozen copy as "base" (made
    before the adapters, eval mode), although the shared model is in train mode with attention,
    hidden and LoRA dropout on. Base reads carry no graph, the routed logits do, and the
    gradients they send to the adapters are the same; afterwards every module is back in train
    mode and every adapter still trains."""
    model = _dropout_model()
    frozen_copy = copy.deepcopy(model).eval().requires_grad_(False)
    peft_model = _lora(model)
    view = FrozenView(peft_model, peft_model.disable_adapter)
    batches = {"forget": tokens, "retain": tokens.flip(1)}
    adapters = [p for p in peft_model.parameters() if p.requires_grad]
    results = []
    for base in (frozen_copy, view):
        step = StepGraph(NODES).compile({"trainable": peft_model, "base": base})
        torch.manual_seed(3)
        out = step(batches)
        loss = out["acts"].pow(2).mean() + out["routed"].logsumexp(-1).mean()
        results.append((out, torch.autograd.grad(loss, adapters, allow_unused=True)))
        assert all(module.training for module in peft_model.modules())
        assert all(p.requires_grad for p in adapters)
    (copied, copied_grads), (viewed, viewed_grads) = results
    assert copied.keys() == viewed.keys()
    for key in copied:
        assert torch.equal(copied[key], viewed[key]), key
    for key in ("ref_acts", "ref_logits", "ref_lens"):
        assert not viewed[key].requires_grad, key
    assert viewed["routed"].requires_grad
    assert sum(g is not None for g in viewed_grads) > 0
    for copied_grad, viewed_grad in zip(copied_grads, viewed_grads, strict=True):
        assert (copied_grad is None) == (viewed_grad is None)
        assert viewed_grad is None or torch.equal(copied_grad, viewed_grad)


def test_the_view_runs_in_eval_mode_and_restores_each_flag_even_on_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4)).train()
    model[2].eval()  # a mixed model: each flag comes back as it was
    x = torch.randn(8, 4)
    with torch.no_grad():
        assert torch.equal(FrozenView(model)(x), model[2](model[0](x)))
    assert [m.training for m in model.modules()] == [True, True, True, False]
    failing = FrozenView(nn.Sequential(model, nn.Linear(3, 3)))
    with pytest.raises(RuntimeError):
        failing(x)
    assert [m.training for m in model.modules()] == [True, True, True, False]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[2].training


def test_a_views_own_traces_record_no_autograd_graph(tokens):
    """A view counts as frozen although the adapters it shares train: its traces run under
    no_grad, as a frozen copy's do (only a routed activation with a gradient turns it on)."""
    peft_model = _lora(_dropout_model())
    seen = []
    block = peft_model.base_model.model.gpt_neox.layers[1]
    hook = block.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        view = FrozenView(peft_model, peft_model.disable_adapter)
        StepGraph([Read("ref", "unembed", model="base")]).run({"base": view}, {"batch": tokens})
        StepGraph([Read("acts", "unembed", model="lora")]).run(
            {"lora": peft_model}, {"batch": tokens}
        )
    finally:
        hook.remove()
    assert seen == [False, True]
