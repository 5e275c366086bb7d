"""TransformerLens 4 bridges resolve the same site names and give the same numbers as HF."""

from __future__ import annotations

import copy

import pytest
import torch

from interventions import (
    Write,
    bridge_from_hf,
    capture_acts,
    describe_model,
    is_bridge,
    lens,
    patch_acts,
    route,
    site_names,
)
from tests.interventions.conftest import D_MODEL, make_model, make_tokenizer

ATOL = dict(rtol=1e-5, atol=1e-5)  # the bridge forces eager attention; HF defaults to SDPA


@pytest.fixture(scope="module")
def pair():
    """A tiny GPT-NeoX and a TransformerLens bridge over a copy of it (the bridge takes over the
    modules of the model it wraps)."""
    hf = make_model("gpt_neox").requires_grad_(False)
    bridge = bridge_from_hf(copy.deepcopy(hf), make_tokenizer())
    return hf, bridge


def test_bridge_is_recognised(pair):
    hf, bridge = pair
    assert is_bridge(bridge) and not is_bridge(hf)
    assert describe_model(bridge).parallel_residual
    assert site_names(bridge) == site_names(hf)


def test_every_site_agrees(pair, tokens):
    hf, bridge = pair
    sites = site_names(hf)
    want = capture_acts(hf, tokens, sites, layers="all")
    got = capture_acts(bridge, tokens, sites, layers="all")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **ATOL)


def test_patch_lens_and_route_agree(pair, tokens):
    hf, bridge = pair
    value = torch.randn(D_MODEL)
    writes = [Write("blocks.0.hook_attn_out", value, mode="add")]
    torch.testing.assert_close(
        patch_acts(bridge, tokens, writes)["unembed"],
        patch_acts(hf, tokens, writes)["unembed"],
        **ATOL,
    )
    torch.testing.assert_close(
        lens(bridge, tokens, "blocks.{l}.hook_resid_post", layers="all"),
        lens(hf, tokens, "blocks.{l}.hook_resid_post", layers="all"),
        **ATOL,
    )
    trainable = make_model("gpt_neox", seed=1)
    torch.testing.assert_close(
        route(trainable, bridge, tokens, "blocks.0.hook_resid_post"),
        route(trainable, hf, tokens, "blocks.0.hook_resid_post"),
        **ATOL,
    )
