"""Sequential unlearning: unlearn one block at a time, back to front, through the frozen original.

ALGORITHMS.md section 3.3 (the LoRA version, and the SFT version before commit 9a0f723). Blocks
are unlearned in phases, from `start` down to `end` in steps of `step`. In the phase of block L:

- forget term: the trainable model's output of block L on forget text (`blocks.L.hook_resid_post`)
  is routed into a frozen copy of the ORIGINAL model ("original"), which runs its own blocks
  L+1..N−1, final norm and unembedding; the routed logits, at positions that predict selected
  tokens, are pushed to maximum entropy (exact KL(U ‖ p) / log V), random targets (CE / log V) or a
  flat top-k. Later blocks are never the partially unlearned ones, so block L must hide the
  knowledge by itself. (The SFT version later switched to the live model's own logits; we keep the
  routing, as the LoRA version does.)
- retain term: KL, NLL or L2 (`retain.py`) through the updated model, against the original (θ0 in
  the reference), not against the model as it was at the start of the phase;
- only block L's parameters train (and, with `maintain_unlearned`, the blocks already done), full
  fine-tuning or LoRA adapters on those blocks; coefficient ramps restart every phase.

`SequentialLayer(cfg, n_layers, layer, original)` is the method of one phase (nodes, terms and the
"original" model); `run_sequential` runs every phase with `unlearn.training.train`, each in its
own `<out_dir>/layer<L>`, so a killed run resumes in the phase where it stopped::

    result = run_sequential(model, SequentialConfig(), batches, steps_per_layer=100, out_dir=out)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from interventions import Route
from interventions.sites import resolve_site
from unlearn.data import PairedBatches
from unlearn.losses import max_entropy_loss, random_target_ce_loss, top_k_entropy_loss
from unlearn.methods.base import BASE, FORGET, RAMPS, TRAINABLE, Node, RampName, Term
from unlearn.methods.lens_unlearn import predicting
from unlearn.methods.retain import RetainLoss, retain_component
from unlearn.training import (
    LORA_TARGETS,
    STATE_FILE,
    LoraSettings,
    NonFinitePolicy,
    OptimSettings,
    train,
)

ORIGINAL = "original"
"""Model name of the frozen original model (before any phase) in the step graph."""

SITE = "blocks.{l}.hook_resid_post"
"""Where the trainable model's activation crosses into the original."""


@dataclass
class SequentialConfig:
    """Sequential (back-to-front, layer-by-layer) unlearning settings."""

    start: int | None = None
    """First block unlearned; None means the last block."""
    end: int = 0
    """Last block unlearned (inclusive)."""
    step: int = 1
    """Blocks between phases (the reference's default 4 gives 31, 27, ... on 32 blocks)."""
    maintain_unlearned: bool = False
    """Also train the blocks already unlearned (on the retain term only: the forget term is routed
    past them) in each later phase."""
    forget_loss: Literal["max_entropy", "random_ce", "top_k"] = "max_entropy"
    """Forget objective on the routed logits: exact KL(U ‖ p) / log V, cross-entropy to random
    targets / log V (the reference default), or KL on the top `top_k` logits / log k."""
    top_k: int = 100
    """k of the top-k forget loss."""
    retain_loss: RetainLoss = "kl"
    """Retain objective (against the original model)."""
    forget_coef: float = 1.0
    """Peak forget coefficient."""
    retain_coef: float = 1.0
    """Peak retain coefficient."""
    forget_ramp: RampName = "forget_decay"
    """Forget coefficient schedule over each phase (a key of `unlearn.methods.base.RAMPS`)."""
    retain_ramp: RampName = "retain_warmup"
    """Retain coefficient schedule over each phase."""
    retain_layers: list[int] | None = None
    """Layers of the L2 retain loss; None means every layer."""

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"step must be >= 1 (blocks between phases), got {self.step}")
        if self.end < 0:
            raise ValueError(f"end must be a block index >= 0, got {self.end}")
        if self.start is not None and self.start < self.end:
            raise ValueError(
                f"start ({self.start}) < end ({self.end}): phases run back to front, so pass "
                "--start at or above --end"
            )
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2, got {self.top_k}")


