"""Gradient difference: gradient ascent on forget text, gradient descent on retain text.

Forget term (Jang et al. 2023's gradient ascent, as the forget half of gradient difference, Liu et
al. 2022, "Continual Learning and Private Unlearning"; `ALGORITHMS.md` sections 3.8 and 10): the
negative next-token NLL of the selected forget tokens, (1/|T|) Σ_{t∈T} log p_θ(x_t | x_<t)
(`unlearn.losses.ce_maximization_loss`), minimized, so the forget text's likelihood falls without
bound. Retain term: next-token NLL on retain text by default (the descent half), or KL, L2 or MSE
(`retain.py`). Both coefficients constant by default: L = forget_coef · (−NLL_forget) +
retain_coef · NLL_retain.

The reference's `grad_diff.py` trained on the WMDP and MMLU evaluation questions (`ALGORITHMS.md`
section 9); here, as for every method, the training core feeds only the forget documents of the
run's `Context` (the toy world's attack split) and its retain documents, never evaluation items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interventions import Read
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.losses import ce_maximization_loss
from unlearn.methods.base import FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings


@dataclass
class GradDiffConfig:
    """Gradient-difference settings."""

    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Forget-term (negative forget NLL) weight and schedule."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(retain_loss="nll", retain_ramp="constant")
    )
    """Retain term (the descent half: next-token NLL on retain text by default)."""


class GradDiff:
    """Nodes and terms of gradient difference: forget logits, minus their NLL, plus retain."""

    def __init__(self, cfg: GradDiffConfig) -> None:
        """Declare the trainable model's forget logits and the two terms."""
        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (
            Read("forget_logits", "unembed", model=TRAINABLE, batch=FORGET),
            *retain.nodes,
        )
        forget_term = cfg.forget.term(
            lambda acts, forget, retain: ce_maximization_loss(
                acts["forget_logits"], forget.input_ids, forget.token_mask
            )
        )
        self.terms: tuple[Term, ...] = (forget_term, *retain.terms)


def build(cfg: GradDiffConfig, ctx: Context) -> Plan:
    """One phase of gradient difference over the run's steps."""
    return Plan([Phase(GradDiff(cfg), ctx.training.num_steps)])


REGISTRATION = Registration(
    name="grad_diff",
    config=GradDiffConfig,
    build=build,
    summary="Gradient difference: ascent on the forget text's NLL, descent on the retain text's.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=9e-4)),
)
