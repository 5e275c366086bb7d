"""Primitives: read, write, route and lens, checked against plain PyTorch forward hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from nnsight import NNsight
from torch import nn

from interventions import Write, as_envoy, capture_acts, lens, patch_acts, route
from tests.interventions.conftest import (
    CONFIGS,
    D_MODEL,
    N_LAYERS,
    blocks_of,
    hook_state,
    make_model,
)

SITES_WRITABLE = [
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_resid_post",
    "hook_embed",
    "ln_final.hook_normalized",
]


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
@pytest.mark.parametrize("site", SITES_WRITABLE)
def test_read_after_write_returns_what_was_written(arch, site, tokens):
    """Replacing a site with v makes the read at that site return v exactly."""
    model = make_model(arch)
    value = torch.randn(*tokens.shape, D_MODEL)
    acts = patch_acts(model, tokens, [Write(site, value)], sites=[site])
    assert torch.equal(acts[site], value)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("add", 2.0, lambda a: a + 2.0),
        ("scale", -3.0, lambda a: a * -3.0),
        ("zero", None, torch.zeros_like),
        ("replace", 0.5, lambda a: torch.full_like(a, 0.5)),
    ],
)
def test_write_modes(mode, value, expected, tokens):
    """add: a + v; scale: a * v; zero: 0; replace by a number: v everywhere."""
    model = make_model("gpt_neox")
    site = "blocks.0.hook_resid_post"
    clean = capture_acts(model, tokens, site)[site]
    patched = patch_acts(model, tokens, [Write(site, value, mode=mode)], sites=site)[site]
    torch.testing.assert_close(patched, expected(clean))


def test_masked_write_changes_only_masked_tokens(tokens):
    """Under a [batch pos] mask, masked positions take the value, the others keep theirs."""
    model = make_model("llama")
    site = "blocks.0.hook_resid_post"
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = True
    value = torch.randn(D_MODEL)
    clean = capture_acts(model, tokens, site)[site]
    patched = patch_acts(model, tokens, [Write(site, value, mask=mask)], sites=site)[site]
    torch.testing.assert_close(patched[mask], value.expand(2, D_MODEL))
    torch.testing.assert_close(patched[~mask], clean[~mask])


def test_write_reaches_later_sites(tokens):
    """Zero-ablating attn_out[0] of a parallel-residual block gives post[0] = pre[0] + mlp[0]
    (computed from an unpatched run), and the logits match a raw hook doing the same."""
    model = make_model("gpt_neox")
    clean = capture_acts(model, tokens, ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out"])
    patched = patch_acts(
        model,
        tokens,
        [Write("blocks.0.hook_attn_out", mode="zero")],
        sites=["blocks.0.hook_resid_post", "unembed"],
    )
    torch.testing.assert_close(
        patched["blocks.0.hook_resid_post"],
        clean["blocks.0.hook_resid_pre"] + clean["blocks.0.hook_mlp_out"],
    )
    dropout = model.gpt_neox.layers[0].post_attention_dropout
    handle = dropout.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():
        want = model(tokens).logits
    handle.remove()
    torch.testing.assert_close(patched["unembed"], want)


def test_resid_mid_is_read_only():
    with pytest.raises(ValueError, match="read but not written"):
        patch_acts(
            make_model("llama"),
            torch.ones(1, 3, dtype=torch.long),
            [Write("blocks.0.hook_resid_mid", mode="zero")],
        )


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_left_padding_matches_unpadded(arch):
    """With left padding, real tokens get positions 0.. (position ids from the mask), so a padded
    row reads the same activations at its real tokens as the same text unpadded."""
    model = make_model(arch)
    torch.manual_seed(2)
    text = torch.randint(3, 64, (1, 5))
    padded = torch.cat([torch.ones(1, 2, dtype=torch.long), text], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    sites = ["blocks.1.hook_resid_post", "unembed"]
    want = capture_acts(model, text, sites)
    got = capture_acts(model, {"input_ids": padded, "attention_mask": mask}, sites)
    for site in sites:
        torch.testing.assert_close(got[site][:, 2:], want[site], rtol=1e-4, atol=1e-5)


def test_grad_flag(tokens):
    model = make_model("gpt_neox")
    site = "blocks.1.hook_resid_post"
    assert not capture_acts(model, tokens, site)[site].requires_grad
    assert capture_acts(model, tokens, site, grad=True)[site].requires_grad


def test_early_stop_skips_later_blocks(tokens):
    """Reading block 0 runs block 0 only: a raw hook on block 1 never fires."""
    model = make_model("gpt_neox")
    calls = []
    handle = blocks_of(model)[1].register_forward_hook(lambda m, i, o: calls.append(1))
    capture_acts(model, tokens, "blocks.0.hook_resid_post")
    handle.remove()
    assert calls == []


def test_no_hooks_or_nnsight_state_remain(tokens):
    """After traces (also one that fails inside), no module has a new hook, nothing is left
    interleaving, and the plain forward gives the same logits as before."""
    model = make_model("gpt_neox")
    with torch.no_grad():
        before_logits = model(tokens).logits
    before = hook_state(model)
    envoy = as_envoy(model)
    capture_acts(envoy, tokens, ["blocks.0.hook_attn_out", "unembed"])
    patch_acts(envoy, tokens, [Write("blocks.1.hook_resid_post", mode="zero")])
    with pytest.raises(RuntimeError):
        patch_acts(envoy, tokens, [Write("blocks.0.hook_resid_post", torch.zeros(3, 3))])
    assert hook_state(model) == before
    assert not torch.nn.modules.module._global_forward_hooks
    assert not envoy.interleaver.interleaving and not envoy.interleaver.mediators
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before_logits)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_logit_lens_at_last_layer_equals_logits(arch, tokens):
    """lens(resid_post[L - 1]) = unembed(ln_final(resid_post[L - 1])) = the model's logits."""
    model = make_model(arch)
    with torch.no_grad():
        logits = model(tokens).logits
    got = lens(model, tokens, f"blocks.{N_LAYERS - 1}.hook_resid_post")
    torch.testing.assert_close(got, logits)


