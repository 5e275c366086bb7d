"""Sequential unlearning (`unlearn.methods.sequential`) on the tiny random 2-block GPT-NeoX.

Checks: routing into the original is exact (trainable == original gives the original's own
logits and loss); a phase's gradients reach only its block (plus the done blocks with
`maintain_unlearned`) and never the original; phases run back to front with schedules that restart;
`sequential_phases` declares one phase per block, run in order by the training core's
`train_plan`; a killed run resumes in the phase where it stopped and ends where an uninterrupted run
ends; the recipe runs end to end on the tiny world.
"""

import copy
import json

import pytest
import torch
from simple_parsing import parse

from interventions import StepGraph
from tests.conftest import TINY_TEXTS
from unlearn.config import replace_flat
from unlearn.data import PairedBatches, tokenize_documents
from unlearn.losses import max_entropy_loss, random_target_ce_loss, top_k_entropy_loss
from unlearn.methods.base import BASE, FORGET, RAMPS, RETAIN, TRAINABLE, extra_models
from unlearn.methods.lens_unlearn import predicting
from unlearn.methods.sequential import (
    ORIGINAL,
    SequentialConfig,
    SequentialLayer,
    kept_layers,
    phase_layers,
    sequential_phases,
)
from unlearn.train_state import STATE_FILE
from unlearn.training import (
    METRICS_FILE,
    LoraSettings,
    OptimSettings,
    TrainResult,
    block_path,
    set_trainable_layers_,
    train_plan,
)

N_LAYERS = 2


@pytest.fixture(scope="module")
def docs(tiny_lm):
    _, tokenizer = tiny_lm
    forget = tokenize_documents(tokenizer, [{"text": t} for t in TINY_TEXTS], max_len=24)
    retain = tokenize_documents(tokenizer, [{"text": t[::-1]} for t in TINY_TEXTS], max_len=24)
    return forget, retain


@pytest.fixture
def batches(docs):
    forget, retain = PairedBatches(*docs, batch_size=4).at(0)
    return {FORGET: forget, RETAIN: retain}


def _compile(method, trainable):
    base = copy.deepcopy(trainable).eval().requires_grad_(True)
    models = {TRAINABLE: trainable, BASE: base, **extra_models(method)}
    return StepGraph(list(method.nodes)).compile(models), base


def _block_params(model, layers):
    prefixes = tuple(block_path(model, layer) + "." for layer in layers)
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def _is_finished(out_dir, layer: int, num_steps: int) -> bool:
    """Whether `layer`'s phase saved its final state (out_dir/layer<L>/train_state.pt)."""
    path = out_dir / f"layer{layer}" / STATE_FILE
    return path.exists() and int(torch.load(path, weights_only=False)["step"]) >= num_steps


def test_phase_layers_and_config_checks():
    assert phase_layers(SequentialConfig(), 4) == [3, 2, 1, 0]
    assert phase_layers(SequentialConfig(start=31, end=8, step=4), 32) == [31, 27, 23, 19, 15, 11]
    assert kept_layers(SequentialConfig(maintain_unlearned=True), 4, 1) == [3, 2, 1]
    assert kept_layers(SequentialConfig(), 4, 1) == [1]
    with pytest.raises(ValueError, match="start"):
        SequentialConfig(start=0, end=2)
    with pytest.raises(ValueError, match="step"):
        SequentialConfig(step=0)
    with pytest.raises(ValueError, match="block"):
        phase_layers(SequentialConfig(start=4), 4)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("forget_loss", ["max_entropy", "random_ce", "top_k"])
def test_routing_through_an_identical_original_is_exact(tiny_lm, batches, layer, forget_loss):
    """With trainable == original, the routed logits are the original's own logits, so the forget
    loss equals the same loss on the original's output (random targets drawn from one seed)."""
    model, _ = tiny_lm
    original = copy.deepcopy(model)
    cfg = SequentialConfig(forget_loss=forget_loss, top_k=10)
    method = SequentialLayer(cfg, N_LAYERS, layer, original)
    step, _ = _compile(method, copy.deepcopy(model))
    forget = batches[FORGET]
    with torch.no_grad():
        acts = step(batches)
        own = original(input_ids=forget.input_ids, attention_mask=forget.attention_mask).logits
    torch.testing.assert_close(acts["forget_routed"], own, rtol=1e-5, atol=1e-5)

    mask = predicting(forget.token_mask)
    losses = {
        "max_entropy": lambda z: max_entropy_loss(z, mask),
        "random_ce": lambda z: random_target_ce_loss(z, mask, torch.default_generator),
        "top_k": lambda z: top_k_entropy_loss(z, mask, k=10),
    }
    forget_term = next(t for t in method.terms if t.name == "forget")
    torch.manual_seed(1)
    routed = forget_term.fn(acts, forget, batches[RETAIN])
    torch.manual_seed(1)
    expected = losses[forget_loss](own)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("maintain", [False, True])
