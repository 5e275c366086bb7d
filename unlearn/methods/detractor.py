"""Detractor learning: unlearning with MAGIC's per-token attribution scores as loss weights.

ALGORITHMS.md section 3.7: the reference's attribution-weighted unlearning
(`unlearn/magic/attribution_unlearn.py`) and its "MAGIC detractor learning", listed there as under
development. Every token i of the forget and retain rows has a score s_i = dE/dw_i, the
metagradient of the forget **dev** loss E (the dev items' answer NLL) with respect to the token's
loss weight in a short SGD run on those rows (`unlearn.selection.magic`): s_i > 0 when training
on the token raises E (a "detractor" of the forget domain), s_i < 0 when it lowers E.

- `train_on="weighted"` (the reference's): every token trains with the weight
  w_i = s_i / mean_j |s_j| (the mean over the tokens with a nonzero score: the reference's log
  normalized by the mean absolute value) in the weighted NLL Σ w_i ℓ_i / n
  (`unlearn.selection.magic.weighted_nll_loss`), so descent on the detractors and ascent (w < 0)
  on the tokens whose training helps the forget domain. Terms "forget" (forget rows, within the
  run's `--token_mask`) and "attributed_retain" (retain rows).
- `train_on="detractors"`: only the retain tokens with s_i > 0, w_i = s_i / mean_{s_j > 0} s_j:
  descent on the retain text whose training pushes E up, no ascent anywhere. Term "detractors".
- `train_on="mask"`: the same two terms with the attribution replaced by a token mask: weight
  −1 (ascent) on every forget token the run's `--token_mask` selects and +1 (descent) on every
  retain token (mean |w| = 1 as above). With `--token_mask values` (the toy world's ground-truth
  value tokens) it is the comparison the attribution has to beat; no scores are computed.

Both add the usual retain term (`retain.py`). The scores come from `scores_path` (a file that
`unlearn.selection.magic_scores.save_token_scores` wrote for exactly these rows) or are computed
in `build` from the run's forget and retain documents against the forget dev items, and cached
(`unlearn.selection.magic_scores.cached_token_scores`; on the default toy world one epoch of the
6,000 retain documents, about 10 minutes on 2 CPU cores the first time).

Defaults chosen on the dev split (`benchmarks/results/tune_dev_detractor.md`, `python -m
benchmarks.tune_dev --methods detractor --grid train_on=weighted retain_coef=3,10 --lrs 1e-3
2e-3`): attribution-weighted, lr 1e-3, retain coefficient 10, the one setting of the sweeps with
dev forget <= 35% and retain >= 90% of the unfiltered model's (dev forget 32.0%, retain 91.9%).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from interventions import Read
from unlearn.config import DataConfig, ModelConfig, OptimSettings, TrainingConfig
from unlearn.data import Batch, tokenize_documents
from unlearn.methods.base import FORGET, RETAIN, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings
from unlearn.selection.magic import MagicSettings, weighted_nll_loss
from unlearn.selection.magic_scores import (
    FORGET_DEV,
    TokenScores,
    cached_token_scores,
    load_token_scores,
)
from unlearn.toyworld.world import DEV


@dataclass
class DetractorConfig:
    """Detractor-learning settings."""

    train_on: Literal["weighted", "detractors", "mask"] = "weighted"
    """"weighted": every forget and retain token, weighted by its normalized score (ascent where
    training helps the forget domain); "detractors": only the retain tokens whose training raises
    the forget dev loss (descent); "mask": weight −1 on the forget tokens of --token_mask and +1
    on retain tokens, no attribution (with --token_mask values: the ground-truth comparison)."""
    scores_path: str | None = None
    """A score file (or its folder) for exactly this run's rows; None computes (and caches) the
    scores with the `magic` settings."""
    magic: MagicSettings = field(default_factory=MagicSettings)
    """The attributed run that makes the scores (ignored with `scores_path`)."""
    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Weight and schedule of the attribution-weighted terms."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(retain_coef=10.0, retain_ramp="constant")
    )
    """The usual retain term (KL to the original by default, weighted 10: chosen on dev)."""


def token_weights(scores: Sequence[Tensor], positive_only: bool = False) -> list[Tensor]:
    """Scores → loss weights: s / mean |s| over the nonzero scores (only s > 0 kept if asked).

    Raises:
        ValueError: No nonzero (positive) score: nothing would train.
    """
    flat = torch.cat(list(scores)).double()
    if positive_only:
        flat = flat.clamp(min=0)
    scale = flat[flat != 0].abs().mean() if bool((flat != 0).any()) else None
    if scale is None:
        kind = "positive" if positive_only else "nonzero"
        raise ValueError(
            f"no token has a {kind} attribution score: nothing to train on (was the attributed "
            "run too short to reach these rows? raise --magic_steps)"
        )
    kept = [s.double().clamp(min=0) if positive_only else s.double() for s in scores]
    return [(s / scale).float() for s in kept]


class RowWeights:
    """Per-token weights of a set of rows, looked up by a batch's document indices."""

    def __init__(self, rows: Sequence[Tensor]) -> None:
        """Pad the rows' weights into one [row, pos] table."""
        width = max(len(row) for row in rows)
        self.table = torch.zeros(len(rows), width)
        for i, row in enumerate(rows):
            self.table[i, : len(row)] = row

    def __call__(self, batch: Batch) -> Float[Tensor, "batch pos"]:
        """The weights of a batch's tokens (0 at padding).

        Raises:
            ValueError: A batch without document indices.
        """
        if batch.rows is None:
            raise ValueError("detractor learning needs batches with document indices (Batch.rows)")
        if self.table.device != batch.input_ids.device:
            self.table = self.table.to(batch.input_ids.device)
        return self.table[batch.rows.to(self.table.device), : batch.input_ids.shape[1]]


