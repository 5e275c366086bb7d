"""Contract suite for `unlearn.methods`: every registered method x the tiny random GPT-NeoX (full
fine-tuning and peft LoRA), plus the registry, `Ramp` schedules and `stack`.

Each method is built the way a run builds it: `REGISTRY[name].build(cfg, context)` on the tiny
model and documents; the contract runs on the first phase of the returned plan (for sequential
unlearning, the last block's).

The contract (STYLE.md section 5): the weighted loss is a finite scalar; gradients land only on
trainable parameters (never on the frozen base, only on lora_* parameters under LoRA); a
small step along the forget term's gradient lowers the forget term on the same batch; the config
round-trips through `dataclasses.asdict` and through `simple_parsing.parse`.

The models are wired exactly as `unlearn.training.train` wires them: "trainable" (optionally
LoRA-wrapped) and "base" (a deep copy; under LoRA the trainable model with its adapters disabled,
`unlearn.training.adapters_disabled`), compiled through `interventions.StepGraph`.
"""

import copy
import dataclasses
import json
import math

import pytest
import simple_parsing
import torch

from interventions import StepGraph
from tests.conftest import TINY_TEXTS
from unlearn.config import DataConfig, TrainingConfig, from_dict, replace_flat
from unlearn.data import PairedBatches, tokenize_documents
from unlearn.lens import TunedLens
from unlearn.maps import AffineMap, save_maps
from unlearn.methods import (
    BASE,
    FORGET,
    RAMPS,
    REGISTRY,
    RETAIN,
    TRAINABLE,
    CircuitBreakers,
    CircuitBreakersConfig,
    Context,
    LensUnlearn,
    LensUnlearnConfig,
    Ramp,
    Stacked,
    Term,
    register,
    registration,
    stack,
)
from unlearn.methods.base import extra_models
from unlearn.methods.retain import retain_component
from unlearn.probe import TransformerProbe, probe_depth, save_probes
from unlearn.selection.magic_scores import TokenScores, save_token_scores
from unlearn.selection.masks import documents_key
from unlearn.training import LoraSettings, adapters_disabled, add_lora

N_LAYERS = 2


TUNED_LENS = "<tuned lens>"
"""Placeholder for `lens_path`, replaced by a perturbed identity lens saved into tmp_path."""

TEACHER = "<teacher>"
"""Placeholder for `teacher`, replaced by a perturbed copy of the model saved into tmp_path."""
MAPS = "<maps>"
"""Placeholder for `maps_path`, replaced by random affine maps saved into tmp_path."""
PROBES = "<probes>"
"""Placeholder for `probe_path`, replaced by random small transformer probes (every layer) saved
into tmp_path."""
REWRITTEN = "<rewritten>"
"""Placeholder for `rewritten_data`, replaced by rewritten twins of the forget documents (every
other word reversed) saved into tmp_path."""
TEACHER_FIXED = {"teacher": TEACHER, "teacher_revision": "step1", "map_kind": "identity"}
"""Checkpoint transfer without its sweep and map fitting (the teacher's checkpoint is given)."""
REWIND_FIXED = {"checkpoint": TEACHER, "checkpoint_revision": "step1"}
"""Rewind-and-distill without its checkpoint sweep (the checkpoint is given)."""
SCORES = "<scores>"
"""Placeholder for `scores_path`, replaced by random per-token scores of the contract's forget and
retain rows saved into tmp_path (detractor learning's MAGIC scores)."""