def test_tuned_lens_applies_translators_per_layer(tokens):
    """Tuned lens at layer l: lm_head(final_norm(A_l h_l)), with h_l from HF hidden_states[l+1]
    (l < L - 1) and the norm and head called directly."""
    model = make_model("gpt_neox")
    translators = {0: nn.Linear(D_MODEL, D_MODEL), 1: nn.Linear(D_MODEL, D_MODEL)}
    got = lens(model, tokens, "blocks.{l}.hook_resid_post", layers="all", translator=translators)
    assert got.shape == (N_LAYERS, *tokens.shape, 64)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
        want = model.lm_head(model.gpt_neox.final_layer_norm(translators[0](hidden[1])))
    torch.testing.assert_close(got[0], want)
    with pytest.raises(KeyError, match="no translator for blocks.1"):
        lens(
            model, tokens, "blocks.{l}.hook_resid_post", layers="all", translator={0: nn.Identity()}
        )


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
@pytest.mark.parametrize(
    "site",
    [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_pre",
    ],
)
def test_route_of_own_activation_is_exact(arch, site, tokens):
    """Routing a model's own activation into itself (a copy) gives exactly its own logits."""
    base = make_model(arch).requires_grad_(False)
    with torch.no_grad():
        want = base(tokens).logits
    assert torch.equal(route(base, copy.deepcopy(base), tokens, site), want)


@pytest.mark.parametrize("site", ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"])
def test_routed_gradients_reach_only_trainable_layers_up_to_site(site, tokens):
    """d(loss on routed logits) reaches the trainable embeddings and block 0 only: not block 1,
    not the trainable head, and nothing of the frozen base."""
    base = make_model("gpt_neox").requires_grad_(False)
    trainable = make_model("gpt_neox", seed=1)
    logits = route(trainable, base, tokens, site)
    torch.autograd.backward(logits.logsumexp(-1).mean())
    grads = {name for name, p in trainable.named_parameters() if p.grad is not None}
    assert "gpt_neox.embed_in.weight" in grads
    assert any(name.startswith("gpt_neox.layers.0.") for name in grads)
    assert not any(name.startswith(("gpt_neox.layers.1.", "lm_head")) for name in grads)
    assert all(p.grad is None for p in base.parameters())


def test_route_skips_the_targets_earlier_blocks(tokens):
    """Routing at resid_post[0] never runs the target's block 0 (its attention hook is silent)."""
    base = make_model("gpt_neox").requires_grad_(False)
    calls = []
    handle = base.gpt_neox.layers[0].attention.register_forward_hook(
        lambda m, i, o: calls.append(1)
    )
    route(make_model("gpt_neox", seed=1), base, tokens, "blocks.0.hook_resid_post")
    handle.remove()
    assert calls == []


def test_route_matches_raw_hooks(tokens):
    """Routed logits equal a raw-hook version: capture block 0 of the trainable model, replace
    the base's block-0 output with it in a plain forward."""
    base = make_model("llama").requires_grad_(False)
    trainable = make_model("llama", seed=1)
    got = route(trainable, base, tokens, "blocks.0.hook_resid_post")
    with torch.no_grad():
        h = trainable(tokens, output_hidden_states=True).hidden_states[1]
        handle = base.model.layers[0].register_forward_hook(lambda m, i, o: h)
        want = base(tokens).logits
        handle.remove()
    torch.testing.assert_close(got, want)


def test_envoy_inputs_are_accepted(tokens):
    """nnsight-wrapped models (NNsight, TransformersModel) work like the plain module."""
    from nnsight import TransformersModel

    from tests.interventions.conftest import make_tokenizer

    model = make_model("gpt_neox")
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    batch["attention_mask"][1, :3] = 0
    want = capture_acts(model, batch, "unembed")["unembed"]
    for wrapped in (NNsight(model), TransformersModel(model, tokenizer=make_tokenizer())):
        torch.testing.assert_close(capture_acts(wrapped, batch, "unembed")["unembed"], want)


def test_all_architectures_have_a_test_model():
    from interventions import ARCHITECTURES

    hf_rows = {key for key in ARCHITECTURES if not key.startswith("transformer_lens")}
    assert hf_rows <= set(CONFIGS)
