"""Rewritten activation transfer: pull forget activations onto those of a rewritten (false) text.

ALGORITHMS.md section 3.5. Forget document i has a rewritten twin i (the same text with its facts
replaced, the toy world's `forget_rewritten`). The frozen original model reads the twin; its
activations at the configured sites, aligned token by token to the original document
(`unlearn.alignment.align_tokens`), are the targets of a masked MSE on the trainable model's
activations on the original document, averaged over the compared modules k (a site at one layer,
or the logits) as the reference averages over its hooked modules:
L_mse = (1/K) Σ_k Σ_{b,s} m_bs · mean_d (a_k^θ(x)_bs − a_k^θ0(x')_{b,π_b(s)})² / Σ m,
with π_b the alignment of row b and m the forget token mask (all tokens, or value tokens only).
Sites: block outputs (`hook_resid_post`), MLP outputs (`hook_mlp_out`, the reference's
`dense_4h_to_h`) at `layers`, and the logits (`unembed`, the reference's `embed_out`).

The reference adds (1−λ)·CE on the rewritten text; it took `.item()` of that loss, so it carried no
gradient. Here it is a real term, `rewritten_ce` (coefficient `rewritten_ce_coef`, 0 turns it off):
L_ce = −Σ_{b,t} m_bt log p_θ(x'_{b,π_b(t−1)+1} | x_{b,<t}) / Σ m, the next-token cross-entropy of
the trainable model reading the original document toward the twin's continuation of the aligned
position, at the forget mask's tokens. It is needed because the MSE cannot reach the position that
predicts a value: there the original and the twin share their prefix, so the frozen model's
activation on the twin equals the model's own and the MSE is zero. At that position L_ce is
exactly the twin's own cross-entropy (same prefix); inside a value of several tokens it conditions
on the original value's earlier tokens instead of the twin's (the trainable model reads only the
original documents: forget batches carry no twin rows).
Retain term: KL, NLL or L2 (`retain.py`). Every term carries gradient.

How rewritten rows are paired with forget rows: the frozen model and the rewritten corpus are
fixed, so the targets are constants per document. `rewritten_targets` computes them once, before
training, for every forget document (one no-grad pass over the rewritten corpus through the step
graph's own site names), keyed by document index; forget batches carry their rows' document
indices (`Batch.rows`, filled by `TokenizedDocuments.batch`), and the forget terms gather the rows'
targets. The training core and `PairedBatches` stay unchanged. The memory cost is documents ×
tokens × (layers × d_model per block site, + d_vocab for `unembed`): for the default toy world
(94k forget tokens, float32) about 190 MB per block site at 4 layers and 380 MB for the logits
(choose `dtype="bfloat16"` or fewer sites for larger models).

`build` reads the rewritten twins (`rewritten_data`, or the toy world's `forget_rewritten`), checks
that line i rewrites forget document i, and computes the targets before training. Its defaults
(the registration's): MSE (coefficient 1) at every block output, MLP output and the logits (the
reference's hook kinds), the twin's cross-entropy at the value tokens (coefficient 2; without it
held-out forget stays high), KL retain (coefficient 8), forget terms at value tokens only, 300
AdamW steps of 32 + 32 rows.

Usage:
    >>> cfg = RewrittenTransferConfig(layers=[1, 2], sites=("hook_resid_post", "unembed"))
    >>> targets = rewritten_targets(model, forget_rows, rewritten_rows, cfg.layers, cfg.sites)
    >>> method = RewrittenTransfer(cfg, n_layers, targets)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interventions import Read, StepGraph
from unlearn.alignment import align_tokens
from unlearn.config import TOYWORLD, DataConfig, ModelConfig, OptimSettings, TrainingConfig
from unlearn.data import Batch, TokenizedDocuments, read_documents, tokenize_documents
from unlearn.losses import activation_mse_loss, next_token_nll_loss
from unlearn.methods.base import FORGET, RAMPS, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings

SiteKind = Literal["hook_resid_post", "hook_mlp_out", "unembed"]
"""Where activations are compared: block outputs, MLP outputs (both at `layers`), or logits."""

LOGITS = "unembed"
"""The logits site (one module, no layers)."""


def site_names(kinds: Sequence[SiteKind]) -> tuple[str, ...]:
    """Step-graph site names of the given kinds (`{l}` templates for the block sites)."""
    return tuple(kind if kind == LOGITS else f"blocks.{{l}}.{kind}" for kind in kinds)


def _forget_key(site: str) -> str:
    return f"forget_{site}"


@dataclass
class RewrittenTransferConfig:
    """Rewritten activation transfer settings."""

    layers: list[int] | None = None
    """Layers of the block sites; None means every layer."""
    sites: tuple[SiteKind, ...] = ("hook_resid_post",)
    """Sites of the MSE: "hook_resid_post" (block outputs), "hook_mlp_out" (MLP outputs) at
    `layers`, "unembed" (logits). The MSE averages over every (site, layer) module."""
    rewritten_ce_coef: float = 0.0
    """Peak coefficient of the cross-entropy toward the rewritten twin's tokens (the reference's
    1−λ, whose term carried no gradient there); 0 turns the term off."""
    matched_only: bool = False
    """Use only aligned positions whose tokens match (drop the rewritten spans themselves) in the
    MSE; not with a value-token mask, which keeps only the rewritten spans."""
    rewritten_data: str | None = None
    """JSON-lines rewritten documents, line i the twin of forget document i; default: the toy
    world's forget_rewritten."""

    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Coefficient of the activation MSE (the reference's λ) and the schedule of both forget terms
    (the MSE and the rewritten cross-entropy)."""
    retain: RetainSettings = field(default_factory=lambda: RetainSettings(retain_ramp="constant"))
    """Retain term."""

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError(
                "sites is empty: name at least one of hook_resid_post, hook_mlp_out, unembed"
            )
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites {self.sites} repeats a site; name each once")


class AlignedLabels(NamedTuple):
    """Next-token labels from the twin for one batch (`RewrittenTargets.labels`, padded)."""

    labels: Int[Tensor, "batch pos"]
    """Label of token position t (scored from the logits at t − 1); 0 where not `labeled`."""
    labeled: Bool[Tensor, "batch pos"]
    """Positions that have a label."""


class GatheredTargets(NamedTuple):
    """The targets of one batch's rows, padded to the batch's width."""

    acts: dict[str, Float[Tensor, "layer batch pos _"]]
    """Per site kind: aligned target activations (one "layer" for the logits), zero at padding."""
    covered: Bool[Tensor, "batch pos"]
    """Positions that have a target (aligned, or matched with `matched_only`)."""


@dataclass(frozen=True)
class RewrittenTargets:
    """Per forget document: the frozen model's aligned activations on its twin, and labels."""

    sites: tuple[SiteKind, ...]
    """Site kinds of the targets, in order."""
    layers: tuple[int, ...]
    """Layers of the block sites, in order."""
    acts: dict[str, list[Float[Tensor, "layer pos _"]]]
    """Per site kind, document i's targets, one per original token (pos = the original row's
    length; d_model wide at block sites, d_vocab wide with a single "layer" at the logits)."""
    labels: list[Int[Tensor, " pos"]]
    """Document i's next-token labels from the twin: at position t ≥ 1, the twin token that
    follows the aligned position of t − 1, x'_{π(t−1)+1}: what the twin predicts where the
    original predicts token t. Where the prefixes agree (the position before a rewritten value)
    this is exactly the twin's own next token."""
    labeled: list[Bool[Tensor, " pos"]]
    """Document i's positions that have a label (not position 0, nor past the twin's end)."""
    valid: list[Bool[Tensor, " pos"]]
    """Document i's aligned positions (all of them, unless the twin is empty)."""
    matched: list[Bool[Tensor, " pos"]]
    """Document i's positions whose token equals its aligned rewritten token."""

    def __len__(self) -> int:
        return len(self.labels)

    def _rows(self, batch: Batch) -> list[int]:
        if batch.rows is None:
            raise ValueError(
                "rewritten transfer needs forget batches with document indices (Batch.rows): "
                "build them with TokenizedDocuments.batch or PairedBatches"
            )
        rows = batch.rows.tolist()
        if rows and not 0 <= min(rows) <= max(rows) < len(self):
            raise ValueError(f"forget rows {rows} are outside the {len(self)} rewritten targets")
        return rows

    def gather_labels(self, batch: Batch) -> AlignedLabels:
        """The twin's next-token labels of a batch's rows, padded to its width.

        Raises:
            ValueError: The batch carries no document indices, or an index out of range.
        """
        rows = self._rows(batch)
        width = batch.input_ids.shape[1]
        labels = torch.zeros((len(rows), width), dtype=torch.long)
        labeled = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, i in enumerate(rows):
            n = self.labels[i].shape[0]
            labels[r, :n] = self.labels[i]
            labeled[r, :n] = self.labeled[i]
        device = batch.input_ids.device
        return AlignedLabels(labels.to(device), labeled.to(device))

    def gather(self, batch: Batch, matched_only: bool = False) -> GatheredTargets:
        """The targets of a batch's rows, padded to its width, and the positions they cover.

        Raises:
            ValueError: The batch carries no document indices, or an index out of range.
        """
        rows = self._rows(batch)
        width = batch.input_ids.shape[1]
        device = batch.input_ids.device
        acts = {}
        for kind, per_doc in self.acts.items():
            first = per_doc[0]
            out = torch.zeros(
                (first.shape[0], len(rows), width, first.shape[-1]), dtype=first.dtype
            )
            for r, i in enumerate(rows):
                out[:, r, : per_doc[i].shape[1]] = per_doc[i]
            acts[kind] = out.to(device)
        covered = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, i in enumerate(rows):
            positions = self.matched[i] if matched_only else self.valid[i]
            covered[r, : positions.shape[0]] = positions
        return GatheredTargets(acts, covered.to(device))


def rewritten_targets(
    model: nn.Module,
    original: TokenizedDocuments,
    rewritten: TokenizedDocuments,
    layers: Sequence[int],
    sites: Sequence[SiteKind] = ("hook_resid_post",),
    batch_size: int = 32,
    dtype: Literal["float32", "bfloat16"] = "float32",
) -> RewrittenTargets:
    """Aligned targets: the frozen `model`'s activations at `sites` on each rewritten twin.

    Each original token gets the activations at its aligned rewritten position, and a next-token
    label from the twin (`RewrittenTargets.labels`).

    Args:
        model: The model as it is before unlearning (used without gradient, not changed).
        original: The forget documents, in the order the forget batches index them.
        rewritten: Their rewritten twins, in the same order.
        layers: Layers of the block sites.
        sites: Site kinds to keep.
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
    sites, layers = tuple(sites), tuple(layers)
    reads = [
        Read(kind, name, layers=None if kind == LOGITS else list(layers), grad=False)
        for kind, name in zip(sites, site_names(sites), strict=True)
    ]
    step = StepGraph(reads).compile({"model": model})
    alignments = [align_tokens(a, b) for a, b in zip(original.ids, rewritten.ids, strict=True)]
    device = next(model.parameters()).device
    acts: dict[str, list[Tensor]] = {kind: [] for kind in sites}
    labels, labeled, valid, matched = [], [], [], []
    for start in range(0, len(rewritten), batch_size):
        rows = list(range(start, min(start + batch_size, len(rewritten))))
        batch = rewritten.batch(rows).to(device)
        with torch.no_grad():
            out = step({"batch": batch})
        for kind in sites:
            # The logits are one module: give them a leading "layer" dim like the block sites.
            site_acts = out[kind][None] if kind == LOGITS else out[kind]
            site_acts = site_acts.to("cpu", getattr(torch, dtype))
            for r, i in enumerate(rows):
                acts[kind].append(site_acts[:, r, alignments[i].index].clone())
        for i in rows:
            alignment = alignments[i]
            # Label of t: the twin token after the aligned position of t - 1 (module docstring).
            follows = F.pad(alignment.index[:-1] + 1, (1, 0))
            has_label = alignment.valid & (follows < len(rewritten.ids[i]))
            has_label[0] = False
            twin = torch.tensor(rewritten.ids[i] or [0], dtype=torch.long)
            labels.append(torch.where(has_label, twin[follows.clamp(max=len(twin) - 1)], 0))
            labeled.append(has_label)
            valid.append(alignment.valid)
            matched.append(alignment.matched)
    return RewrittenTargets(sites, layers, acts, labels, labeled, valid, matched)


class RewrittenTransfer:
    """Nodes and terms of rewritten activation transfer (the targets are precomputed)."""

    def __init__(
        self, cfg: RewrittenTransferConfig, n_layers: int, targets: RewrittenTargets
    ) -> None:
        """Declare the forget reads and the terms.

        Args:
            cfg: Settings.
            n_layers: Blocks of the model.
            targets: `rewritten_targets(...)` of the forget documents at `cfg.layers`, `cfg.sites`.

        Raises:
            ValueError: The targets were computed at other layers or sites.
        """
        layers = tuple(range(n_layers)) if cfg.layers is None else tuple(cfg.layers)
        sites = tuple(cfg.sites)
        if targets.layers != layers or targets.sites != sites:
            raise ValueError(
                f"targets are at sites {list(targets.sites)}, layers {list(targets.layers)} but "
                f"the config asks for sites {list(sites)}, layers {list(layers)}; compute them "
                f"with rewritten_targets(..., layers={list(layers)}, sites={list(sites)})"
            )
        matched_only = cfg.matched_only

        def mse_term(acts, forget, retain):
            gathered = targets.gather(forget, matched_only)
            mask = forget.token_mask & gathered.covered
            total, modules = 0.0, 0
            for kind in sites:
                own = acts[_forget_key(kind)]
                own = own[None] if kind == LOGITS else own
                # Weighted by module count: the mean over every (site, layer) module.
                total = total + own.shape[0] * activation_mse_loss(
                    own, gathered.acts[kind].float(), mask
                )
                modules += own.shape[0]
            return total / modules

        def rewritten_ce_term(acts, forget, retain):
            labels, labeled = targets.gather_labels(forget)
            return next_token_nll_loss(
                acts[_forget_key(LOGITS)], labels, forget.token_mask & labeled
            )

        reads = {
            kind: Read(
                _forget_key(kind),
                name,
                layers=None if kind == LOGITS else list(layers),
                model=TRAINABLE,
                batch=FORGET,
            )
            for kind, name in zip(sites, site_names(sites), strict=True)
        }
        terms = [cfg.forget.term(mse_term)]
        if cfg.rewritten_ce_coef:
            reads.setdefault(
                LOGITS, Read(_forget_key(LOGITS), LOGITS, model=TRAINABLE, batch=FORGET)
            )
            terms.append(
                Term(
                    "rewritten_ce",
                    rewritten_ce_term,
                    cfg.rewritten_ce_coef,
                    RAMPS[cfg.forget.forget_ramp],
                )
            )
        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (*reads.values(), *retain.nodes)
        self.terms: tuple[Term, ...] = (*terms, *retain.terms)


def rewritten_documents(cfg: RewrittenTransferConfig, ctx: Context) -> list[dict]:
    """The rewritten twins of the context's forget documents, checked pair by pair.

    Raises:
        ValueError: No rewritten data for a model outside the toy world, or a twin whose id is not
            its forget document's.
    """
    if cfg.rewritten_data is not None:
        docs = read_documents(cfg.rewritten_data, "--rewritten_data")
    elif ctx.world is not None:
        docs = ctx.world.corpus("forget_rewritten")
    else:
        raise ValueError("pass --rewritten_data: rewritten twins of the forget documents")
    docs = docs[: len(ctx.forget_docs)]
    for original, rewritten in zip(ctx.forget_docs, docs, strict=False):
        if "id" in original and "id" in rewritten and original["id"] not in rewritten["id"]:
            raise ValueError(
                f"rewritten document {rewritten['id']!r} is not the twin of {original['id']!r}: "
                "line i of the rewritten data must rewrite forget document i"
            )
    return docs


def build(cfg: RewrittenTransferConfig, ctx: Context) -> Plan:
    """Align forget documents with their rewrites, compute the targets, one phase of transfer."""
    layers = list(range(ctx.n_layers)) if cfg.layers is None else cfg.layers
    # The same tokenization as the run's forget rows, so Batch.rows index these targets.
    targets = rewritten_targets(
        ctx.model,
        tokenize_documents(ctx.tokenizer, ctx.forget_docs, ctx.data.max_len),
        tokenize_documents(ctx.tokenizer, rewritten_documents(cfg, ctx), ctx.data.max_len),
        layers,
        sites=cfg.sites,
        batch_size=ctx.data.batch_size,
    )
    method = RewrittenTransfer(cfg, ctx.n_layers, targets)
    return Plan([Phase(method, ctx.training.num_steps)])


def _inputs(cfg: RewrittenTransferConfig, model_cfg: ModelConfig, data_cfg: DataConfig) -> dict:
    if cfg.rewritten_data is None and model_cfg.model.split(":")[0] != TOYWORLD:
        raise ValueError(
            f"model {model_cfg.model!r} is not the toy world: pass --rewritten_data "
            "(JSON-lines rewritten twins of the forget documents)"
        )
    return {"documents": {"rewritten_data": cfg.rewritten_data}}


REGISTRATION = Registration(
    name="rewritten_transfer",
    config=RewrittenTransferConfig,
    build=build,
    summary="Rewritten activation transfer: forget activations onto a false rewrite's.",
    defaults=lambda: RewrittenTransferConfig(
        sites=("hook_resid_post", "hook_mlp_out", "unembed"),
        rewritten_ce_coef=2.0,
        retain=RetainSettings(retain_coef=8.0, retain_ramp="constant"),
    ),
    data=lambda: DataConfig(batch_size=32, token_mask="values"),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=2e-3)),
    inputs=_inputs,
)