VARIANTS: dict[str, list[dict]] = {
    "lens_unlearn": [
        {},
        {"forget_loss": "random_ce", "retain_loss": "nll", "layers": [0]},
        {"forget_loss": "ce_max", "retain_loss": "l2", "retain_layers": [1]},
        {"lens_path": TUNED_LENS},
        {"retain_coef": 0.0, "forget_ramp": "constant"},
    ],
    "checkpoint_transfer": [
        TEACHER_FIXED,
        {
            **TEACHER_FIXED,
            "map_kind": "affine",
            "maps_path": MAPS,
            "retain_loss": "l2",
            "layers": [1],
        },
        {**TEACHER_FIXED, "retain_coef": 0.0, "forget_ramp": "constant"},
    ],
    "probe_unlearn": [
        {"probe_path": PROBES},
        {"probe_path": PROBES, "forget_loss": "random_ce", "retain_loss": "nll", "layers": [0]},
        {"probe_path": PROBES, "retain_loss": "l2", "retain_layers": [1], "layers": [1]},
        {"probe_path": PROBES, "retain_coef": 0.0, "forget_ramp": "constant"},
    ],
    "detractor": [
        {"scores_path": SCORES},
        {"scores_path": SCORES, "train_on": "detractors", "retain_loss": "nll"},
        {"scores_path": SCORES, "retain_loss": "l2", "retain_layers": [1], "forget_coef": 2.0},
        {"scores_path": SCORES, "train_on": "detractors", "retain_coef": 0.0},
    ],
    "circuit_breakers": [
        {},
        {"orth_coef": 0.0, "retain_loss": "kl", "layers": [0, 1], "forget_coef": 2.0},
        {"retain_loss": "nll", "orth_ramp": "constant", "retain_layers": [0]},
        {"forget_coef": 0.0, "retain_coef": 0.0},
    ],
    "sequential": [
        {},
        {"forget_loss": "random_ce", "retain_loss": "nll", "forget_ramp": "constant"},
        {"forget_loss": "top_k", "top_k": 5, "retain_loss": "l2", "maintain_unlearned": True},
    ],
    "rewritten_transfer": [
        {"rewritten_data": REWRITTEN},
        {"rewritten_data": REWRITTEN, "sites": ("hook_resid_post",), "rewritten_ce_coef": 0.0},
        {"rewritten_data": REWRITTEN, "layers": [1], "retain_loss": "l2", "matched_only": True},
    ],
    "rmu": [
        {},
        {
            "layer": 0,
            "update_params": ["mlp.dense_4h_to_h.weight"],
            "steering_coef": 5.0,
            "direction_seed": 3,
        },
        {"layer": 1, "update_layers": [1], "retain_loss": "l2", "retain_layers": [0, 1]},
        {"retain_loss": "kl", "forget_coef": 2.0, "forget_ramp": "forget_decay"},
        {"retain_loss": "nll", "retain_coef": 0.0},
    ],
    "npo": [
        {},
        {"reduction": "token", "beta": 0.5, "retain_loss": "kl"},
        {"reduction": "sequence_mean", "retain_loss": "l2", "retain_layers": [1]},
        {"retain_coef": 0.0, "forget_ramp": "forget_decay"},
    ],
    "simnpo": [
        {},
        {"beta": 2.5, "gamma": 1.0, "retain_loss": "kl"},
        {"retain_loss": "mse", "retain_layers": [0], "retain_ramp": "retain_warmup"},
        {"retain_coef": 0.0},
    ],
    "grad_diff": [
        {},
        {"retain_loss": "kl", "forget_ramp": "forget_decay", "retain_ramp": "retain_warmup"},
        {"retain_loss": "l2", "retain_layers": [0], "forget_coef": 0.5},
        {"retain_coef": 0.0},
    ],
    "undo": [
        {"teacher": TEACHER},
        {"teacher": TEACHER, "alpha": 1.0, "beta": 0.5, "noise_seed": 3, "retain_loss": "nll"},
        {"teacher": TEACHER, "retain_loss": "l2", "retain_layers": [1], "forget_coef": 2.0},
        {"teacher": TEACHER, "retain_coef": 0.0, "forget_ramp": "forget_decay"},
    ],
    "tar": [
        {},
        {"retain_loss": "nll", "forget_coef": 2.0, "forget_ramp": "forget_decay"},
        {"retain_loss": "l2", "retain_layers": [1]},
        {"retain_coef": 0.0},
    ],
    "rewind_distill": [
        REWIND_FIXED,
        {**REWIND_FIXED, "teacher": TEACHER, "retain_loss": "mse", "retain_layers": [0]},
        {**REWIND_FIXED, "retain_loss": "nll", "retain_ramp": "retain_warmup"},
        {**REWIND_FIXED, "retain_coef": 0.0},
    ],
}
"""Settings the contract runs for each method, as changes to its registered defaults: the defaults
first (apart from inputs a method cannot default), then non-default settings."""

