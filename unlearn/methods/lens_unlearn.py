"""Tuned-lens unlearning: push every layer's lens prediction on forget tokens to maximum entropy.

Forget term (ALGORITHMS.md section 3.2): for each target layer l, decode the block output h_l
through the (tuned or logit) lens and take, over the positions that predict selected forget tokens
(every token, or only value tokens with a value mask), one of
- "max_entropy": the exact KL(U ‖ p_l) / log V (0 when the prediction is uniform);
- "random_ce": cross-entropy against uniformly random targets / log V, the reference's unbiased
  estimate of 1 + KL(U ‖ p_l) / log V;
- "ce_max": the negative cross-entropy of the lens prediction against the true next token,
averaged over layers. The last block's output decoded by the final norm and unembedding is the
model's own output, so layer L−1 needs no translator. Retain term: KL, NLL or L2 (`retain.py`).
Coefficients follow the reference's shapes: forget 1 − 0.25c, retain c (with a warm start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from interventions import Lens
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.lens import SITE, TunedLens
from unlearn.losses import ce_maximization_loss, max_entropy_loss, random_target_ce_loss
from unlearn.methods.base import (
    FORGET,
    TRAINABLE,
    ForgetSettings,
    Node,
    Term,
    TermFn,
)
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings


@dataclass
class LensUnlearnConfig:
    """Tuned-lens unlearning settings."""

    layers: list[int] | None = None
    """Target layers (block outputs); None means every layer."""
    lens_path: str | None = None
    """Directory of a tuned lens (`python -m recipes.tuned_lens`); None uses the logit lens."""
    forget_loss: Literal["max_entropy", "random_ce", "ce_max"] = "random_ce"
    """Forget objective on each layer's lens prediction."""
    forget: ForgetSettings = field(default_factory=ForgetSettings)
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(default_factory=RetainSettings)
    """Retain term."""


def predicting(token_mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Positions whose next token is selected: where a prediction of a selected token is made."""
    shifted = torch.zeros_like(token_mask, dtype=torch.bool)
    shifted[:, :-1] = token_mask[:, 1:].bool()
    return shifted


def lens_forget_term(kind: str, key: str) -> TermFn:
    """The forget term on decoded logits `acts[key]` ``[layer batch pos vocab]``, mean over layers.

    Shared by every method that decodes layers to the vocabulary (logit/tuned lens, probes).

    Args:
        kind: "max_entropy" / "random_ce" (at the positions that predict selected tokens) or
            "ce_max" (cross-entropy of the selected tokens, maximized).
        key: Name of the stacked logits in the step's activations.

    Raises:
        ValueError: Unknown kind.
    """
    losses = {
        "max_entropy": lambda z, batch: max_entropy_loss(z, predicting(batch.token_mask)),
        "random_ce": lambda z, batch: random_target_ce_loss(z, predicting(batch.token_mask)),
        "ce_max": lambda z, batch: ce_maximization_loss(z, batch.input_ids, batch.token_mask),
    }
    if kind not in losses:
        raise ValueError(f"unknown forget loss {kind!r}; choose from {sorted(losses)}")
    per_layer = losses[kind]

    def forget_term(acts, forget, retain):
        return torch.stack([per_layer(z, forget) for z in acts[key]]).mean()

    return forget_term


class LensUnlearn:
    """Nodes and terms of tuned-lens unlearning for a model with `n_layers` blocks."""

    def __init__(
        self, cfg: LensUnlearnConfig, n_layers: int, device: torch.device | str = "cpu"
    ) -> None:
        """Declare the lens reads on the forget batch and the retain term.

        Args:
            cfg: The settings.
            n_layers: Number of blocks of the model to unlearn.
            device: Where the model lives (the tuned lens is moved there).
        """
        layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
        lens = TunedLens.load(cfg.lens_path) if cfg.lens_path is not None else None
        translators = None
        if lens is not None:
            lens.requires_grad_(False).to(device)
            # A lens has translators for blocks 0..L-2 only: decoding the last block's output is
            # the model's own output, so that layer takes the identity.
            translators = {**lens.translator_map(), n_layers - 1: nn.Identity()}
        self.lens = lens
        forget_node = Lens(
            "forget_lens",
            SITE,
            layers=layers,
            translator=translators,
            model=TRAINABLE,
            batch=FORGET,
        )
        forget_term = lens_forget_term(cfg.forget_loss, "forget_lens")
        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (forget_node, *retain.nodes)
        self.terms: tuple[Term, ...] = (
            cfg.forget.term(forget_term),
            *retain.terms,
        )


def build(cfg: LensUnlearnConfig, ctx: Context) -> Plan:
    """One phase of lens unlearning over the run's steps."""
    return Plan([Phase(LensUnlearn(cfg, ctx.n_layers, device=ctx.device), ctx.training.num_steps)])


REGISTRATION = Registration(
    name="lens_unlearn",
    config=LensUnlearnConfig,
    build=build,
    summary="Tuned-lens unlearning: every layer's lens prediction on forget text to max entropy.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=9e-4)),
    inputs=lambda cfg, model_cfg, data_cfg: {"paths": {"lens_path": cfg.lens_path}},
)
