"""SimNPO: NPO without a reference model, on the length-normalized forget likelihood.

Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning" (`ALGORITHMS.md` sections 3.8 and 10). Forget term, over forget sequences y with
selected tokens T (`unlearn.losses.simnpo_loss`):

    L_SimNPO = −(2/β) E_y[log σ(−(β/|T|) log π_θ(y) − γ)] = −(2/β) E_y[log σ(β·NLL(y) − γ)],

with log π_θ(y) = Σ_{t∈T} log π_θ(x_t | x_<t) and NLL(y) its negative mean over T: NPO's reward
log π_θ − log π_ref replaced by the reference-free, length-normalized log-likelihood less a margin
γ. Minimizing it raises the forget NLL, with a weight 2σ(γ − β·NLL) that fades as the text becomes
unlikely. The retain term is next-token NLL by default (the reference's γ·CE_retain), or KL, L2 or
MSE (`retain.py`); both coefficients constant by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interventions import Read
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.losses import next_token_logprobs, next_token_mask, simnpo_loss
from unlearn.methods.base import FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings


@dataclass
class SimNPOConfig:
    """SimNPO settings."""

    beta: float = 0.1
    """Inverse temperature β (the reference's default); β → 0 with γ = 0 is gradient ascent on
    each sequence's mean NLL."""
    gamma: float = 0.0
    """Reward margin γ (the paper's; the reference has none): the forget gradient's weight
    2σ(γ − β·NLL) is 1 where β·NLL = γ and fades above."""
    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(retain_loss="nll", retain_ramp="constant")
    )
    """Retain term (next-token NLL by default, as in the reference)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0 (it divides the loss), got {self.beta}")


class SimNPO:
    """Nodes and terms of SimNPO: the trainable model's forget logits, and retain."""

    def __init__(self, cfg: SimNPOConfig) -> None:
        """Declare the forget logits, the SimNPO term and the retain term."""

        def forget_term(acts, forget, retain):
            tokens, mask = forget.input_ids, forget.token_mask
            return simnpo_loss(
                next_token_logprobs(acts["forget_logits"], tokens, mask),
                next_token_mask(mask),
                beta=cfg.beta,
                gamma=cfg.gamma,
            )

        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (
            Read("forget_logits", "unembed", model=TRAINABLE, batch=FORGET),
            *retain.nodes,
        )
        self.terms: tuple[Term, ...] = (cfg.forget.term(forget_term), *retain.terms)


def build(cfg: SimNPOConfig, ctx: Context) -> Plan:
    """One phase of SimNPO over the run's steps."""
    return Plan([Phase(SimNPO(cfg), ctx.training.num_steps)])


REGISTRATION = Registration(
    name="simnpo",
    config=SimNPOConfig,
    build=build,
    summary="SimNPO: reference-free NPO on each forget sequence's mean log-likelihood.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=1e-3)),
)