CASES = [
    pytest.param(name, kwargs, False, id=f"{name}-{i}")
    for name in REGISTRY
    for i, kwargs in enumerate(VARIANTS.get(name, [{}]))
] + [pytest.param(name, VARIANTS[name][0], True, id=f"{name}-lora") for name in REGISTRY]


FORGET_DOCS = [{"text": text[: 8 * (i + 1)]} for i, text in enumerate(TINY_TEXTS)]
RETAIN_DOCS = [{"text": text[: 6 * (4 - i)]} for i, text in enumerate(TINY_TEXTS)]
MAX_LEN = 24


@pytest.fixture(scope="module")
def batches(tiny_lm):
    """A forget and a retain batch of 4 rows each, of unequal lengths (so padding is exercised)."""
    _, tokenizer = tiny_lm
    forget = tokenize_documents(tokenizer, FORGET_DOCS, max_len=MAX_LEN)
    retain = tokenize_documents(tokenizer, RETAIN_DOCS, max_len=MAX_LEN)
    forget_batch, retain_batch = PairedBatches(forget, retain, batch_size=4).at(0)
    assert (forget_batch.attention_mask == 0).any() and (retain_batch.attention_mask == 0).any()
    return {FORGET: forget_batch, RETAIN: retain_batch}


def _config(name: str, kwargs: dict, tmp_path, model, tokenizer):
    if kwargs.get("lens_path") == TUNED_LENS:
        lens = TunedLens.for_model(model)
        with torch.no_grad():
            for translator in lens.translators:
                translator.weight.add_(0.1 * torch.randn_like(translator.weight))
        kwargs = {**kwargs, "lens_path": str(lens.save(tmp_path / "lens"))}
    if TEACHER in (kwargs.get("teacher"), kwargs.get("checkpoint")):
        teacher = copy.deepcopy(model)
        with torch.no_grad():
            for param in teacher.parameters():
                param.add_(0.05 * torch.randn_like(param))
        for path in (tmp_path / "teacher", tmp_path / "teacher" / "checkpoints" / "step1"):
            teacher.save_pretrained(path)
            tokenizer.save_pretrained(path)
        kwargs = {k: str(tmp_path / "teacher") if v == TEACHER else v for k, v in kwargs.items()}
    if kwargs.get("maps_path") == MAPS:
        d = model.config.hidden_size
        maps = {
            layer: AffineMap(torch.eye(d) + 0.1 * torch.randn(d, d), 0.1 * torch.randn(d))
            for layer in range(N_LAYERS)
        }
        kwargs = {**kwargs, "maps_path": str(save_maps(maps, tmp_path / "maps"))}
    if kwargs.get("probe_path") == PROBES:
        probes = {
            layer: TransformerProbe(
                model.config.hidden_size, probe_depth(layer, N_LAYERS), d_probe=16, n_heads=2
            )
            for layer in range(N_LAYERS)
        }
        kwargs = {**kwargs, "probe_path": str(save_probes(probes, tmp_path / "probes"))}
    if kwargs.get("rewritten_data") == REWRITTEN:
        path = tmp_path / "rewritten.jsonl"
        twins = [
            " ".join(w[::-1] if i % 2 else w for i, w in enumerate(doc["text"].split(" ")))
            for doc in FORGET_DOCS
        ]
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in twins))
        kwargs = {**kwargs, "rewritten_data": str(path)}
    if kwargs.get("scores_path") == SCORES:
        rows = [tokenize_documents(tokenizer, d, MAX_LEN) for d in (FORGET_DOCS, RETAIN_DOCS)]
        lengths = [[len(row) for row in docs.ids] for docs in rows]
        flat = torch.randn(sum(map(sum, lengths)), dtype=torch.float64)
        scores = TokenScores({"forget_dev": flat}, *lengths, *map(documents_key, rows))
        kwargs = {**kwargs, "scores_path": str(save_token_scores(scores, tmp_path / "scores"))}
    return replace_flat(registration(name).default_config(), **kwargs)


def _context(model, tokenizer, tmp_path, num_steps: int = 3, device: str = "cpu") -> Context:
    """What a run hands `build`: the tiny model, the contract's documents, no items."""
    return Context(
        model=model,
        tokenizer=tokenizer,
        source="tiny",
        forget_docs=FORGET_DOCS,
        retain_docs=RETAIN_DOCS,
        items={},
        data=DataConfig(max_len=MAX_LEN, batch_size=4),
        training=TrainingConfig(num_steps=num_steps),
        device=device,
        out_dir=tmp_path,
    )


