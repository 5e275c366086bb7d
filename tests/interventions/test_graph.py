"""Step graphs: planning into traces, grad handling, results, and equivalence with raw hooks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from interventions import Lens, Read, Route, StepGraph, Write
from tests.interventions.conftest import D_MODEL, N_LAYERS, blocks_of, make_model


@pytest.fixture
def models():
    """A trainable model and a frozen copy of a slightly different one (so losses are non-zero)."""
    return {
        "trainable": make_model("gpt_neox", seed=1),
        "base": make_model("gpt_neox").requires_grad_(False),
    }


@pytest.fixture
def batches(tokens):
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    keyword = torch.zeros_like(tokens, dtype=torch.bool)
    keyword[:, 3] = True
    return {
        "forget": {"input_ids": tokens, "attention_mask": mask, "token_mask": keyword},
        "retain": {"input_ids": tokens.flip(0)},
    }


def test_one_trace_per_model_and_batch_routes_after_their_source(models, batches):
    graph = StepGraph(
        [
            Route(
                "routed",
                "blocks.0.hook_resid_post",
                source="trainable",
                target="base",
                batch="forget",
            ),
            Read(
                "acts",
                "blocks.{l}.hook_resid_post",
                layers="all",
                model="trainable",
                batch="forget",
            ),
            Read("ref", "blocks.0.hook_resid_post", model="base", batch="forget"),
            Read("retain_logits", "unembed", model="trainable", batch="retain"),
            Lens("lens", "blocks.0.hook_resid_post", model="trainable", batch="forget"),
        ]
    )
    step = graph.compile(models)
    assert step.traces == [
        ("trainable", "forget"),
        ("base", "forget"),
        ("base", "forget"),
        ("trainable", "retain"),
    ]
    out = step(batches)
    assert set(out) == {"routed", "acts", "ref", "retain_logits", "lens", "forget/attention_mask"}
    assert out["acts"].shape == (N_LAYERS, 2, 7, D_MODEL)
    assert out["routed"].shape == out["lens"].shape == (2, 7, 64)
    assert out["forget/attention_mask"] is batches["forget"]["attention_mask"]


def test_frozen_traces_run_without_grad(models, batches):
    """Reads on a frozen model carry no graph; reads on the trainable one and routed outputs do;
    grad=False detaches."""
    out = StepGraph(
        [
            Read("ref", "blocks.1.hook_resid_post", model="base", batch="forget"),
            Read("acts", "blocks.1.hook_resid_post", model="trainable", batch="forget"),
            Read(
                "detached",
                "blocks.0.hook_resid_post",
                model="trainable",
                batch="forget",
                grad=False,
            ),
            Route(
                "routed",
                "blocks.0.hook_resid_post",
                source="trainable",
                target="base",
                batch="forget",
            ),
        ]
    ).run(models, batches)
    assert not out["ref"].requires_grad and not out["detached"].requires_grad
    assert out["acts"].requires_grad and out["routed"].requires_grad
    with torch.no_grad():
        out = StepGraph([Read("acts", "unembed", model="trainable")]).run(
            models, {"batch": batches["retain"]}
        )
    assert not out["acts"].requires_grad


def test_mse_step_equals_raw_hooks(models, batches):
    """Masked MSE between trainable and frozen block-1 outputs, and its gradients, equal the same
    math computed with raw forward hooks."""
    trainable, base = models["trainable"], models["base"]
    forget = batches["forget"]
    mask = forget["attention_mask"].bool()

    step = StepGraph(
        [
            Read("acts", "blocks.1.hook_resid_post", model="trainable", batch="forget"),
            Read("ref", "blocks.1.hook_resid_post", model="base", batch="forget"),
        ]
    ).compile(models)
    out = step(batches)
    loss = F.mse_loss(out["acts"][mask], out["ref"][mask])
    torch.autograd.backward(loss)
    got = {n: p.grad.clone() for n, p in trainable.named_parameters() if p.grad is not None}
    trainable.zero_grad(set_to_none=True)

    captured = {}
    handles = [
        blocks_of(m)[1].register_forward_hook(lambda mod, i, o, k=k: captured.setdefault(k, o))
        for k, m in (("acts", trainable), ("ref", base))
    ]
    position_ids = (forget["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(attention_mask=forget["attention_mask"], position_ids=position_ids)
    with torch.no_grad():
        base(forget["input_ids"], **kwargs)
    trainable(forget["input_ids"], **kwargs)
    for handle in handles:
        handle.remove()
    want_loss = F.mse_loss(captured["acts"][mask], captured["ref"][mask])
    torch.autograd.backward(want_loss)
    want = {n: p.grad for n, p in trainable.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_write_uses_another_models_read(models, batches):
    """Patch the base's block-0 output with the trainable model's, under the keyword mask: the
    base's block-0 read then equals trainable where the mask is set, base elsewhere."""
    out = StepGraph(
        [
            Read("h", "blocks.0.hook_resid_post", model="trainable", batch="forget"),
            Write(
                "blocks.0.hook_resid_post",
                value="h",
                mask="token_mask",
                model="base",
                batch="forget",
            ),
            Read("patched", "blocks.0.hook_resid_post", model="base", batch="forget"),
        ]
    ).run(models, batches)
    keyword = batches["forget"]["token_mask"]
    torch.testing.assert_close(out["patched"][keyword], out["h"][keyword].detach())
    base_own = StepGraph([Read("x", "blocks.0.hook_resid_post")]).run(
        {"model": models["base"]}, {"batch": batches["forget"]}
    )["x"]
    torch.testing.assert_close(out["patched"][~keyword], base_own[~keyword])