def _weighted_term(
    name: str,
    logits: str,
    side: str,
    weights: RowWeights | ConstantWeights,
    cfg: DetractorConfig,
) -> Term:
    """The attribution-weighted NLL of one side's rows, weighted by the forget settings."""

    def loss(acts: Mapping[str, Tensor], forget: Batch, retain: Batch) -> Tensor:
        batch = forget if side == FORGET else retain
        return weighted_nll_loss(acts[logits], batch.input_ids, weights(batch), batch.token_mask)

    return cfg.forget.term(loss, name)


class ConstantWeights:
    """The same weight for every token of a batch (the `mask` variant's)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, batch: Batch) -> Float[Tensor, "batch pos"]:
        """The weight at every position of the batch."""
        return torch.full(batch.input_ids.shape, self.weight, device=batch.input_ids.device)


class DetractorLearning:
    """Nodes and terms of detractor learning, with the rows' scores."""

    def __init__(self, cfg: DetractorConfig, scores: TokenScores | None) -> None:
        """Turn the forget dev scores into weights and declare the weighted terms.

        Raises:
            ValueError: No score to train on, or no scores for a variant that reads them.
        """
        retain = cfg.retain.component()
        retain_logits = Read("retain_logits", "unembed", model=TRAINABLE, batch=RETAIN)
        if cfg.train_on != "mask" and scores is None:
            raise ValueError(f"--train_on {cfg.train_on} needs attribution scores")
        if cfg.train_on in ("weighted", "mask"):
            if scores is None:
                forget_weights: RowWeights | ConstantWeights = ConstantWeights(-1.0)
                retain_weights: RowWeights | ConstantWeights = ConstantWeights(1.0)
            else:
                forget_scores = scores.rows(FORGET_DEV, "forget")
                weights = token_weights([*forget_scores, *scores.rows(FORGET_DEV, "retain")])
                forget_weights = RowWeights(weights[: len(forget_scores)])
                retain_weights = RowWeights(weights[len(forget_scores) :])
            forget_logits = Read("forget_logits", "unembed", model=TRAINABLE, batch=FORGET)
            terms = (
                _weighted_term("forget", "forget_logits", FORGET, forget_weights, cfg),
                _weighted_term("attributed_retain", "retain_logits", RETAIN, retain_weights, cfg),
            )
            nodes: tuple[Node, ...] = (forget_logits, retain_logits)
        else:
            retain_scores = scores.rows(FORGET_DEV, "retain")
            retain_weights = RowWeights(token_weights(retain_scores, positive_only=True))
            terms = (_weighted_term("detractors", "retain_logits", RETAIN, retain_weights, cfg),)
            nodes = (retain_logits,)
        # Equal nodes are shared: a retain term that reads the retain logits too reads them once.
        self.nodes: tuple[Node, ...] = (*nodes, *(n for n in retain.nodes if n not in nodes))
        self.terms: tuple[Term, ...] = (*terms, *retain.terms)


def _scores(cfg: DetractorConfig, ctx: Context) -> tuple[TokenScores, dict[str, object]]:
    """The scores of the run's rows (from `scores_path`, the cache, or computed) and a record."""
    if cfg.scores_path is not None:
        return load_token_scores(cfg.scores_path), {"scores_path": cfg.scores_path}
    dev_items = [item for splits in ctx.items.values() for item in splits.get(DEV, [])]
    if not dev_items:
        raise ValueError(
            "detractor learning attributes against the forget dev items, and this run has none: "
            "pass --eval_items with a forget_dev split, or --scores_path"
        )
    scores, cached = cached_token_scores(
        ctx.model,
        ctx.tokenizer,
        ctx.forget_docs,
        ctx.retain_docs,
        dev_items,
        [],
        ctx.data.max_len,
        cfg.magic,
    )
    return scores, {"scores_key": scores.meta["key"], "scores_cached": cached}


def build(cfg: DetractorConfig, ctx: Context) -> Plan:
    """Get the scores of the run's rows, check they fit, and one phase of weighted training."""
    if cfg.train_on == "mask":
        return Plan([Phase(DetractorLearning(cfg, None), ctx.training.num_steps)], {})
    scores, info = _scores(cfg, ctx)
    scores.check(
        tokenize_documents(ctx.tokenizer, ctx.forget_docs, ctx.data.max_len),
        tokenize_documents(ctx.tokenizer, ctx.retain_docs, ctx.data.max_len),
        cfg.scores_path or "the MAGIC cache",
    )
    retain_scores = torch.cat(scores.rows(FORGET_DEV, "retain"))
    info["detractor_share"] = float((retain_scores > 0).double().mean())
    return Plan([Phase(DetractorLearning(cfg, scores), ctx.training.num_steps)], info)


def _inputs(cfg: DetractorConfig, model_cfg: ModelConfig, data_cfg: DataConfig) -> dict:
    if cfg.train_on == "detractors" and data_cfg.token_mask != "all":
        raise ValueError(
            f"--train_on detractors trains on retain tokens only, so --token_mask "
            f"{data_cfg.token_mask} (which selects forget tokens) would do nothing; leave it at "
            "all, or use --train_on weighted"
        )
    if cfg.train_on == "mask" and cfg.scores_path is not None:
        raise ValueError(
            "--train_on mask weighs tokens by --token_mask, not by attribution scores: drop "
            "--scores_path, or use --train_on weighted"
        )
    return {"paths": {"scores_path": cfg.scores_path}}


REGISTRATION = Registration(
    name="detractor",
    config=DetractorConfig,
    build=build,
    summary="Detractor learning: MAGIC attribution scores as per-token loss weights.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=1e-3)),
    inputs=_inputs,
)
