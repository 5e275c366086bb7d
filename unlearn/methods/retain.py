"""Retain terms shared by methods: keep the model's behaviour on retain text (KL, NLL, L2 or MSE).

`retain_component(kind, layers, coef, ramp, reference)` returns the nodes and the term for one
retain loss, so every method offers the same four choices with the same, padding-free math
(`unlearn.losses`), against the step graph's frozen "base" or another frozen model (a distillation
teacher). `RetainSettings` is the config group every method nests as `retain` (flags
`--retain_loss`, `--retain_coef`, `--retain_ramp`, `--retain_layers`); its `component()` builds
the term, named "retain" (`RETAIN_TERM`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from interventions import Read
from unlearn.losses import (
    activation_mse_loss,
    logit_kl_loss,
    next_token_nll_loss,
    representation_l2_loss,
)
from unlearn.methods.base import (
    BASE,
    CONSTANT,
    RAMPS,
    RETAIN,
    RETAIN_TERM,
    TRAINABLE,
    Node,
    Ramp,
    RampName,
    Term,
)

RetainLoss = Literal["kl", "nll", "l2", "mse"]
"""KL to the frozen model's logits, next-token NLL, or the L2 distance or mean squared error of
residual activations."""


@dataclass(frozen=True)
class RetainComponent:
    """The nodes and the term of one retain loss."""

    nodes: tuple[Node, ...]
    terms: tuple[Term, ...]


def retain_component(
    kind: RetainLoss,
    layers: Sequence[int] | str = "all",
    coef: float = 1.0,
    ramp: Ramp = CONSTANT,
    reference: str = BASE,
) -> RetainComponent:
    """Nodes and term for a retain loss of the given kind.

    Args:
        kind: "kl" (per-token KL(p_base ‖ p_θ) on retain tokens), "nll" (next-token loss), "l2"
            (mean L2 distance of block outputs at `layers` from the frozen model's) or "mse"
            (their mean squared error per dimension, `activation_mse_loss`: RMU's retain loss).
        layers: Layers of the L2 and MSE losses (ignored otherwise).
        coef: Peak coefficient.
        ramp: Coefficient multiplier over training.
        reference: The frozen model the KL, L2 and MSE losses compare with: the step graph's
            "base" (the model as training started), or an extra model such as a distillation
            teacher.

    Returns:
        The nodes and term; none at all when `coef` is 0 (the retain ablation).

    Raises:
        ValueError: Unknown kind.
    """
    if coef == 0:
        return RetainComponent((), ())
    if kind == "kl":
        nodes = (
            Read("retain_logits", "unembed", model=TRAINABLE, batch=RETAIN),
            Read("retain_ref_logits", "unembed", model=reference, batch=RETAIN, grad=False),
        )
        term = Term(
            RETAIN_TERM,
            lambda acts, forget, retain: logit_kl_loss(
                acts["retain_logits"], acts["retain_ref_logits"], retain.attention_mask
            ),
            coef,
            ramp,
        )
    elif kind == "nll":
        nodes = (Read("retain_logits", "unembed", model=TRAINABLE, batch=RETAIN),)
        term = Term(
            RETAIN_TERM,
            lambda acts, forget, retain: next_token_nll_loss(
                acts["retain_logits"], retain.input_ids, retain.attention_mask
            ),
            coef,
            ramp,
        )
    elif kind in ("l2", "mse"):
        site = "blocks.{l}.hook_resid_post"
        nodes = (
            Read("retain_acts", site, layers=layers, model=TRAINABLE, batch=RETAIN),
            Read("retain_ref_acts", site, layers=layers, model=reference, batch=RETAIN, grad=False),
        )
        distance = representation_l2_loss if kind == "l2" else activation_mse_loss
        term = Term(
            RETAIN_TERM,
            lambda acts, forget, retain: distance(
                acts["retain_acts"], acts["retain_ref_acts"], retain.attention_mask
            ),
            coef,
            ramp,
        )
    else:
        raise ValueError(f"unknown retain loss {kind!r}; choose kl, nll, l2 or mse")
    return RetainComponent(nodes, (term,))


@dataclass
class RetainSettings:
    """The retain term of a method (nested as `retain` in every method's config)."""

    retain_loss: RetainLoss = "kl"
    """Retain objective: KL to the frozen model's logits, next-token NLL, or the L2 distance or
    mean squared error of activations."""
    retain_coef: float = 1.0
    """Peak retain coefficient (0 drops the term: the retain ablation)."""
    retain_ramp: RampName = "retain_warmup"
    """Retain coefficient schedule (a key of `unlearn.methods.base.RAMPS`)."""
    retain_layers: list[int] | None = None
    """Layers of the L2 and MSE retain losses; None means every layer (RMU: its layer)."""

    def component(self, reference: str = BASE) -> RetainComponent:
        """The nodes and term these settings declare, against `reference` (`retain_component`)."""
        return retain_component(
            self.retain_loss,
            self.retain_layers or "all",
            self.retain_coef,
            RAMPS[self.retain_ramp],
            reference,
        )
