"""Site names: the hidden_states convention per architecture, layer selection, wrappers, errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from interventions import capture_acts, describe_model, expand_layers, resolve_site, site_names
from interventions.sites import resolve_sites
from tests.interventions.conftest import CONFIGS, N_LAYERS, blocks_of, make_model

ALL_SITES = [
    "hook_embed",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.hook_resid_post",
    "ln_final.hook_normalized",
    "unembed",
]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hidden_states_convention(arch, tokens):
    """resid_pre[l] = hidden_states[l]; resid_post[l] = hidden_states[l + 1] for l < L - 1.

    HF's last entry has the final norm applied: hidden_states[L] = ln_final.hook_normalized, and
    resid_post[L - 1] is the raw output of the last block (read here with a plain forward hook).
    The logits site equals the model's logits.
    """
    model = make_model(arch)
    last = {}
    handle = blocks_of(model)[-1].register_forward_hook(lambda m, i, o: last.setdefault("out", o))
    with torch.no_grad():
        ref = model(tokens, output_hidden_states=True)
    handle.remove()
    hidden = ref.hidden_states
    assert len(hidden) == N_LAYERS + 1

    acts = capture_acts(model, tokens, ALL_SITES, layers="all")
    for layer in range(N_LAYERS):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    torch.testing.assert_close(acts[f"blocks.{N_LAYERS - 1}.hook_resid_post"], last["out"])
    torch.testing.assert_close(acts["ln_final.hook_normalized"], hidden[-1])
    torch.testing.assert_close(acts["unembed"], ref.logits)
    assert acts["hook_embed"].shape == hidden[0].shape


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_block_sites_add_up(arch, tokens):
    """The residual stream is the sum of what the block sites say is added to it.

    Parallel blocks: post = pre + attn_out + mlp_out. Sequential blocks: mid = pre + attn_out and
    post = mid + mlp_out.
    """
    model = make_model(arch)
    parallel = describe_model(model).parallel_residual
    sites = [s for s in site_names(model) if s.startswith("blocks")]
    acts = capture_acts(model, tokens, sites, layers="all")
    for layer in range(N_LAYERS):
        pre, post = (acts[f"blocks.{layer}.hook_resid_{k}"] for k in ("pre", "post"))
        attn, mlp = (acts[f"blocks.{layer}.hook_{k}_out"] for k in ("attn", "mlp"))
        if parallel:
            torch.testing.assert_close(post, pre + attn + mlp)
        else:
            mid = acts[f"blocks.{layer}.hook_resid_mid"]
            torch.testing.assert_close(mid, pre + attn)
            torch.testing.assert_close(post, mid + mlp)
    assert parallel == (arch == "gpt_neox")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(1, [1]), (-1, [3]), ([0, -2], [0, 2]), (range(1, 3), [1, 2]), ("all", [0, 1, 2, 3])],
)
def test_expand_layers(spec, expected):
    assert expand_layers(spec, n_layers=4) == expected


@pytest.mark.parametrize(
    ("spec", "error"),
    [(4, IndexError), (-5, IndexError), ([], ValueError), ("first", TypeError), ([1.0], TypeError)],
)
def test_expand_layers_errors(spec, error):
    """Out of range says the valid range; a wrong type is a TypeError (also under beartype)."""
    with pytest.raises(error, match="0..3|empty|must be|Type-check"):
        expand_layers(spec, n_layers=4)


def test_resolve_site_paths():
    model = make_model("gpt_neox")
    site = resolve_site(model, "blocks.-1.hook_resid_post")
    assert (site.name, site.path, site.attr, site.layer) == (
        "blocks.1.hook_resid_post",
        "gpt_neox.layers.1",
        "output",
        1,
    )
    llama_attn = resolve_site(make_model("llama"), "blocks.0.hook_attn_out")
    assert (llama_attn.path, llama_attn.index) == ("model.layers.0.self_attn", 0)
    names = [s.name for s in resolve_sites(model, "blocks.{l}.hook_mlp_out", layers="all")]
    assert names == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


def test_site_order_follows_the_forward_pass():
    model = make_model("llama")
    names = [
        "unembed",
        "blocks.1.hook_resid_pre",
        "blocks.0.hook_mlp_out",
        "hook_embed",
        "blocks.0.hook_resid_mid",
        "ln_final.hook_normalized",
        "blocks.0.hook_attn_out",
    ]
    ordered = sorted(names, key=lambda name: resolve_site(model, name).order)
    assert ordered == [
        "hook_embed",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_mlp_out",
        "blocks.1.hook_resid_pre",
        "ln_final.hook_normalized",
        "unembed",
    ]


def test_unknown_site_lists_the_sites():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match=r"Unknown site 'blocks.0.hook_resid'.*hook_resid_pre"):
        resolve_site(model, "blocks.0.hook_resid")
    with pytest.raises(ValueError, match=r"Unknown site 'logits'.*unembed"):
        resolve_site(model, "logits")


def test_out_of_range_layer_says_the_range():
    with pytest.raises(IndexError, match=r"2 blocks, so layers are 0..1"):
        resolve_site(make_model("gpt_neox"), "blocks.2.hook_resid_post")


def test_template_and_layers_go_together():
    model = make_model("gpt_neox")
    with pytest.raises(ValueError, match="needs a layer selection"):
        resolve_sites(model, "blocks.{l}.hook_resid_post")
    with pytest.raises(ValueError, match="concrete site"):
        resolve_sites(model, "blocks.0.hook_resid_post", layers=[0])


def test_resid_mid_on_parallel_residual_is_a_clear_error():
    with pytest.raises(ValueError, match="parallel residual"):
        resolve_site(make_model("gpt_neox"), "blocks.0.hook_resid_mid")
    assert "blocks.{l}.hook_resid_mid" not in site_names(make_model("gpt_neox"))
    assert "blocks.{l}.hook_resid_mid" in site_names(make_model("gpt_neox_sequential"))


def test_unknown_architecture_lists_the_known_ones():
    class Mamba(nn.Module):
        config = SimpleNamespace(model_type="mamba")

    with pytest.raises(ValueError, match=r"model_type='mamba'.*gpt2, gpt_neox, llama"):
        describe_model(Mamba())
    with pytest.raises(ValueError, match="No site table row for Sequential"):
        describe_model(nn.Sequential(nn.Linear(2, 2)))


def test_bare_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="pass the causal LM"):
        describe_model(make_model("llama").model)


def test_peft_model_resolves_the_same_sites(tokens):
    """A LoRA-wrapped model (LoRA B = 0 at init, so the same function) gives the same activations
    at the same site names, found under base_model.model."""
    from peft import LoraConfig, get_peft_model

    model = make_model("gpt_neox")
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["query_key_value", "dense_4h_to_h"])
    )
    site = resolve_site(peft_model, "blocks.1.hook_resid_post")
    assert site.path == "base_model.model.gpt_neox.layers.1"
    sites = ["blocks.{l}.hook_resid_post", "unembed"]
    want = capture_acts(model, tokens, sites, layers="all")
    got = capture_acts(peft_model, tokens, sites, layers="all")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_ddp_model_resolves_the_same_sites(tokens, tmp_path):
    """A DDP-wrapped model (gloo, world size 1) resolves sites under module. with equal values."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = make_model("gpt_neox")
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        assert resolve_site(ddp, "unembed").path == "module.lm_head"
        want = capture_acts(model, tokens, ["blocks.0.hook_resid_post", "unembed"])
        got = capture_acts(ddp, tokens, ["blocks.0.hook_resid_post", "unembed"])
        for name in want:
            torch.testing.assert_close(got[name], want[name])
    finally:
        dist.destroy_process_group()
