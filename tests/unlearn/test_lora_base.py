"""The frozen original of a LoRA run: the trained model with its adapters disabled, not a copy.

Every registered method that reads "base" trains 3 LoRA steps per phase twice, on a tiny GPT-NeoX
with attention, hidden and LoRA dropout on: once with the original deep-copied as before (the
private switch `unlearn.training._COPY_BASE_UNDER_LORA`), once with the adapters disabled. The
logged losses, gradient norms and final weights agree; and the step graph of a LoRA run holds one
copy of the weights, where the copy held two.
"""

import copy
import json

import pytest
import torch

from interventions import FrozenView, StepGraph
from tests.unlearn.test_methods import (
    MAPS,
    PROBES,
    REWIND_FIXED,
    REWRITTEN,
    SCORES,
    TEACHER_FIXED,
    TUNED_LENS,
    _config,
    _context,
)
from unlearn import training
from unlearn.data import PairedBatches, tokenize_documents
from unlearn.methods import BASE, REGISTRY, TRAINABLE, Phase, registration
from unlearn.methods.sequential import SequentialLayer
from unlearn.training import METRICS_FILE, LoraSettings, OptimSettings, train, train_plan

CASES = {
    "lens_unlearn": {},
    "lens_unlearn-tuned": {"lens_path": TUNED_LENS, "retain_loss": "l2"},
    "circuit_breakers": {},
    "checkpoint_transfer": {**TEACHER_FIXED, "map_kind": "affine", "maps_path": MAPS},
    "probe_unlearn": {"probe_path": PROBES},
    "sequential": {},  # one phase routed into "base": see _phases
    "rewritten_transfer": {"rewritten_data": REWRITTEN},
    "rmu": {},
    "npo": {},
    "simnpo": {"retain_loss": "kl"},
    "grad_diff": {"retain_loss": "mse", "retain_layers": [0]},
    "rewind_distill": REWIND_FIXED,  # no teacher: the forget term distills "base"
    "detractor": {"scores_path": SCORES},
    "tar": {},
}
"""A setting of each method that reads "base" (its retain reference, NPO's reference, ...)."""

NEVER_READS_BASE = {"undo": "distills its teacher on forget and retain text"}

N_LAYERS = 2
LORA = LoraSettings(lora_rank=4, lora_dropout=0.1)


def _with_dropout(model, p: float = 0.1):
    """The same weights, with attention and hidden dropout p (on in train mode)."""
    config = copy.deepcopy(model.config)
    config.attention_dropout = config.hidden_dropout = p
    dropped = type(model)(config)
    dropped.load_state_dict(model.state_dict())
    return dropped.eval()


def _pairs(tokenizer) -> PairedBatches:
    from tests.unlearn.test_methods import FORGET_DOCS, MAX_LEN, RETAIN_DOCS

    forget = tokenize_documents(tokenizer, FORGET_DOCS, max_len=MAX_LEN)
    retain = tokenize_documents(tokenizer, RETAIN_DOCS, max_len=MAX_LEN)
    return PairedBatches(forget, retain, batch_size=4)


def _phases(case: str, model, tokenizer, tmp_path) -> list[Phase]:
    """The plan a run builds (3 steps a phase); for sequential, the one phase that routes into
    "base" (the registered plan routes into its own copy, "original")."""
    name = case.split("-")[0]
    cfg = _config(name, CASES[case], tmp_path, model, tokenizer)
    if name == "sequential":
        return [Phase(SequentialLayer(cfg, N_LAYERS), 3, name="layer1", blocks=(1,))]
    return registration(name).build(cfg, _context(model, tokenizer, tmp_path)).phases


def _records(out_dir) -> dict[str, float]:
    """Every logged loss and gradient norm, keyed "<phase>/<step>/<name>"."""
    records = {}
    for path in sorted(out_dir.rglob(METRICS_FILE)):
        phase = path.parent.relative_to(out_dir).as_posix()
        for line in path.read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if key.startswith("loss/") or key == "grad_norm":
                    records[f"{phase}/{record['step']}/{key}"] = value
    return records


def test_every_method_has_a_case_that_reads_base():
    assert set(CASES) | set(NEVER_READS_BASE) >= set(REGISTRY)
    assert {case.split("-")[0] for case in CASES} | set(NEVER_READS_BASE) == set(REGISTRY)


