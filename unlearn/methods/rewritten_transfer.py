"""Rewritten activation transfer: pull forget activations onto those of a rewritten (false) text.

ALGORITHMS.md section 3.5. Forget document i has a rewritten twin i (the same text with its facts
replaced, the toy world's `forget_rewritten`). The frozen original model reads the twin; its block
outputs, aligned token by token to the original document (`unlearn.alignment.align_tokens`), are
the targets of a masked MSE on the trainable model's block outputs on the original document:
L_f = (1/|L|) Σ_l Σ_{b,s} m_bs · mean_d (h_l^θ(x)_bs − h_l^θ0(x')_{b,π_b(s)})² / Σ m,
with π_b the alignment of row b and m the forget token mask (all tokens, or value tokens only).
Retain term: KL, NLL or L2 (`retain.py`). The reference's extra (1−λ)·CE term was a Python float
and carried no gradient; here there is no such term, and every term carries gradient.

How rewritten rows are paired with forget rows: the frozen model and the rewritten corpus are
fixed, so the targets are constants per document. `rewritten_targets` computes them once, before
training, for every forget document (one no-grad pass over the rewritten corpus through the step
graph's own site names), keyed by document index; forget batches carry their rows' document
indices (`Batch.rows`, filled by `TokenizedDocuments.batch`), and the forget term gathers the rows'
targets. The training core and `PairedBatches` stay unchanged. The memory cost is
documents × tokens × layers × d_model (a few hundred MB for the toy world in float32; choose
`dtype="bfloat16"` or fewer layers for larger models).

Usage:
    >>> targets = rewritten_targets(model, forget_rows, rewritten_rows, layers=[1, 2])
    >>> method = RewrittenTransfer(RewrittenTransferConfig(layers=[1, 2]), n_layers, targets)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from interventions import Read, StepGraph
from unlearn.alignment import align_tokens
from unlearn.data import Batch, TokenizedDocuments
from unlearn.losses import activation_mse_loss
from unlearn.methods.base import FORGET, RAMPS, TRAINABLE, Node, RampName, Term
from unlearn.methods.retain import RetainLoss, retain_component

SITE = "blocks.{l}.hook_resid_post"
"""Where activations are compared: block outputs."""


@dataclass
class RewrittenTransferConfig:
    """Rewritten activation transfer settings."""

    layers: list[int] | None = None
    """Target layers (block outputs); None means every layer."""
    retain_loss: RetainLoss = "kl"
    """Retain objective."""
    forget_coef: float = 1.0
    """Peak forget (MSE) coefficient."""
    retain_coef: float = 1.0
    """Peak retain coefficient."""
    forget_ramp: RampName = "constant"
    """Forget coefficient schedule."""
    retain_ramp: RampName = "constant"
    """Retain coefficient schedule."""
    retain_layers: list[int] | None = None
    """Layers of the L2 retain loss; None means every layer."""
    matched_only: bool = False
    """Use only aligned positions whose tokens match (drop the rewritten spans themselves); not
    with a value-token mask, which keeps only the rewritten spans."""


class GatheredTargets(NamedTuple):
    """The targets of one batch's rows."""

    acts: Float[Tensor, "layer batch pos d_model"]
    """Aligned targets, zero at padding."""
    covered: Bool[Tensor, "batch pos"]
    """Positions that have a target (aligned, or matched with `matched_only`)."""


@dataclass(frozen=True)
class RewrittenTargets:
    """Per forget document: the frozen model's aligned activations on its rewritten twin."""

    layers: tuple[int, ...]
    """Layers of the targets, in order."""
    acts: list[Float[Tensor, "layer pos d_model"]]
    """Document i's targets, one per original token (pos = the original row's length)."""
    valid: list[Bool[Tensor, " pos"]]
    """Document i's aligned positions (all of them, unless the twin is empty)."""
    matched: list[Bool[Tensor, " pos"]]
    """Document i's positions whose token equals its aligned rewritten token."""

    def __len__(self) -> int:
        return len(self.acts)

    def gather(self, batch: Batch, matched_only: bool = False) -> GatheredTargets:
        """The targets of a batch's rows, padded to its width, and the positions they cover.

        Raises:
            ValueError: The batch carries no document indices, or an index out of range.
        """
        if batch.rows is None:
            raise ValueError(
                "rewritten transfer needs forget batches with document indices (Batch.rows): "
                "build them with TokenizedDocuments.batch or PairedBatches"
            )
        rows = batch.rows.tolist()
        if rows and not 0 <= min(rows) <= max(rows) < len(self):
            raise ValueError(f"forget rows {rows} are outside the {len(self)} rewritten targets")
        width = batch.input_ids.shape[1]
        first = self.acts[0]
        out = torch.zeros((first.shape[0], len(rows), width, first.shape[-1]), dtype=first.dtype)
        covered = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, i in enumerate(rows):
            n = self.acts[i].shape[1]
            out[:, r, :n] = self.acts[i]
            covered[r, :n] = self.matched[i] if matched_only else self.valid[i]
        device = batch.input_ids.device
        return GatheredTargets(out.to(device), covered.to(device))


