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
"original" model); `build` returns one `Phase` per block (named `layer<L>`, training only that
block's weights), which the training core runs in order (`unlearn.training.train_plan`), each in
its own `<out_dir>/layer<L>`, so a killed run resumes in the phase where it stopped::

    phases = sequential_phases(SequentialConfig(), model, steps_per_layer=100)
    results = train_plan(model, phases, batches, out_dir=out)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from interventions import Route
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.losses import max_entropy_loss, random_target_ce_loss, top_k_entropy_loss
from unlearn.methods.base import BASE, FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.lens_unlearn import predicting
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings

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

    forget: ForgetSettings = field(default_factory=ForgetSettings)
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(default_factory=RetainSettings)
    """Retain term (against the original model); ramps run over each phase."""

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
                for `SequentialLayer(cfg, n_layers)` as a one-phase method.

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

        retain = cfg.retain.component()
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
            cfg.forget.term(forget_term),
            *retain.terms,
        )


def sequential_phases(cfg: SequentialConfig, model: nn.Module, steps_per_layer: int) -> list[Phase]:
    """One phase per block, back to front, routed into a frozen copy of `model` as it is now."""
    n_layers = model.config.num_hidden_layers
    original = copy.deepcopy(model)
    return [
        Phase(
            SequentialLayer(cfg, n_layers, layer, original),
            steps_per_layer,
            name=f"layer{layer}",
            blocks=tuple(kept_layers(cfg, n_layers, layer)),
            seed_offset=index,
        )
        for index, layer in enumerate(phase_layers(cfg, n_layers))
    ]


def build(cfg: SequentialConfig, ctx: Context) -> Plan:
    """One phase per block of `ctx.training.num_steps` steps (the step count is per block)."""
    phases = sequential_phases(cfg, ctx.model, ctx.training.num_steps)
    return Plan(phases, {"phase_layers": phase_layers(cfg, ctx.n_layers)})


REGISTRATION = Registration(
    name="sequential",
    config=SequentialConfig,
    build=build,
    summary="Sequential unlearning: blocks back to front, forget routed through the original.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(
        num_steps=60,
        optim=OptimSettings(lr=2e-3, warmup_steps=5),
        eval_every=0,
        save_every=20,
    ),
)
