"""Remote execution: the same read-only calls give the same results locally, in nnsight's local
simulation, and through NDIF's protocol against a loopback server (`ndif_server`), in both of the
client's waiting modes; server failures become client errors; training refuses to go remote.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
from nnsight import NNsight
from nnsight.intervention.backends.remote import RemoteError

from interventions import (
    DEFAULT_BATCH,
    DEFAULT_MODEL,
    Read,
    Remote,
    RemoteTrainingError,
    Route,
    StepGraph,
    Write,
    capture_acts,
    choice_logprobs,
    lens,
    patch_acts,
)
from interventions.remote import as_remote
from tests.interventions.conftest import make_model
from tests.interventions.ndif_server import NdifServer
from unlearn.eval import evaluate_mc, score_continuations, target_logprobs

KEY = 'nnsight.modeling.base.NNsight:{"repo_id": "local/tiny-neox"}'
LM_KEY = 'nnsight.modeling.base.NNsight:{"repo_id": "local/tiny-lm"}'
ATOL = 1e-5


@pytest.fixture(scope="module")
def neox():
    """The tiny GPT-NeoX of the intervention tests, frozen (no trainable parameters)."""
    return make_model("gpt_neox").requires_grad_(False)


@pytest.fixture(scope="module")
def server(neox, tiny_lm):
    """A loopback NDIF-protocol server hosting copies of both tiny models."""
    models = {KEY: copy.deepcopy(neox), LM_KEY: copy.deepcopy(tiny_lm[0])}
    with NdifServer(models) as running:
        yield running


@pytest.fixture(params=["simulate", "poll", "websocket"])
def where(request, server) -> Remote:
    """Each non-local execution: nnsight's simulation, and the server in both waiting modes."""
    if request.param == "simulate":
        return Remote(simulate=True)
    return Remote(host=server.url, model_key=KEY, blocking=request.param == "websocket")


def _close(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=ATOL, rtol=1e-5)