def rewritten_targets(
    model: nn.Module,
    original: TokenizedDocuments,
    rewritten: TokenizedDocuments,
    layers: Sequence[int],
    batch_size: int = 32,
    dtype: Literal["float32", "bfloat16"] = "float32",
) -> RewrittenTargets:
    """Aligned targets: the frozen `model`'s block outputs on each rewritten twin.

    Each original token gets the activation at its aligned rewritten position.

    Args:
        model: The model as it is before unlearning (used without gradient, not changed).
        original: The forget documents, in the order the forget batches index them.
        rewritten: Their rewritten twins, in the same order.
        layers: Block outputs to keep.
        batch_size: Rewritten documents per forward pass.
        dtype: Storage dtype of the targets.

    Raises:
        ValueError: The two corpora have different lengths.
    """
    if len(original) != len(rewritten):
        raise ValueError(
            f"{len(original)} forget documents but {len(rewritten)} rewritten ones: document i of "
            "each must be the same document"
        )
    layers = tuple(layers)
    step = StepGraph([Read("acts", SITE, layers=list(layers), grad=False)]).compile(
        {"model": model}
    )
    alignments = [align_tokens(a, b) for a, b in zip(original.ids, rewritten.ids, strict=True)]
    device = next(model.parameters()).device
    acts, valid, matched = [], [], []
    for start in range(0, len(rewritten), batch_size):
        rows = list(range(start, min(start + batch_size, len(rewritten))))
        batch = rewritten.batch(rows).to(device)
        with torch.no_grad():
            batch_acts = step({"batch": batch})["acts"].to("cpu", getattr(torch, dtype))
        for r, i in enumerate(rows):
            alignment = alignments[i]
            acts.append(batch_acts[:, r, alignment.index].clone())
            valid.append(alignment.valid)
            matched.append(alignment.matched)
    return RewrittenTargets(layers, acts, valid, matched)


class RewrittenTransfer:
    """Nodes and terms of rewritten activation transfer (the targets are precomputed)."""

    def __init__(
        self, cfg: RewrittenTransferConfig, n_layers: int, targets: RewrittenTargets
    ) -> None:
        """Declare the forget read and the terms.

        Args:
            cfg: Settings.
            n_layers: Blocks of the model.
            targets: `rewritten_targets(...)` of the forget documents at `cfg.layers`.

        Raises:
            ValueError: The targets were computed at other layers.
        """
        layers = tuple(range(n_layers)) if cfg.layers is None else tuple(cfg.layers)
        if targets.layers != layers:
            raise ValueError(
                f"targets are at layers {list(targets.layers)} but the config asks for "
                f"{list(layers)}; compute them with rewritten_targets(..., layers={list(layers)})"
            )
        matched_only = cfg.matched_only

        def forget_term(acts, forget, retain):
            target_acts, covered = targets.gather(forget, matched_only)
            mask = forget.token_mask & covered
            return activation_mse_loss(acts["forget_acts"], target_acts.float(), mask)

        retain = retain_component(
            cfg.retain_loss, cfg.retain_layers or "all", cfg.retain_coef, RAMPS[cfg.retain_ramp]
        )
        self.nodes: tuple[Node, ...] = (
            Read("forget_acts", SITE, layers=list(layers), model=TRAINABLE, batch=FORGET),
            *retain.nodes,
        )
        self.terms: tuple[Term, ...] = (
            Term("forget", forget_term, cfg.forget_coef, RAMPS[cfg.forget_ramp]),
            *retain.terms,
        )