def phase_layers(cfg: SequentialConfig, n_layers: int) -> list[int]:
    """The blocks unlearned, in phase order (back to front).

    Raises:
        ValueError: `start` is not a block of the model.
    """
    start = n_layers - 1 if cfg.start is None else cfg.start
    if not 0 <= start < n_layers:
        raise ValueError(f"start {start} is not a block of a {n_layers}-block model")
    return list(range(start, cfg.end - 1, -cfg.step))


def kept_layers(cfg: SequentialConfig, n_layers: int, layer: int) -> list[int]:
    """The blocks that train in `layer`'s phase: it, plus the ones already done if maintained."""
    if not cfg.maintain_unlearned:
        return [layer]
    layers = phase_layers(cfg, n_layers)
    return layers[: layers.index(layer) + 1]


def block_path(model: nn.Module, layer: int) -> str:
    """Module path of block `layer` (e.g. "gpt_neox.layers.3"); any architecture of the table."""
    return resolve_site(model, SITE.format(l=layer)).path


def set_trainable_layers_(model: nn.Module, layers: list[int]) -> list[str]:
    """Freeze every parameter of `model` but those of the given blocks; return their names."""
    prefixes = tuple(block_path(model, layer) + "." for layer in layers)
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            names.append(name)
    return names


class SequentialLayer:
    """Nodes, terms and the frozen original model of the phase that unlearns one block."""

    def __init__(
        self,
        cfg: SequentialConfig,
        n_layers: int,
        layer: int | None = None,
        original: nn.Module | None = None,
    ) -> None:
        """Declare the route into the original and the retain term.

        Args:
            cfg: The settings.
            n_layers: Number of blocks of the model.
            layer: The block this phase unlearns; None means the first phase's.
            original: The model before any phase (frozen here; it is not copied). None routes into
                `train`'s "base" instead, which is the original only in the first phase: enough
                for `SequentialLayer(cfg, n_layers)` as a one-phase method (the `METHODS` form).

        Raises:
            ValueError: `layer` is not a block of the model.
        """
        layer = phase_layers(cfg, n_layers)[0] if layer is None else layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is not a block of a {n_layers}-block model")
        self.layer = layer
        self.models: dict[str, Any] = {}
        reference = BASE
        if original is not None:
            self.models[ORIGINAL] = original.eval().requires_grad_(False)
            reference = ORIGINAL
        route = Route(
            "forget_routed",
            SITE.format(l=layer),
            source=TRAINABLE,
            target=reference,
            batch=FORGET,
        )
        losses: dict[str, Callable] = {
            "max_entropy": lambda z, mask: max_entropy_loss(z, mask),
            "random_ce": lambda z, mask: random_target_ce_loss(z, mask),
            "top_k": lambda z, mask: top_k_entropy_loss(z, mask, k=cfg.top_k),
        }
        forget_loss = losses[cfg.forget_loss]

        def forget_term(acts, forget, retain):
            return forget_loss(acts["forget_routed"], predicting(forget.token_mask))

        retain = retain_component(
            cfg.retain_loss, cfg.retain_layers or "all", cfg.retain_coef, RAMPS[cfg.retain_ramp]
        )
        # The retain reference is the original, not train()'s "base" (the model as this phase
        # found it): otherwise retain drift would compound over the phases.
        retain_nodes = tuple(
            dataclasses.replace(node, model=reference)
            if getattr(node, "model", None) == BASE
            else node
            for node in retain.nodes
        )
        self.nodes: tuple[Node, ...] = (route, *retain_nodes)
        self.terms: tuple[Term, ...] = (
            Term("forget", forget_term, cfg.forget_coef, RAMPS[cfg.forget_ramp]),
            *retain.terms,
        )


@dataclass
class PhaseResult:
    """One finished phase."""

    layer: int
    """The block it unlearned."""
    out_dir: Path
    """Its state and metrics.jsonl."""
    history: list[dict[str, float | int]]
    """Its records (steps count from 1 within the phase)."""


