"""Negative Preference Optimization (NPO): bounded gradient ascent, anchored to the frozen model.

Zhang, Lin, Bai and Mei 2024, "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning" (`ALGORITHMS.md` section 10). Forget term, over forget sequences y with
selected tokens T (`unlearn.losses.npo_loss`):

    L_NPO = −(2/β) E_y[log σ(−β log(π_θ(y) / π_ref(y)))] = (2/β) E_y[log(1 + (π_θ(y)/π_ref(y))^β)],

where log π(y) = Σ_{t∈T} log π(x_t | x_<t) and π_ref is the frozen original ("base", read without
gradient). `reduction` can instead average the log-ratio over tokens ("sequence_mean") or treat
every token as its own sequence ("token"). The retain term is next-token NLL by default (the
paper's NPO+RT), or KL, L2 or MSE (`retain.py`); both coefficients constant by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from interventions import Read
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.losses import next_token_logprobs, next_token_mask, npo_loss
from unlearn.methods.base import BASE, FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings


@dataclass
class NPOConfig:
    """NPO settings."""

    beta: float = 0.03
    """Inverse temperature β (the paper's is 0.1; 0.03 and the learning rate were chosen on the
    dev split, benchmarks/results/tune_dev_npo.md); β → 0 is gradient ascent."""
    reduction: Literal["sequence_sum", "sequence_mean", "token"] = "sequence_sum"
    """Where the per-token log-ratios are summed before the sigmoid: over each sequence (the
    paper), averaged over each sequence, or not at all (every token its own sequence)."""
    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(retain_loss="nll", retain_ramp="constant")
    )
    """Retain term (next-token NLL by default: NPO+RT)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0 (it divides the loss), got {self.beta}")


class NPO:
    """Nodes and terms of NPO: forget logits of the trainable and the frozen model, and retain."""

    def __init__(self, cfg: NPOConfig) -> None:
        """Declare both models' forget logits, the NPO term and the retain term."""

        def forget_term(acts, forget, retain):
            tokens, mask = forget.input_ids, forget.token_mask
            return npo_loss(
                next_token_logprobs(acts["forget_logits"], tokens, mask),
                next_token_logprobs(acts["forget_ref_logits"], tokens, mask),
                next_token_mask(mask),
                beta=cfg.beta,
                reduction=cfg.reduction,
            )

        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (
            Read("forget_logits", "unembed", model=TRAINABLE, batch=FORGET),
            Read("forget_ref_logits", "unembed", model=BASE, batch=FORGET, grad=False),
            *retain.nodes,
        )
        self.terms: tuple[Term, ...] = (cfg.forget.term(forget_term), *retain.terms)


def build(cfg: NPOConfig, ctx: Context) -> Plan:
    """One phase of NPO over the run's steps."""
    return Plan([Phase(NPO(cfg), ctx.training.num_steps)])


REGISTRATION = Registration(
    name="npo",
    config=NPOConfig,
    build=build,
    summary="Negative preference optimization: bounded ascent on forget text vs the frozen model.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=9e-4)),
)
