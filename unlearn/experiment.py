"""What every unlearning recipe does around its method: model, data, evaluation, outputs.

Recipes share three config groups (the tuned-lens "ingredients"): `ModelConfig` (the toy world by
default, or any Hugging Face name or local directory), `DataConfig` (forget/retain documents and
evaluation items; the toy world's by default) and `TrainingConfig` (steps, optimizer, LoRA,
evaluation and saving). `run_unlearning` evaluates the model, trains it with a method through
`unlearn.training.train`, evaluates it again and writes, into the output directory:

    run_info.json     the full config, git SHA, machine and command line
    metrics.jsonl     losses, coefficients and evaluations over steps
    training.png      those curves
    model/            the unlearned model (LoRA merged) and its tokenizer
    results.json      forget_acc (held-out forget items), retain_acc, the same before unlearning,
                      the attack-split and seen-template accuracies where the items exist

A rerun with the same output directory resumes training where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from unlearn.data import PairedBatches, tokenize_documents
from unlearn.eval import evaluate_mc
from unlearn.methods.base import Method
from unlearn.models import LoadedModel, load_model
from unlearn.plots import plot_training
from unlearn.provenance import write_run_info
from unlearn.toyworld import MODEL_NAMES, build_world, get_preset
from unlearn.toyworld.world import ToyWorld, read_jsonl
from unlearn.training import LoraSettings, OptimSettings, train

TOYWORLD = "toyworld"
"""`--model` value meaning the toy world's unfiltered model ("toyworld:filtered" for the twin)."""


@dataclass
class ModelConfig:
    """Which model to unlearn."""

    model: str = TOYWORLD
    """"toyworld" (the toy world's unfiltered model), "toyworld:filtered", a Hugging Face name,
    or a local directory written by save_pretrained."""
    revision: str | None = None
    """Hub revision, or checkpoint name of a local directory (e.g. "step400")."""
    world_preset: Literal["default", "tiny"] = "default"
    """Toy-world preset (built on first use)."""
    world_seed: int = 0
    """Toy-world seed."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype when loading (train in float32)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Device of the model."""


@dataclass
class DataConfig:
    """Forget/retain documents and evaluation items."""

    forget_data: str | None = None
    """JSON-lines forget documents ({"text", optional "facts"}); default: the toy world's attack
    split (non-reserved templates)."""
    retain_data: str | None = None
    """JSON-lines retain documents; default: the toy world's retain corpus."""
    eval_items: str | None = None
    """Directory of <split>.jsonl cloze items (forget_heldout and retain, optionally
    forget_attack); default: the toy world's items."""
    eval_template: Literal["reserved", "seen"] = "reserved"
    """Which toy-world template the headline numbers use (the other is reported too)."""
    max_len: int = 128
    """Longest document row in tokens."""
    batch_size: int = 16
    """Forget rows (and retain rows) per optimizer step."""
    use_value_mask: bool = False
    """Apply forget losses only at value tokens (per-token unlearning)."""
    max_forget_docs: int | None = None
    """Use only the first N forget documents."""


@dataclass
class TrainingConfig:
    """Optimization, adapters, evaluation and saving."""

    num_steps: int = 200
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """AdamW, or Muon on 2-D weights with AdamW on the rest."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warmup: constant, or a linear or cosine decay to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of forward passes."""
    lora_rank: int = 0
    """LoRA rank; 0 fine-tunes every weight."""
    lora_alpha: float = 16.0
    """LoRA alpha."""
    eval_every: int = 50
    """Steps between evaluations (0: start and end only)."""
    save_every: int = 50
    """Steps between resumable states."""
    seed: int = 0
    """Seed of data order and random loss targets."""

    def optim_settings(self) -> OptimSettings:
        """The optimizer settings `unlearn.training.train` takes."""
        return OptimSettings(
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            grad_clip=self.grad_clip,
            grad_accum=self.grad_accum,
            dtype=self.precision,
        )

    def lora_settings(self) -> LoraSettings | None:
        """LoRA settings, or None for full fine-tuning (`lora_rank` 0)."""
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha) if self.lora_rank else None


@dataclass
class Setup:
    """A loaded model with its data, ready to unlearn."""

    loaded: LoadedModel
    forget_docs: list[dict[str, Any]]
    retain_docs: list[dict[str, Any]]
    items: dict[str, dict[str, list[dict[str, Any]]]]
    """Template kind ("reserved"/"seen"/"items") -> split -> items."""
    world: ToyWorld | None = None
    """The toy world the data came from (None for user-supplied data)."""


def _read_docs(path: str, what: str) -> list[dict[str, Any]]:
    docs = list(read_jsonl(Path(path).expanduser()))
    if not docs:
        raise ValueError(f"{what} file {path} holds no documents")
    return docs


