import copy
import json
import math

import pytest
import torch

from interventions import StepGraph
from tests.conftest import TINY_TEXTS
from unlearn.config import replace_flat
from unlearn.data import tokenize_documents
from unlearn.methods import BASE, FORGET, RETAIN, TRAINABLE, ProbeUnlearn, ProbeUnlearnConfig
from unlearn.probe import (
    TransformerProbe,
    load_probes,
    probe_depth,
    save_probes,
    train_probes,
)

N_LAYERS = 2


@pytest.fixture
def batches(tiny_lm):
    """Three right-padded batches, each a whole text and a short prefix of another."""
    _, tokenizer = tiny_lm
    docs = [{"text": t} for t in TINY_TEXTS] + [{"text": t[:16]} for t in TINY_TEXTS]
    rows = tokenize_documents(tokenizer, docs, max_len=32)
    out = [rows.batch([0, 5]), rows.batch([2, 7]), rows.batch([1, 4])]
    assert all((b.attention_mask == 0).any() for b in out)
    return out


def _probes(d_model: int, layers=(0, 1)) -> dict[int, TransformerProbe]:
    """Random small probes (in eval mode): randomly initialized, output bias made large so the
    final norm visibly changes the decode."""
    probes = {}
    for layer in layers:
        probe = TransformerProbe(d_model, probe_depth(layer, N_LAYERS), d_probe=16, n_heads=2)
        with torch.no_grad():
            probe.proj_out.bias.normal_(0.0, 3.0)
        probes[layer] = probe.eval().requires_grad_(False)
    return probes


def _unembed(model):
    """GPT-NeoX's unembedding: `embed_out` before transformers 5, `lm_head` since."""
    return model.embed_out if hasattr(model, "embed_out") else model.lm_head