@pytest.mark.parametrize("retain_loss", ["kl", "l2"])
def test_gradients_reach_only_the_phase_blocks(tiny_lm, batches, maintain, retain_loss):
    """Phase of block 0 after block 1: grads on block 0 (and block 1 when maintained, from the
    retain term), nowhere else, never on the original nor on train()'s base copy."""
    model, _ = tiny_lm
    original = copy.deepcopy(model)
    trainable = copy.deepcopy(model)
    with torch.no_grad():  # block 1 already unlearned: off θ0, so its retain gradient is nonzero
        for name, param in trainable.named_parameters():
            if name in _block_params(trainable, [1]):
                param.add_(0.05 * torch.randn_like(param))
    cfg = replace_flat(SequentialConfig(), maintain_unlearned=maintain, retain_loss=retain_loss)
    kept = kept_layers(cfg, N_LAYERS, 0)
    assert kept == ([1, 0] if maintain else [0])
    names = set_trainable_layers_(trainable, kept)
    assert set(names) == _block_params(trainable, kept)
    original.requires_grad_(True)  # the method must freeze it itself
    method = SequentialLayer(cfg, N_LAYERS, 0, original)
    step, base = _compile(method, trainable)
    acts = step(batches)
    total = sum(t.fn(acts, batches[FORGET], batches[RETAIN]) * t.weight(0.5) for t in method.terms)
    total.backward()
    with_grad = {
        n for n, p in trainable.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert with_grad == _block_params(trainable, kept)
    assert all(p.grad is None for p in original.parameters())
    assert all(p.grad is None for p in base.parameters())


def _run(model, docs, out, steps=2, **kwargs):
    """Sequential unlearning as a run does it: the phases of `model`, then `train_plan`."""
    cfg = kwargs.pop("cfg", replace_flat(SequentialConfig(), forget_coef=2.0))
    phases = sequential_phases(cfg, model, steps_per_layer=steps)
    results = train_plan(
        model,
        phases,
        PairedBatches(*docs, batch_size=2),
        out_dir=out,
        optim=OptimSettings(lr=1e-2, warmup_steps=1),
        **kwargs,
    )
    return phases, results


@pytest.mark.parametrize("use_lora", [False, True])
def test_phases_run_back_to_front_and_restart_their_schedules(tiny_lm, docs, tmp_path, use_lora):
    model, _ = tiny_lm
    trained = copy.deepcopy(model)
    lora = LoraSettings(lora_rank=2) if use_lora else None
    phases, results = _run(trained, docs, tmp_path, steps=3, lora=lora)
    assert [phase.name for phase in phases] == ["layer1", "layer0"]
    assert [phase.method.layer for phase in phases] == [1, 0]
    assert [phase.blocks for phase in phases] == [(1,), (0,)]
    assert [phase.seed_offset for phase in phases] == [0, 1]
    assert [phase.num_steps for phase in phases] == [3, 3]
    assert len(results) == len(phases)
    for phase, result in zip(phases, results, strict=True):
        layer = phase.method.layer
        assert (tmp_path / f"layer{layer}" / METRICS_FILE).exists()
        assert _is_finished(tmp_path, layer, 3)
        records = [r for r in result.history if "loss/total" in r]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert records[0]["coef/forget"] == pytest.approx(2.0 * RAMPS["forget_decay"].start)
        assert records[-1]["coef/forget"] == pytest.approx(2.0 * RAMPS["forget_decay"].end)
        assert records[0]["coef/retain"] == pytest.approx(RAMPS["retain_warmup"].start)
    # Only the blocks changed; embeddings, final norm and unembedding are the original's.
    blocks = _block_params(model, [0, 1])
    changed = {
        name
        for (name, p), p0 in zip(trained.named_parameters(), model.parameters(), strict=True)
        if not torch.equal(p, p0)
    }
    assert changed and changed <= blocks
    assert any(n.startswith(block_path(model, 0)) for n in changed)
    assert any(n.startswith(block_path(model, 1)) for n in changed)


def test_killed_run_resumes_at_the_right_phase(tiny_lm, docs, tmp_path, monkeypatch):
    """Die in the second phase (block 0) after its first saved step; the rerun reloads block 1's
    finished phase without training it and ends exactly where an uninterrupted run ends."""
    model, _ = tiny_lm
    steps = 3
    _, reference = _run(copy.deepcopy(model), docs, tmp_path / "full", steps=steps, save_every=1)

    calls = []
    original_at = PairedBatches.at

    def counting_at(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == steps + 2:  # phase 1 done, phase 2 step 1 done, dies at its step 2
            raise KeyboardInterrupt
        return original_at(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(PairedBatches, "at", counting_at)
        with pytest.raises(KeyboardInterrupt):
            _run(copy.deepcopy(model), docs, tmp_path / "killed", steps=steps, save_every=1)
    assert _is_finished(tmp_path / "killed", 1, steps)
    assert not _is_finished(tmp_path / "killed", 0, steps)

    calls.clear()
    with monkeypatch.context() as patch:
        patch.setattr(
            PairedBatches,
            "at",
            lambda self, step, *a, **k: (calls.append(step), original_at(self, step, *a, **k))[1],
        )
        _, resumed = _run(
            copy.deepcopy(model), docs, tmp_path / "killed", steps=steps, save_every=1
        )
    assert calls == [1, 2]  # only phase 2's remaining steps ran
    for p, q in zip(resumed[-1].model.parameters(), reference[-1].model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    records = [r for r in resumed[1].history if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_original_model_is_routed_not_the_updated_one(tiny_lm, docs, tmp_path):
    """The phase method carries the ORIGINAL as its extra model, distinct from the trained one."""
    model, _ = tiny_lm
    original = copy.deepcopy(model)
    method = SequentialLayer(SequentialConfig(), N_LAYERS, 0, original)
    assert method.models[ORIGINAL] is original
    assert all(not p.requires_grad for p in original.parameters())
    routes = [n for n in method.nodes if getattr(n, "target", None) is not None]
    assert [(r.source, r.target, r.site) for r in routes] == [
        (TRAINABLE, ORIGINAL, "blocks.0.hook_resid_post")
    ]
    assert all(getattr(n, "model", ORIGINAL) != BASE for n in method.nodes)


def test_recipe_runs_end_to_end(tiny_home, tmp_path):
    from recipes import sequential

    out = tmp_path / "run"
    cfg = parse(
        sequential.Config,
        args=["--out", str(out), "--world_preset", "tiny", "--num_steps", "2", "--batch_size", "4"],
    )
    results = sequential.main(cfg)
    for name in (
        "run_info.json",
        "metrics.jsonl",
        "training.png",
        "results.json",
        "model/config.json",
        "model/tokenizer.json",
        "layer0/metrics.jsonl",
        "layer1/metrics.jsonl",
    ):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == pytest.approx({k: v for k, v in results.items() if k != "phase_layers"})
    assert results["phase_layers"] == [1, 0]  # what preparation chose, returned with the results
    for key in ("forget_acc", "retain_acc", "forget_acc_before", "retain_acc_before"):
        assert 0.0 <= results[key] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["phase"], r["step"]) for r in records if "loss/total" in r]
    assert losses == [("layer1", 1), ("layer1", 2), ("layer0", 3), ("layer0", 4)]


def test_one_phase_form_routes_into_base(tiny_lm, batches):
    """`SequentialLayer(cfg, n_layers)` (the registry form) is the first phase, routed into
    train()'s "base"; it brings no extra model and its gradients reach only the last block."""
    model, _ = tiny_lm
    method = SequentialLayer(SequentialConfig(), N_LAYERS)
    assert method.layer == N_LAYERS - 1 and extra_models(method) == {}
    assert all(getattr(n, "model", BASE) != ORIGINAL for n in method.nodes)
    assert [n.target for n in method.nodes if hasattr(n, "target")] == [BASE]
    trainable = copy.deepcopy(model)
    set_trainable_layers_(trainable, [method.layer])
    step, base = _compile(method, trainable)
    base.requires_grad_(False)  # as train() freezes it: a Route cannot freeze its target itself
    acts = step(batches)
    sum(t.fn(acts, batches[FORGET], batches[RETAIN]) for t in method.terms).backward()
    with_grad = {n for n, p in trainable.named_parameters() if p.grad is not None}
    assert with_grad == _block_params(trainable, [method.layer])
    assert all(p.grad is None for p in base.parameters())


def test_every_phase_takes_the_nonfinite_policy(tiny_lm, monkeypatch, tmp_path):
    """`train_plan(..., on_nonfinite="skip")` hands the policy to every phase's `train`, each in
    its own directory with the run's seed plus the phase's offset."""
    import unlearn.training as training_module

    seen = []

    def fake_train(model, method, batches, **kwargs):
        seen.append((kwargs["on_nonfinite"], kwargs["out_dir"], kwargs["seed"]))
        return TrainResult(model=model, history=[])

    monkeypatch.setattr(training_module, "train", fake_train)
    model, tokenizer = tiny_lm
    docs = [{"text": "The pathogen Velkor is transmitted by ticks."}] * 4
    rows = tokenize_documents(tokenizer, docs, max_len=16)
    trained = copy.deepcopy(model)
    train_plan(
        trained,
        sequential_phases(SequentialConfig(), trained, steps_per_layer=1),
        PairedBatches(rows, rows, batch_size=2),
        out_dir=tmp_path,
        seed=5,
        on_nonfinite="skip",
    )
    assert seen == [("skip", tmp_path / "layer1", 5), ("skip", tmp_path / "layer0", 6)]