def _build(name: str, cfg, model, tokenizer, tmp_path):
    """The method of the first phase of the registered method's plan."""
    plan = registration(name).build(cfg, _context(model, tokenizer, tmp_path))
    assert plan.phases and all(phase.num_steps == 3 for phase in plan.phases)
    return plan.phases[0].method


def _wire(model, tokenizer, cfg, name: str, use_lora: bool, tmp_path):
    """(method, trainable, base, compiled step) as `train` builds them, trainable moved off θ0.

    The base copy of full fine-tuning keeps requires_grad=True on purpose: a method that reads the
    base model without `grad=False` would then leak gradients into it, which the contract catches.
    Under LoRA the base is the trainable model with its adapters disabled, as `train` makes it.
    """
    method = _build(name, cfg, model, tokenizer, tmp_path)
    trainable = copy.deepcopy(model).requires_grad_(True)
    if use_lora:
        trainable = add_lora(trainable, LoraSettings(lora_rank=4))
        base = adapters_disabled(trainable)
    else:
        base = copy.deepcopy(model).eval().requires_grad_(True)
    trainable.train()
    # Circuit breakers have a zero gradient exactly at θ0 (cos(h, h) = 1 is a maximum and
    # ‖h − h0‖ = 0); a small perturbation of the trainable weights makes every gradient informative.
    with torch.no_grad():
        for param_name, param in trainable.named_parameters():
            if param.requires_grad and (not use_lora or "lora_B" in param_name):
                param.add_(0.02 * torch.randn_like(param))
    models = {TRAINABLE: trainable, BASE: base, **extra_models(method)}
    step = StepGraph(list(method.nodes)).compile(models)
    return method, trainable, base, step


def _forget_objective(method, step, batches) -> torch.Tensor:
    """The unweighted sum of every term but "retain" (forget, orth, ...)."""
    acts = step(batches)
    return sum(
        term.fn(acts, batches[FORGET], batches[RETAIN])
        for term in method.terms
        if term.name != "retain"
    )


def _terms(method, step, batches, progress: float = 0.0) -> dict[str, torch.Tensor]:
    acts = step(batches)
    return {
        term.name: term.fn(acts, batches[FORGET], batches[RETAIN]) * term.weight(progress)
        for term in method.terms
    }