def test_write_from_a_run_time_value(models, batches):
    step = StepGraph(
        [
            Write("blocks.0.hook_resid_post", value="control", mode="add", model="trainable"),
            Read("h", "blocks.0.hook_resid_post", model="trainable"),
        ]
    ).compile(models)
    control = torch.randn(D_MODEL)
    plain = StepGraph([Read("h", "blocks.0.hook_resid_post")]).run(
        {"model": models["trainable"]}, {"batch": batches["retain"]}
    )["h"]
    out = step({"batch": batches["retain"]}, values={"control": control})
    torch.testing.assert_close(out["h"], plain + control)
    with pytest.raises(KeyError, match="No value named 'control'"):
        step({"batch": batches["retain"]})


def test_same_forward_write_from_an_earlier_site(models, batches):
    """Within one forward, a value read at block 0 can be written at block 1 (later), not back."""
    out = StepGraph(
        [
            Read("h0", "blocks.0.hook_resid_post"),
            Write("blocks.1.hook_resid_post", value="h0"),
            Read("h1", "blocks.1.hook_resid_post"),
        ]
    ).run({"model": models["base"]}, {"batch": batches["retain"]})
    assert torch.equal(out["h1"], out["h0"])
    with pytest.raises(ValueError, match="the other way"):
        StepGraph(
            [
                Read("h1", "blocks.1.hook_resid_post"),
                Write("blocks.0.hook_resid_post", value="h1"),
                Read("x", "unembed"),
            ]
        ).compile({"model": models["base"]})


def test_cycle_between_traces_is_an_error(models):
    with pytest.raises(ValueError, match="cycle"):
        StepGraph(
            [
                Read("a", "blocks.0.hook_resid_post", model="trainable"),
                Write("blocks.1.hook_resid_post", value="b", model="trainable"),
                Read("b", "blocks.0.hook_resid_post", model="base"),
                Write("blocks.1.hook_resid_post", value="a", model="base"),
            ]
        ).compile(models)


@pytest.mark.parametrize(
    ("nodes", "error", "match"),
    [
        ([Read("x", "unembed"), Read("x", "hook_embed")], ValueError, "unique"),
        ([Read("a/b", "unembed")], ValueError, "reserved"),
        ([Read("x", "unembed", model="teacher")], KeyError, "model 'teacher'"),
        ([Route("r", "unembed", source="model", target="model")], ValueError, "same source"),
        (
            [
                Route(
                    "r",
                    "blocks.1.hook_resid_post",
                    source="trainable",
                    target="base",
                    output="blocks.0.hook_resid_post",
                )
            ],
            ValueError,
            "comes before",
        ),
        (
            [
                Read("a", "blocks.{l}.hook_resid_post", layers="all", model="trainable"),
                Write("unembed", value="a", model="base"),
                Read("b", "unembed", model="base"),
            ],
            ValueError,
            "multi-layer",
        ),
        ([Write("unembed", mode="zero", model="base")], ValueError, "reads nothing"),
    ],
)
def test_graph_errors(models, nodes, error, match):
    with pytest.raises(error, match=match):
        StepGraph(nodes).compile({**models, "model": models["base"]})


def test_write_needs_a_value_unless_zero():
    with pytest.raises(ValueError, match="needs a value"):
        Write("unembed")
    with pytest.raises(ValueError, match="takes no value"):
        Write("unembed", 1.0, mode="zero")


def test_missing_batch_and_mask_field(models, batches):
    step = StepGraph([Read("x", "unembed", model="base", batch="forget")]).compile(models)
    with pytest.raises(KeyError, match="needs batch 'forget'"):
        step({"retain": batches["retain"]})
    masked = StepGraph(
        [
            Write("unembed", mode="zero", mask="keywords", model="base", batch="forget"),
            Read("x", "unembed", model="base", batch="forget"),
        ]
    ).compile(models)
    with pytest.raises(KeyError, match="no mask field 'keywords'"):
        masked(batches)


def test_peft_trainable_and_frozen_base(batches):
    """A LoRA model as the trainable one: only LoRA tensors get gradients from an MSE step."""
    from peft import LoraConfig, get_peft_model

    base = make_model("gpt_neox").requires_grad_(False)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["dense_h_to_4h"]))
    out = StepGraph(
        [
            Read("acts", "blocks.1.hook_resid_post", model="lora", batch="forget"),
            Read("ref", "blocks.1.hook_resid_post", model="base", batch="forget"),
        ]
    ).run({"lora": lora, "base": base}, batches)
    torch.autograd.backward((out["acts"] - out["ref"] + 1).pow(2).mean())
    with_grad = [name for name, p in lora.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in name for name in with_grad)


def test_route_into_a_lower_precision_base(tokens):
    """A float32 activation routed into a bfloat16 base is cast on the way in; gradients still
    reach the float32 trainable model."""
    base = make_model("gpt_neox").to(torch.bfloat16).requires_grad_(False)
    trainable = make_model("gpt_neox", seed=1)
    out = StepGraph(
        [
            Route("logits", "blocks.0.hook_resid_post", source="trainable", target="base"),
        ]
    ).run({"trainable": trainable, "base": base}, {"batch": tokens})
    assert out["logits"].dtype == torch.bfloat16
    torch.autograd.backward(out["logits"].float().logsumexp(-1).mean())
    assert trainable.gpt_neox.layers[0].attention.dense.weight.grad is not None


def test_batch_as_an_object(models, tokens):
    """A batch may be any object with input_ids/attention_mask attributes (e.g. a dataclass)."""
    from types import SimpleNamespace

    batch = SimpleNamespace(input_ids=tokens, attention_mask=torch.ones_like(tokens))
    out = StepGraph([Read("x", "unembed", model="base")]).run(models, {"batch": batch})
    with torch.no_grad():
        torch.testing.assert_close(out["x"], models["base"](tokens).logits)
    assert out["batch/attention_mask"] is batch.attention_mask