def test_as_remote_spellings():
    """remote= takes nnsight's spellings: False/None, True, "local", a URL, or a Remote."""
    assert as_remote(False) is None and as_remote(None) is None
    assert as_remote(True) == Remote()
    assert as_remote("local") == Remote(simulate=True)
    assert as_remote("http://127.0.0.1:1") == Remote(host="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="http"):
        as_remote("127.0.0.1:1")
    with pytest.raises(ValueError, match="simulate"):
        Remote(host="http://x", simulate=True)


def test_capture_acts_same_everywhere(neox, tokens, where):
    expected = capture_acts(neox, tokens, "blocks.{l}.hook_resid_post", layers="all")
    actual = capture_acts(neox, tokens, "blocks.{l}.hook_resid_post", layers="all", remote=where)
    _close(expected, actual)


def test_lens_and_patch_same_everywhere(neox, tokens, where):
    """The lens is decoded remotely; a write's effect on the logits matches too."""
    expected = lens(neox, tokens, "blocks.{l}.hook_resid_post", layers="all")
    torch.testing.assert_close(
        lens(neox, tokens, "blocks.{l}.hook_resid_post", layers="all", remote=where),
        expected,
        atol=ATOL,
        rtol=1e-5,
    )
    writes = [Write("blocks.0.hook_attn_out", mode="zero")]
    _close(patch_acts(neox, tokens, writes), patch_acts(neox, tokens, writes, remote=where))


def test_compiled_step_same_everywhere(neox, tokens, where):
    """Two traces: a value read on one batch is written into the forward of another."""
    graph = StepGraph(
        [
            Read("src", "blocks.0.hook_resid_post", batch="a"),
            Write("blocks.0.hook_resid_post", mode="add", value="src", batch="b"),
            Read("logits", "unembed", batch="b"),
            Read("resid", "blocks.{l}.hook_resid_post", layers="all", batch="b"),
        ]
    )
    step = graph.compile({DEFAULT_MODEL: neox})
    batches = {"a": tokens, "b": tokens.flip(0)}
    assert len(step.traces) == 2
    _close(step(batches), step(batches, remote=where))


def test_choice_logprobs_same_everywhere(neox, tokens, where):
    """The reduction runs inside the trace, wherever the trace runs; only [batch] comes back."""
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding in the first row
    target = torch.zeros_like(tokens, dtype=torch.bool)
    target[:, -3:] = True
    expected = choice_logprobs(neox, tokens, mask, target)
    actual = choice_logprobs(neox, tokens, mask, target, remote=where)
    assert actual.shape == (2,) and actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


def test_eval_same_everywhere(tiny_lm, server):
    """target_logprobs, score_continuations and evaluate_mc agree local vs simulated vs server."""
    model, tokenizer = tiny_lm
    items = [
        {"prompt": "Alice Smith lives in", "choices": [" Paris", " green", " fever"], "answer": 0},
        {"prompt": "Xivexosis spreads through", "choices": [" ticks", " water"], "answer": 1},
    ]
    items[1]["choices"].append(" parrot")
    host = Remote(host=server.url, model_key=LM_KEY, blocking=False)
    ids = torch.tensor([[0, 5, 6, 7, 8], [1, 1, 0, 9, 10]])
    mask = (ids != 1).long()
    expected = target_logprobs(model, ids, mask)
    for remote in ("local", host):
        actual = target_logprobs(NNsight(model), ids, mask, remote=remote)
        torch.testing.assert_close(actual, expected)
    contexts, continuations = ["Alice Smith lives in"] * 2, [" Paris", " water"]
    local = score_continuations(model, tokenizer, contexts, continuations)
    torch.testing.assert_close(
        score_continuations(model, tokenizer, contexts, continuations, remote=host), local
    )
    assert evaluate_mc(model, tokenizer, items, remote="local") == evaluate_mc(
        model, tokenizer, items
    )


def test_interventions_ship_by_value(neox, tokens, server):
    """NDIF has no `interventions` installed, so its classes must travel with the request."""
    capture_acts(neox, tokens, "blocks.0.hook_resid_post", remote=Remote(simulate=True))
    assert "interventions" in _PICKLE_BY_VALUE_MODULES


@pytest.mark.parametrize("blocking", [False, True])
def test_server_error_reaches_client(neox, tokens, server, blocking):
    """An exception on the server comes back as RemoteError carrying its message."""
    unknown = Remote(host=server.url, model_key=KEY + "-missing", blocking=blocking)
    with pytest.raises(RemoteError, match="does not host"):
        capture_acts(neox, tokens, "blocks.0.hook_resid_post", remote=unknown)
    shallow_key = KEY.replace("tiny-neox", "tiny-neox-shallow")
    shallow = make_model("gpt_neox")
    shallow.gpt_neox.layers = shallow.gpt_neox.layers[:1]
    server.models[shallow_key] = NNsight(shallow)
    mismatched = Remote(host=server.url, model_key=shallow_key, blocking=blocking)
    with pytest.raises(RemoteError, match="layers.1"):
        capture_acts(neox, tokens, "blocks.1.hook_resid_post", remote=mismatched)
    _close(
        capture_acts(neox, tokens, "blocks.1.hook_resid_post"),
        capture_acts(neox, tokens, "blocks.1.hook_resid_post", remote=Remote(simulate=True)),
    )


def test_model_without_hub_id_needs_a_key(neox, tokens):
    """remote=True names the model by hub id; a plain module has none, and says what to do."""
    with pytest.raises(ValueError, match="model_key"):
        capture_acts(neox, tokens, "blocks.0.hook_resid_post", remote=True)


def test_training_refuses_remote(tokens):
    """Anything needing gradients raises RemoteTrainingError before contacting anything."""
    trainable = make_model("gpt_neox")
    base = make_model("gpt_neox", seed=1)
    for call in (
        lambda: capture_acts(trainable, tokens, "blocks.0.hook_resid_post", grad=True, remote=True),
        lambda: lens(trainable, tokens, "blocks.0.hook_resid_post", grad=True, remote="local"),
    ):
        with pytest.raises(RemoteTrainingError, match="training cannot run remotely"):
            call()
    step = StepGraph(
        [Route("routed", "blocks.0.hook_resid_post", source="trainable", target="base")]
    ).compile({"trainable": trainable, "base": base})
    with pytest.raises(RemoteTrainingError, match="training cannot run remotely"):
        step({DEFAULT_BATCH: tokens}, remote="local")
    expected = step({DEFAULT_BATCH: tokens})["routed"]
    with torch.no_grad():  # no gradient asked for: the same step may run remotely
        actual = step({DEFAULT_BATCH: tokens}, remote="local")["routed"]
    torch.testing.assert_close(actual, expected)