@dataclass
class SequentialResult:
    """What `run_sequential` returns."""

    model: nn.Module
    """The unlearned model (LoRA merged)."""
    phases: list[PhaseResult]
    """The phases, in the order they ran."""


def phase_dir(out_dir: str | os.PathLike[str], layer: int) -> Path:
    """Output directory of `layer`'s phase."""
    return Path(out_dir) / f"layer{layer}"


def is_finished(out_dir: str | os.PathLike[str], layer: int, steps_per_layer: int) -> bool:
    """Whether `layer`'s phase saved its final state."""
    path = phase_dir(out_dir, layer) / STATE_FILE
    return path.exists() and int(torch.load(path, weights_only=False)["step"]) >= steps_per_layer


def _phase_lora(model: nn.Module, lora: LoraSettings, layers: list[int]) -> LoraSettings:
    """LoRA settings whose targets are only the linear layers of the given blocks."""
    model_type = getattr(model.config, "model_type", "?")
    targets = lora.target_modules or LORA_TARGETS.get(model_type)
    if targets is None:
        raise ValueError(f"no default LoRA targets for model_type {model_type!r}; pass some")
    full = tuple(
        f"{path}.{name}"
        for path in (block_path(model, layer) for layer in layers)
        for name, _ in model.get_submodule(path).named_modules()
        if name.rpartition(".")[2] in targets
    )
    return dataclasses.replace(lora, target_modules=full)


def run_sequential(
    model: nn.Module,
    cfg: SequentialConfig,
    batches: PairedBatches,
    *,
    steps_per_layer: int,
    out_dir: str | os.PathLike[str],
    optim: OptimSettings | None = None,
    lora: LoraSettings | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    save_every: int = 50,
    seed: int = 0,
    original: nn.Module | None = None,
    on_nonfinite: NonFinitePolicy = "stop",
) -> SequentialResult:
    """Unlearn block by block, back to front; resume if `out_dir` holds phases already run.

    Each phase is one `train` call into `<out_dir>/layer<L>` with its own schedule (warmup and
    ramps restart). A phase that saved its final state trains no more steps: `train` only reloads
    its weights, so a rerun passes through the finished phases and resumes the interrupted one.

    Args:
        model: A Hugging Face causal LM (fp32 weights), changed in place. It must be the original
            model on every call, resumed or not: the phases' saved weights are applied to it.
        cfg: The settings.
        batches: Paired forget/retain batches (`unlearn.data.PairedBatches`), used by every phase.
        steps_per_layer: Optimizer steps per phase.
        out_dir: Root of the phases' output directories.
        optim: Optimizer settings of every phase (default: `OptimSettings()`).
        lora: LoRA adapters on the phase's blocks (merged at the end of each phase) instead of
            full fine-tuning of them.
        eval_fn: As for `train`, per phase.
        eval_every: As for `train`, per phase.
        save_every: As for `train`, per phase.
        seed: As for `train`; phase i uses seed + i, so random targets differ between phases.
        original: The frozen original for the routes and the retain reference; default: a copy of
            `model` as given.
        on_nonfinite: As for `train`, per phase.
    """
    n_layers = model.config.num_hidden_layers
    layers = phase_layers(cfg, n_layers)
    if original is None:
        original = copy.deepcopy(model)
    phases = []
    for index, layer in enumerate(layers):
        kept = kept_layers(cfg, n_layers, layer)
        set_trainable_layers_(model, [] if lora is not None else kept)
        result = train(
            model,
            SequentialLayer(cfg, n_layers, layer, original),
            batches,
            num_steps=steps_per_layer,
            out_dir=phase_dir(out_dir, layer),
            optim=optim or OptimSettings(),
            lora=_phase_lora(model, lora, kept) if lora is not None else None,
            eval_fn=eval_fn,
            eval_every=eval_every,
            save_every=save_every,
            seed=seed + index,
            on_nonfinite=on_nonfinite,
            desc=f"sequential layer {layer}",
        )
        model = result.model
        phases.append(PhaseResult(layer, phase_dir(out_dir, layer), result.history))
    model.requires_grad_(False)
    return SequentialResult(model, phases)