def _block_outputs(model, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output (plain forward hooks, no nnsight) and the final logits."""
    outputs = []
    hooks = [
        block.register_forward_hook(lambda module, args, output: outputs.append(output))
        for block in model.gpt_neox.layers
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, logits


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum())


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lens_unlearn", {"forget_loss": "max_entropy"}),
        ("lens_unlearn", {"forget_loss": "ce_max", "retain_loss": "l2"}),
        ("circuit_breakers", {"ref_jitter": 0.0}),
        ("circuit_breakers", {"retain_loss": "kl", "layers": [0, 1], "ref_jitter": 0.0}),
    ],
)
def test_unweighted_terms_at_theta0_match_hand_values(name, kwargs, tiny_lm, batches, tmp_path):
    """At θ0 (trainable == base), recomputed from plain forward hooks, with h_l = block l's output,
    lens_l = lm_head(final_layer_norm(h_l)) and m = the forget token mask:

    - lens max_entropy: mean_l masked-mean_t (logsumexp z − mean z − log V) / log V, z = lens_l,
      over the positions t that predict a selected token (m_{t+1} = 1);
    - lens ce_max: mean_l of the mean over scored tokens (t ≥ 1, m_t) of log softmax(z_{t−1})[x_t];
    - circuit breakers forget (without the reference jitter, tested in test_losses): cos(h, h) = 1
      at every token, so exactly 1; orth: pooled
      p_b = Σ_t m h / Σ_t m, p̂ = p / ‖p‖, Σ_{b≠b'} ReLU(p̂_b·p̂_b') / (B(B−1)|L|) · mean_b Σ_t m;
    - every retain term (KL, L2) is 0 against an identical model.
    """
    model, tokenizer = tiny_lm
    cfg = replace_flat(registration(name).config(), **kwargs)
    method = _build(name, cfg, model, tokenizer, tmp_path)
    base = copy.deepcopy(model).eval().requires_grad_(False)
    step = StepGraph(list(method.nodes)).compile({TRAINABLE: copy.deepcopy(model), BASE: base})
    with torch.no_grad():
        values = {k: float(v) for k, v in _terms(method, step, batches, progress=1.0).items()}
        weights = {term.name: term.weight(1.0) for term in method.terms}
        values = {k: v / weights[k] for k, v in values.items()}

    forget = batches[FORGET]
    acts, _ = _block_outputs(model, forget)
    mask = forget.token_mask.float()
    layers = range(N_LAYERS) if cfg.layers is None else cfg.layers
    if name == "lens_unlearn":
        with torch.no_grad():
            lenses = [
                model.lm_head(model.gpt_neox.final_layer_norm(acts[layer])) for layer in layers
            ]
        if cfg.forget_loss == "max_entropy":
            log_vocab = math.log(lenses[0].shape[-1])
            predicting = torch.zeros_like(mask)
            predicting[:, :-1] = mask[:, 1:]
            per_layer = [
                _masked_mean((z.logsumexp(-1) - z.mean(-1) - log_vocab) / log_vocab, predicting)
                for z in lenses
            ]
        else:
            tokens = forget.input_ids
            per_layer = [
                _masked_mean(
                    z[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0], mask[:, 1:]
                )
                for z in lenses
            ]
        expected = {"forget": sum(per_layer) / len(per_layer)}
    else:
        layers = range(1, N_LAYERS) if cfg.layers is None else cfg.layers
        expected = {"forget": 1.0}
        batch_size, pair_sum = mask.shape[0], 0.0
        for layer in layers:
            pooled = (acts[layer] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            unit = pooled / pooled.norm(dim=-1, keepdim=True)
            for b in range(batch_size):
                for other in range(batch_size):
                    if b != other:
                        pair_sum += float((unit[b] @ unit[other]).relu())
        orth = pair_sum / (batch_size * (batch_size - 1) * len(layers)) * float(mask.sum(1).mean())
        expected["orth"] = orth
    expected["retain"] = 0.0
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_registry_names_are_unique_and_lowercase():
    names = list(REGISTRY)
    assert len(names) == len(set(names))
    for name, reg in REGISTRY.items():
        assert name == reg.name and name == name.lower() and name.isidentifier(), name
        assert dataclasses.is_dataclass(reg.config) and reg.summary
        assert isinstance(reg.default_config(), reg.config)
    config_classes = [reg.config for reg in REGISTRY.values()]
    assert len(set(config_classes)) == len(config_classes)


def test_register_refuses_a_taken_or_malformed_name(monkeypatch):
    monkeypatch.setattr("unlearn.methods.plan.REGISTRY", dict(REGISTRY))
    taken = dataclasses.replace(REGISTRY["lens_unlearn"], summary="another")
    with pytest.raises(ValueError, match="already registered"):
        register(taken)
    with pytest.raises(ValueError, match="lowercase identifier"):
        register(dataclasses.replace(taken, name="Lens-2"))
    with pytest.raises(ValueError, match="unknown method 'nope'; registered: lens_unlearn"):
        registration("nope")


def test_every_method_has_contract_variants():
    """A new method must list its non-default settings in VARIANTS, defaults first (apart from
    the inputs a method cannot default: checkpoint transfer's given teacher checkpoint, probe
    unlearn's probes, rewritten transfer's twins outside the toy world, UNDO's unlearned teacher,
    rewind-and-distill's given checkpoint)."""
    assert set(VARIANTS) == set(REGISTRY)
    required = {
        "checkpoint_transfer": TEACHER_FIXED,
        "probe_unlearn": {"probe_path": PROBES},
        "rewritten_transfer": {"rewritten_data": REWRITTEN},
        "detractor": {"scores_path": SCORES},
        "undo": {"teacher": TEACHER},
        "rewind_distill": REWIND_FIXED,
    }
    for name, variants in VARIANTS.items():
        assert variants[0] == required.get(name, {})


def test_sequential_builds_one_phase_per_block_back_to_front(tiny_lm, tmp_path):
    """2 blocks: phases layer1 then layer0, each training its own block (and, maintained, the
    ones already done), seeds offset by the phase index, every route into one frozen original."""
    model, tokenizer = tiny_lm
    ctx = _context(model, tokenizer, tmp_path)
    build = registration("sequential").build
    plan = build(registration("sequential").config(), ctx)
    assert [(p.name, p.blocks, p.seed_offset) for p in plan.phases] == [
        ("layer1", (1,), 0),
        ("layer0", (0,), 1),
    ]
    originals = {id(p.method.models["original"]) for p in plan.phases}
    assert len(originals) == 1 and id(model) not in originals
    maintained = build(registration("sequential").config(maintain_unlearned=True), ctx)
    assert [p.blocks for p in maintained.phases] == [(1,), (1, 0)]


@pytest.mark.parametrize("name, kwargs, use_lora", CASES)
def test_loss_is_finite_scalar_and_grads_reach_only_trainable(
    name, kwargs, use_lora, tiny_lm, batches, tmp_path
):
    model, tokenizer = tiny_lm
    cfg = _config(name, kwargs, tmp_path, model, tokenizer)
    method, trainable, base, step = _wire(model, tokenizer, cfg, name, use_lora, tmp_path)
    names = [term.name for term in method.terms]
    assert len(names) == len(set(names)) and set(names) - {"retain"}

    terms = _terms(method, step, batches, progress=0.5)
    total = sum(terms.values())
    assert total.shape == () and total.dtype == torch.float32
    assert torch.isfinite(total)
    torch.autograd.backward(total)

    with_grad = {n for n, p in trainable.named_parameters() if p.grad is not None}
    requires_grad = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert with_grad, "no parameter received a gradient"
    assert with_grad <= requires_grad
    if use_lora:
        assert requires_grad == {n for n, _ in trainable.named_parameters() if "lora_" in n}
    grads = [p.grad for p in trainable.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # Under LoRA the base shares the (disabled) adapters: its own weights are the rest.
    frozen = [p for n, p in base.named_parameters() if not (use_lora and "lora_" in n)]
    assert all(p.grad is None for p in frozen), "a gradient reached the base model"


@pytest.mark.parametrize("name, kwargs, use_lora", CASES)
def test_one_step_lowers_the_forget_objective(name, kwargs, use_lora, tiny_lm, batches, tmp_path):
    """One small step along the gradient of the forget objective (every term but "retain",
    unweighted) lowers it on the same batch.

    Random terms (random_ce) are evaluated under the same seed both times, so the same targets.
    """
    model, tokenizer = tiny_lm
    cfg = _config(name, kwargs, tmp_path, model, tokenizer)
    method, trainable, _, step = _wire(model, tokenizer, cfg, name, use_lora, tmp_path)
    params = [p for p in trainable.parameters() if p.requires_grad]

    torch.manual_seed(1)
    before = _forget_objective(method, step, batches)
    grads = torch.autograd.grad(before, params, allow_unused=True)
    grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    assert grad_norm > 0
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                param.sub_(1e-2 * grad / grad_norm)  # a step of length 1e-2 in weight space
        torch.manual_seed(1)
        after = _forget_objective(method, step, batches)
    assert float(after) < float(before.detach()), (float(before.detach()), float(after))


@pytest.mark.parametrize("name, kwargs", [(n, kw) for n in REGISTRY for kw in VARIANTS[n]])
def test_config_round_trips(name, kwargs):
    """asdict -> from_dict gives an equal config; so does the CLI built from its flat settings."""
    config_cls = registration(name).config
    cfg = replace_flat(registration(name).default_config(), **kwargs)
    assert from_dict(config_cls, dataclasses.asdict(cfg)) == cfg

    def flat(values):
        for key, value in values.items():
            yield from flat(value) if isinstance(value, dict) else [(key, value)]

    args = []
    for key, value in flat(dataclasses.asdict(cfg)):
        if value is None:
            continue  # None is the default of every optional field
        args += (
            [f"--{key}", *map(str, value)]
            if isinstance(value, list | tuple)
            else [f"--{key}", str(value)]
        )
    assert simple_parsing.parse(config_cls, args=args) == cfg
    assert simple_parsing.parse(config_cls, args=[]) == config_cls()


def test_config_parse_sets_nondefault_values():
    config_cls = registration("circuit_breakers").config
    cfg = simple_parsing.parse(
        config_cls, args=["--layers", "0", "1", "--orth_coef", "0", "--retain_loss", "kl"]
    )
    assert cfg.layers == [0, 1] and cfg.orth_coef == 0.0 and cfg.retain.retain_loss == "kl"
    assert cfg.forget.forget_coef == config_cls().forget.forget_coef


def test_ramp_values_by_hand():
    """Ramp(a, b)(p) = a + (b - a) * clamp(p, 0, 1).

    Ramp(0.1, 1.0): p=0 -> 0.1, p=0.5 -> 0.1 + 0.9 * 0.5 = 0.55, p=1 -> 1.0;
    clamped: p=-1 -> 0.1, p=3 -> 1.0.
    Ramp(1.0, 0.75): p=0.4 -> 1 - 0.25 * 0.4 = 0.9.
    """
    warmup = Ramp(0.1, 1.0)
    assert warmup(0.0) == pytest.approx(0.1)
    assert warmup(0.5) == pytest.approx(0.55)
    assert warmup(1.0) == pytest.approx(1.0)
    assert warmup(-1.0) == pytest.approx(0.1)
    assert warmup(3.0) == pytest.approx(1.0)
    assert Ramp(1.0, 0.75)(0.4) == pytest.approx(0.9)
    assert Ramp()(0.7) == 1.0


def test_named_ramps_match_the_reference_schedules():
    """ALGORITHMS.md 2.3 at c = 0.2: c = 0.2, 0.1 + 0.9c = 0.28, 1 - 0.25c = 0.95, 1."""
    assert RAMPS["ramp_up"](0.2) == pytest.approx(0.2)
    assert RAMPS["retain_warmup"](0.2) == pytest.approx(0.28)
    assert RAMPS["forget_decay"](0.2) == pytest.approx(0.95)
    assert RAMPS["constant"](0.2) == 1.0


def test_term_weight_is_coef_times_ramp():
    term = Term("x", lambda acts, forget, retain: acts["x"], coef=4.0, ramp=Ramp(0.5, 1.0))
    assert term.weight(0.0) == pytest.approx(2.0)
    assert term.weight(0.5) == pytest.approx(3.0)  # 4 * (0.5 + 0.5 * 0.5)


def test_method_configs_choose_their_ramps(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    lens_cfg = replace_flat(registration("lens_unlearn").config(), forget_coef=5.0, retain_coef=2.0)
    lens = _build("lens_unlearn", lens_cfg, model, tokenizer, tmp_path)
    weights = {term.name: term.weight(1.0) for term in lens.terms}
    assert weights == pytest.approx({"forget": 5.0 * 0.75, "retain": 2.0 * 1.0})
    cb_cfg = registration("circuit_breakers").config(orth_coef=10.0, orth_ramp="constant")
    cb = _build("circuit_breakers", cb_cfg, model, tokenizer, tmp_path)
    assert {term.name: term.weight(0.0) for term in cb.terms} == pytest.approx(
        {"forget": 1.0, "orth": 10.0, "retain": 0.1}
    )
    cb_plain = CircuitBreakers(CircuitBreakersConfig(orth_coef=0.0), N_LAYERS)
    assert [term.name for term in cb_plain.terms] == ["forget", "retain"]


def test_zero_coefficients_drop_terms_and_their_reads():
    orth_only = CircuitBreakers(
        replace_flat(CircuitBreakersConfig(), forget_coef=0.0, retain_coef=0.0), N_LAYERS
    )
    assert [term.name for term in orth_only.terms] == ["orth"]
    assert [node.name for node in orth_only.nodes] == ["forget_acts"]
    forget_only = LensUnlearn(replace_flat(LensUnlearnConfig(), retain_coef=0.0), N_LAYERS)
    assert [term.name for term in forget_only.terms] == ["forget"]
    assert all(node.batch == FORGET for node in forget_only.nodes)


def test_stack_shares_equal_nodes_and_keeps_all_terms():
    retain = retain_component("kl")
    forget_term = Term("forget", lambda acts, forget, retain: acts["retain_logits"].mean())
    combined = stack(retain, Stacked(nodes=retain.nodes[:1], terms=(forget_term,)))
    assert combined.nodes == retain.nodes  # the shared "retain_logits" read appears once
    assert [term.name for term in combined.terms] == ["retain", "forget"]


def test_stack_rejects_name_clashes():
    kl, nll = retain_component("kl"), retain_component("nll")
    with pytest.raises(ValueError, match="loss term named 'retain'"):
        stack(kl, Stacked(terms=(Term("retain", kl.terms[0].fn),)))
    other = Stacked(nodes=(dataclasses.replace(kl.nodes[0], batch=FORGET),))
    with pytest.raises(ValueError, match="different nodes named 'retain_logits'"):
        stack(nll, other)
    with pytest.raises(ValueError, match="loss term named"):
        stack(
            LensUnlearn(LensUnlearnConfig(), N_LAYERS),
            CircuitBreakers(CircuitBreakersConfig(), N_LAYERS),
        )


def test_retain_component_rejects_unknown_kind():
    with pytest.raises((ValueError, TypeError), match="kl.*nll.*l2.*mse"):  # TypeError: jaxtyping
        retain_component("cosine")  # type: ignore[arg-type]


READOUT = ("embed_out", "gpt_neox.final_layer_norm")
"""The tiny GPT-NeoX's unembedding and final norm."""


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lens_unlearn", {"retain_coef": 0.0}),
        ("lens_unlearn", {"retain_coef": 0.0, "lens_path": TUNED_LENS, "forget_loss": "ce_max"}),
        ("probe_unlearn", {"retain_coef": 0.0, "probe_path": PROBES}),
    ],
)
def test_lens_terms_never_reach_the_readout(name, kwargs, tiny_lm, batches, tmp_path):
    """Under full fine-tuning a lens (or probe) decode goes through a frozen copy of the final norm
    and unembedding: the forget term's gradient is zero on them and nonzero on the blocks, and
    training on it alone leaves the readout's weights bit-identical."""
    from unlearn.training import OptimSettings, train

    model, tokenizer = tiny_lm
    cfg = _config(name, kwargs, tmp_path, model, tokenizer)
    method, trainable, _, step = _wire(model, tokenizer, cfg, name, False, tmp_path)
    _forget_objective(method, step, batches).backward()
    grads = {n: p.grad for n, p in trainable.named_parameters()}
    for n, grad in grads.items():
        if n.startswith(READOUT):
            assert grad is None or not grad.any(), n
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "layers.0" in n)

    fresh = copy.deepcopy(model).requires_grad_(True)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters() if n.startswith(READOUT)}
    pairs = PairedBatches(*_docs(tokenizer), batch_size=4)
    optim = OptimSettings(lr=1e-2, warmup_steps=1)
    result = train(fresh, method, pairs, num_steps=3, out_dir=tmp_path / "run", optim=optim)
    params = dict(result.model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in before.items())
    assert not torch.equal(
        params["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"],
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight,
    )