def load_setup(model_cfg: ModelConfig, data_cfg: DataConfig, weights: str | None = None) -> Setup:
    """Load the model and the data the configs name (building the toy world if needed).

    `weights` loads another model directory (e.g. an unlearned model) with the data that
    `model_cfg` implies: the toy world's for a toy-world config.

    Raises:
        ValueError: A non-toy model without forget/retain data or evaluation items.
    """
    world = None
    if model_cfg.model.split(":")[0] == TOYWORLD:
        name = model_cfg.model.partition(":")[2] or "unfiltered"
        if name not in MODEL_NAMES:
            raise ValueError(
                f"unknown toy-world model {name!r}; use toyworld[:{'|'.join(MODEL_NAMES)}]"
            )
        world = build_world(
            get_preset(model_cfg.world_preset, seed=model_cfg.world_seed),
            preset=model_cfg.world_preset,
        )
        source: str = str(world.model_dir(name))
    else:
        source = model_cfg.model
    if world is None and (
        data_cfg.forget_data is None or data_cfg.retain_data is None or data_cfg.eval_items is None
    ):
        raise ValueError(
            f"model {source!r} is not the toy world: pass --forget_data, --retain_data and "
            "--eval_items (JSON-lines documents and a directory of <split>.jsonl items)"
        )
    loaded = load_model(
        weights or source,
        revision=None if weights else model_cfg.revision,
        dtype=model_cfg.dtype,
        device=model_cfg.device,
    )
    forget = (
        _read_docs(data_cfg.forget_data, "forget")
        if data_cfg.forget_data
        else world.corpus("forget_attack")
    )  # type: ignore[union-attr]
    retain = (
        _read_docs(data_cfg.retain_data, "retain")
        if data_cfg.retain_data
        else world.corpus("retain")
    )  # type: ignore[union-attr]
    if data_cfg.max_forget_docs is not None:
        forget = forget[: data_cfg.max_forget_docs]
    if data_cfg.eval_items is not None:
        root = Path(data_cfg.eval_items).expanduser()
        splits = {p.stem: list(read_jsonl(p)) for p in sorted(root.glob("*.jsonl"))}
        missing = {"forget_heldout", "retain"} - splits.keys()
        if missing:
            raise ValueError(f"{root} lacks {sorted(missing)}.jsonl; it holds {sorted(splits)}")
        items = {"items": splits}
    else:
        items = {kind: world.items_by_split(kind) for kind in ("reserved", "seen")}  # type: ignore[union-attr]
    return Setup(loaded, forget, retain, items, world)


def evaluate(
    model: nn.Module, tokenizer: Any, items: Mapping[str, Mapping[str, Sequence]], headline: str
) -> dict[str, float]:
    """Accuracy on every item split, plus `forget_acc` (the held-out forget accuracy).

    Keys are `<split>_acc` for the headline template kind and `<split>_acc_<kind>` for the others.
    """
    scores: dict[str, float] = {}
    for kind, splits in items.items():
        suffix = "" if kind in (headline, "items") else f"_{kind}"
        for split, split_items in splits.items():
            scores[f"{split}_acc{suffix}"] = evaluate_mc(model, tokenizer, split_items).acc
    scores["forget_acc"] = scores["forget_heldout_acc"]
    return scores


def run_unlearning(
    make_method: Callable[[int], Method],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainingConfig,
    out_dir: str | Path,
    config: dict[str, Any],
    name: str = "unlearn",
    setup: Setup | None = None,
) -> dict[str, float]:
    """Evaluate, unlearn with the method `make_method(n_layers)`, evaluate, and write the outputs.

    `setup` reuses a model and data already loaded by `load_setup` (else they are loaded here).

    Returns:
        The contents of results.json.
    """
    out = Path(out_dir).expanduser()
    write_run_info(out, config)
    torch.manual_seed(train_cfg.seed)
    setup = setup if setup is not None else load_setup(model_cfg, data_cfg)
    model, tokenizer = setup.loaded.hf_model.float(), setup.loaded.tokenizer
    method = make_method(model.config.num_hidden_layers)
    headline = data_cfg.eval_template
    before = evaluate(model, tokenizer, setup.items, headline)

    batches = PairedBatches(
        tokenize_documents(tokenizer, setup.forget_docs, data_cfg.max_len),
        tokenize_documents(tokenizer, setup.retain_docs, data_cfg.max_len),
        batch_size=data_cfg.batch_size,
        seed=train_cfg.seed,
        use_value_mask=data_cfg.use_value_mask,
    )
    eval_items = {
        kind: {s: v for s, v in splits.items() if s in ("forget_heldout", "retain")}
        for kind, splits in setup.items.items()
        if kind in (headline, "items")
    }
    start = time.perf_counter()
    result = train(
        model,
        method,
        batches,
        num_steps=train_cfg.num_steps,
        out_dir=out,
        optim=train_cfg.optim_settings(),
        lora=train_cfg.lora_settings(),
        eval_fn=lambda m: evaluate(m, tokenizer, eval_items, headline),
        eval_every=train_cfg.eval_every,
        save_every=train_cfg.save_every,
        seed=train_cfg.seed,
        desc=name,
    )
    seconds = time.perf_counter() - start
    after = evaluate(result.model, tokenizer, setup.items, headline)

    result.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plot_training(history, out / "training.png", title=name)
    results = {
        **after,
        **{f"{k}_before": v for k, v in before.items()},
        "num_steps": train_cfg.num_steps,
        "train_seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def summary_table(results: Mapping[str, float]) -> str:
    """Held-out forget, attack-split forget and retain accuracy before and after, as text."""
    lines = [f"{'':<10}{'held-out forget':>17}{'attack forget':>15}{'retain':>9}"]
    for label, suffix in (("before", "_before"), ("after", "")):
        attack = results.get(f"forget_attack_acc{suffix}", float("nan"))
        lines.append(
            f"{label:<10}{results[f'forget_acc{suffix}']:>17.3f}{attack:>15.3f}"
            f"{results[f'retain_acc{suffix}']:>9.3f}"
        )
    return "\n".join(lines)