def _block_outputs(model, batch) -> list[torch.Tensor]:
    """Every block's output, from plain forward hooks on `gpt_neox.layers`.

    This is Hugging Face `hidden_states[l + 1]` for every block but the last: transformers 5 returns
    the last entry after the final norm, so it cannot stand for the last block's output.
    """
    outputs = []
    hooks = [
        block.register_forward_hook(lambda module, args, output: outputs.append(output))
        for block in model.gpt_neox.layers
    ]
    try:
        with torch.no_grad():
            model(batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return [out[0] if isinstance(out, tuple) else out for out in outputs]


def test_probe_depth_by_hand():
    """depth = max(1, round(s · (L − l))): L=4 -> 4, 3, 2, 1; s=0.5 -> 2, 2 (1.5 rounds to even 2),
    1, 1 (0.5 rounds to 0, floored at 1); the reference's 32-layer model at l=8 -> 24."""
    assert [probe_depth(layer, 4) for layer in range(4)] == [4, 3, 2, 1]
    assert [probe_depth(layer, 4, 0.5) for layer in range(4)] == [2, 2, 1, 1]
    assert probe_depth(8, 32) == 24
    assert len(TransformerProbe(32, 3, d_probe=16, n_heads=2).layers) == 3


def test_probe_is_causal_and_padding_free_at_real_tokens():
    """The output at t depends on no later token; with right padding, passing the padding mask
    changes nothing at real tokens."""
    probe = TransformerProbe(32, 2, d_probe=16, n_heads=2).eval()
    acts = torch.randn(2, 7, 32)
    changed = acts.clone()
    changed[:, 4:] = torch.randn(2, 3, 32)
    with torch.no_grad():
        out, out_changed = probe(acts), probe(changed)
        torch.testing.assert_close(out[:, :4], out_changed[:, :4])
        assert not torch.allclose(out[:, 4:], out_changed[:, 4:])
        mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
        masked = probe(acts, mask)
    torch.testing.assert_close(masked[mask.bool()], out[mask.bool()], rtol=1e-5, atol=1e-5)


def test_decoded_logits_include_the_final_norm(tiny_lm, batches, tmp_path):
    """The method's forget logits at layer l equal, in plain PyTorch,
    embed_out(final_layer_norm(probe_l(h_l))) with h_l block l's output (hidden_states[l + 1]), and
    differ from the reference's norm-free embed_out(probe_l(h_l))."""
    model, _ = tiny_lm
    probes = _probes(model.config.hidden_size)
    path = save_probes(probes, tmp_path / "probes")
    method = ProbeUnlearn(ProbeUnlearnConfig(probe_path=str(path)), N_LAYERS)
    step = StepGraph(list(method.nodes)).compile(
        {TRAINABLE: copy.deepcopy(model), BASE: copy.deepcopy(model)}
    )
    forget = batches[0]
    with torch.no_grad():
        logits = step({FORGET: forget, RETAIN: batches[1]})["forget_probe"]
    hidden = _block_outputs(model, forget)
    assert logits.shape[0] == N_LAYERS
    real = forget.attention_mask.bool()
    for layer in range(N_LAYERS):
        with torch.no_grad():
            predicted = probes[layer](hidden[layer])
            expected = _unembed(model)(model.gpt_neox.final_layer_norm(predicted))
            no_norm = _unembed(model)(predicted)
        torch.testing.assert_close(logits[layer][real], expected[real], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(logits[layer][real], no_norm[real], rtol=1e-2, atol=1e-2)


def test_max_entropy_term_by_hand(tiny_lm, batches, tmp_path):
    """Forget term = mean_l masked-mean_t (logsumexp z − mean z − log V) / log V with
    z = embed_out(final_layer_norm(probe_l(h_l))) over the positions t whose next token is a
    forget token (m_{t+1} = 1); only layer 1 is selected here."""
    model, _ = tiny_lm
    probes = _probes(model.config.hidden_size)
    path = save_probes(probes, tmp_path / "probes")
    cfg = replace_flat(ProbeUnlearnConfig(), probe_path=str(path), layers=[1], retain_coef=0.0)
    method = ProbeUnlearn(cfg, N_LAYERS)
    assert [term.name for term in method.terms] == ["forget"]
    step = StepGraph(list(method.nodes)).compile({TRAINABLE: copy.deepcopy(model)})
    forget = batches[0]
    with torch.no_grad():
        value = float(method.terms[0].fn(step({FORGET: forget}), forget, forget))
        z = _unembed(model)(
            model.gpt_neox.final_layer_norm(probes[1](_block_outputs(model, forget)[1]))
        )
    log_vocab = math.log(z.shape[-1])
    mask = torch.zeros_like(forget.attention_mask, dtype=torch.float)
    mask[:, :-1] = forget.token_mask[:, 1:].float()
    per_token = (z.logsumexp(-1) - z.mean(-1) - log_vocab) / log_vocab
    expected = float((per_token * mask).sum() / mask.sum())
    assert value == pytest.approx(expected, rel=1e-5)


def test_training_lowers_heldout_mse_and_reports_it_correctly(tiny_lm, batches):
    """Teacher = the model with perturbed weights. After training, the held-out probe MSE beats
    the untrained probe and the identity map, and the reported numbers equal a plain-PyTorch
    masked MSE over real tokens and dimensions between probe(teacher's h_l) and the model's h_l
    (block outputs) on the held-out batch."""
    model, _ = tiny_lm
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.1 * torch.randn_like(param))
    kwargs = dict(d_probe=16, n_heads=2, d_ffn=32, n_heldout=1)
    untrained = train_probes(teacher, model, batches, [0, 1], num_steps=0, **kwargs)
    fit = train_probes(teacher, model, batches, [0, 1], num_steps=150, lr=3e-3, **kwargs)
    assert fit.losses[-1] < 0.2 * fit.losses[0]
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    heldout = batches[-1]
    real = heldout.attention_mask.bool()
    source, target = _block_outputs(teacher, heldout), _block_outputs(model, heldout)
    for layer in (0, 1):
        with torch.no_grad():
            predicted = fit.probes[layer](source[layer])
        expected = float((predicted - target[layer]).square().mean(-1)[real].mean())
        identity = float((source[layer] - target[layer]).square().mean(-1)[real].mean())
        assert fit.mse["probe"][layer] == pytest.approx(expected, rel=1e-4)
        assert fit.mse["identity"][layer] == pytest.approx(identity, rel=1e-4)
        assert fit.mse["probe"][layer] < 0.5 * untrained.mse["probe"][layer]
        assert fit.mse["probe"][layer] < fit.mse["identity"][layer]


def test_save_load_round_trip(tiny_lm, tmp_path):
    model, _ = tiny_lm
    probes = _probes(model.config.hidden_size)
    path = save_probes(probes, tmp_path / "probes")
    meta = json.loads((path / "probes.json").read_text())
    assert meta["site"] == "blocks.{l}.hook_resid_post"
    assert {k: v["depth"] for k, v in meta["probes"].items()} == {"0": 2, "1": 1}
    loaded = load_probes(path)
    assert sorted(loaded) == [0, 1]
    acts = torch.randn(2, 5, model.config.hidden_size)
    for layer, probe in probes.items():
        state, other = probe.state_dict(), loaded[layer].state_dict()
        assert state.keys() == other.keys()
        assert all(torch.equal(state[k], other[k]) for k in state)
        assert not loaded[layer].training
        assert not any(p.requires_grad for p in loaded[layer].parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded[layer](acts), probe(acts))


def test_missing_probes_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipes.probe_unlearn"):
        load_probes(tmp_path)
    with pytest.raises(ValueError, match="--probe_path"):
        ProbeUnlearn(ProbeUnlearnConfig(), N_LAYERS)


@pytest.mark.parametrize(
    ("probe_layers", "layers", "match"),
    [
        ((0, 1), [2], "must lie in 0..1"),
        ((0, 1), [-1], "must lie in 0..1"),
        ((0,), [1], r"no probe for layers \[1\]"),
        ((0, 5), None, "must lie in 0..1"),
        ((0, 1), [], "must lie in 0..1"),
    ],
)
def test_bad_layers_are_a_value_error(tiny_lm, tmp_path, probe_layers, layers, match):
    model, _ = tiny_lm
    path = save_probes(_probes(model.config.hidden_size, probe_layers), tmp_path / "probes")
    with pytest.raises(ValueError, match=match):
        ProbeUnlearn(ProbeUnlearnConfig(probe_path=str(path), layers=layers), N_LAYERS)


def test_train_probes_rejects_bad_layers_and_too_few_batches(tiny_lm, batches):
    model, _ = tiny_lm
    with pytest.raises(ValueError, match="subset of 0..1"):
        train_probes(model, model, batches, [2], num_steps=1)
    with pytest.raises(ValueError, match="subset of 0..1"):
        train_probes(model, model, batches, [], num_steps=1)
    with pytest.raises(ValueError, match="held-out"):
        train_probes(model, model, batches[:1], [0], num_steps=1)