def _docs(tokenizer):
    forget_docs = [{"text": text[: 8 * (i + 1)]} for i, text in enumerate(TINY_TEXTS)]
    retain_docs = [{"text": text[: 6 * (4 - i)]} for i, text in enumerate(TINY_TEXTS)]
    return (
        tokenize_documents(tokenizer, forget_docs, max_len=24),
        tokenize_documents(tokenizer, retain_docs, max_len=24),
    )


def test_the_logit_lens_at_the_last_layer_is_the_models_output(tiny_lm, batches):
    """Before training, decoding the last block's output (frozen readout copy, identity translator)
    equals the trainable model's own logits."""
    model, _ = tiny_lm
    method = LensUnlearn(LensUnlearnConfig(layers=[N_LAYERS - 1]), N_LAYERS)
    trainable = copy.deepcopy(model).requires_grad_(True)
    step = StepGraph(list(method.nodes)).compile({TRAINABLE: trainable, BASE: copy.deepcopy(model)})
    forget = batches[FORGET]
    with torch.no_grad():
        decoded = step(batches)["forget_lens"][0]
        logits = trainable(input_ids=forget.input_ids, attention_mask=forget.attention_mask).logits
    real = forget.attention_mask.bool()  # padded positions are not compared
    assert torch.allclose(decoded[real], logits[real], atol=1e-5)