@pytest.mark.parametrize("case", list(CASES))
def test_lora_with_adapters_disabled_matches_a_frozen_copy(case, tiny_lm, tmp_path, monkeypatch):
    """3 LoRA steps a phase (the adapters move off zero after the first, so "trainable" and
    "base" differ from the second step on): the same losses and gradient norms (rel 1e-6) and
    the same merged weights as with a deep copy, dropout on in the trained model."""
    model, tokenizer = tiny_lm
    model = _with_dropout(model)
    phases = _phases(case, model, tokenizer, tmp_path)
    assert any(training._uses_base(phase.method) for phase in phases)
    kwargs = dict(optim=OptimSettings(lr=1e-2, warmup_steps=1), lora=LORA, seed=3)
    pairs = _pairs(tokenizer)
    results = {}
    for copies in (True, False):
        monkeypatch.setattr(training, "_COPY_BASE_UNDER_LORA", copies)
        out = tmp_path / ("copy" if copies else "shared")
        results[copies] = train_plan(copy.deepcopy(model), phases, pairs, out_dir=out, **kwargs)
    copied, shared = _records(tmp_path / "copy"), _records(tmp_path / "shared")
    assert shared.keys() == copied.keys() and len(copied) >= 6
    for key, value in copied.items():
        assert shared[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    final = {n: p for n, p in results[True][-1].model.named_parameters()}
    moved = False
    for name, param in results[False][-1].model.named_parameters():
        assert torch.allclose(param, final[name], rtol=1e-6, atol=1e-7), name
        moved |= not torch.equal(param, dict(model.named_parameters())[name])
    assert moved, "LoRA changed no weight: the comparison would be vacuous"


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_sharpness_aware_accumulated_steps_match_a_frozen_copy(
    precision, tiny_lm, tmp_path, monkeypatch
):
    """Sharpness-aware forget terms (the adapters are perturbed and restored within a micro-batch)
    over 2 accumulated micro-batches, in fp32 and under bf16 autocast: the same losses as with a
    copy."""
    model, tokenizer = tiny_lm
    phases = _phases("circuit_breakers", model, tokenizer, tmp_path)
    optim = OptimSettings(lr=1e-2, warmup_steps=1, sam_rho=0.05, grad_accum=2, precision=precision)
    for copies in (True, False):
        monkeypatch.setattr(training, "_COPY_BASE_UNDER_LORA", copies)
        out = tmp_path / ("copy" if copies else "shared")
        train_plan(
            copy.deepcopy(model), phases, _pairs(tokenizer), out_dir=out, optim=optim, lora=LORA
        )
    copied, shared = _records(tmp_path / "copy"), _records(tmp_path / "shared")
    assert shared.keys() == copied.keys() and any("sam_forget" in key for key in copied)
    for key, value in copied.items():
        assert shared[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def _storages(model) -> dict[int, int]:
    """Bytes of each unique storage behind a model's parameters and buffers, by address."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("copies", [True, False], ids=["copy", "adapters_disabled"])
def test_a_lora_step_graph_holds_one_copy_of_the_weights(copies, tiny_lm, tmp_path, monkeypatch):
    """Under LoRA "base" is a `FrozenView` of the trained model: every storage it reaches is one
    of the trained model's, so the step graph's models hold the weights once (plus the adapters);
    with the copy they held them twice."""
    model, tokenizer = tiny_lm
    method = _phases("npo", model, tokenizer, tmp_path)[0].method
    storages: dict[str, dict[int, int]] = {}

    class Recording(StepGraph):
        def compile(self, models, **kwargs):
            storages.update({name: _storages(m) for name, m in models.items()})
            return super().compile(models, **kwargs)

    monkeypatch.setattr(training, "StepGraph", Recording)
    monkeypatch.setattr(training, "_COPY_BASE_UNDER_LORA", copies)
    weights = sum(_storages(model).values())
    pairs = _pairs(tokenizer)
    train(copy.deepcopy(model), method, pairs, num_steps=1, out_dir=tmp_path / "run", lora=LORA)
    trainable, base = storages[TRAINABLE], storages[BASE]
    adapters = sum(trainable.values()) - weights
    assert 0 < adapters < weights / 10
    total = sum({**trainable, **base}.values())
    if copies:
        assert not base.keys() & trainable.keys()
        assert total == 2 * weights + adapters
    else:
        assert base.keys() <= trainable.keys()
        assert total == weights + adapters


def test_under_lora_base_is_the_trained_model_with_adapters_disabled(tiny_lm):
    model, _ = tiny_lm
    peft_model = training.add_lora(copy.deepcopy(model), LORA)
    view = training.adapters_disabled(peft_model)
    assert isinstance(view, FrozenView) and view.module is peft_model
    assert set(map(id, view.parameters())) == set(map(id, peft_model.parameters()))
