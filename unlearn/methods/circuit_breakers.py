"""Orthogonal circuit breakers: reroute forget activations and make them mutually orthogonal.

ALGORITHMS.md section 3.1 (Zou et al. 2024, "Improving Alignment and Robustness with Circuit
Breakers", plus the reference's within-batch orthogonality term):
- forget: mean over target layers and forget tokens of ReLU(cos(h_l^θ, h_l^0)), the frozen model's
  activation as h^0, coefficient `forget_coef` · (1 − 0.25c);
- orthogonality: masked mean-pool each forget sequence's h_l^θ, normalize, ReLU of the off-diagonal
  cosines, / (B(B−1)|L|) × mean sequence length, coefficient `orth_coef` · c (0 disables it:
  plain circuit breakers);
- retain: L2 distance of block outputs from the frozen model's on retain tokens (or KL / NLL),
  coefficient `retain_coef` · (0.1 + 0.9c).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interventions import Read
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.kernels import orthogonality_loss_fused
from unlearn.losses import circuit_breaker_loss
from unlearn.methods.base import (
    BASE,
    FORGET,
    RAMPS,
    TRAINABLE,
    ForgetSettings,
    Node,
    RampName,
    Term,
)
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings


@dataclass
class CircuitBreakersConfig:
    """Orthogonal circuit-breaker settings."""

    layers: list[int] | None = None
    """Target layers of the forget and orthogonality terms; None means every layer but block 0."""
    orth_coef: float = 1.0
    """Peak orthogonality coefficient (0: plain circuit breakers)."""
    ref_jitter: float = 0.01
    """Relative scale of the seeded random perturbation of the frozen forget activations in the
    cosine term (`unlearn.losses.circuit_breaker_loss`): at the original weights the cosine has
    zero gradient, and without it the first steps follow floating-point noise. 0: the reference."""
    orth_ramp: RampName = "ramp_up"
    """Orthogonality coefficient schedule."""
    forget: ForgetSettings = field(default_factory=ForgetSettings)
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(default_factory=lambda: RetainSettings(retain_loss="l2"))
    """Retain term."""


class CircuitBreakers:
    """Nodes and terms of (orthogonal) circuit breakers for a model with `n_layers` blocks.

    A term whose coefficient is 0 is left out with the reads only it needs, so `forget_coef=0,
    retain_coef=0` is the orthogonality term alone, ready to stack with another method.
    """

    def __init__(self, cfg: CircuitBreakersConfig, n_layers: int) -> None:
        """Declare forget-activation reads on both models and the three terms."""
        layers = list(range(1, n_layers)) if cfg.layers is None else list(cfg.layers)
        site = "blocks.{l}.hook_resid_post"
        nodes: list[Node] = [
            Read("forget_acts", site, layers=layers, model=TRAINABLE, batch=FORGET)
        ]
        terms = []
        if cfg.forget.forget_coef:
            nodes.append(
                Read("forget_ref_acts", site, layers=layers, model=BASE, batch=FORGET, grad=False)
            )
            terms.append(
                Term(
                    "forget",
                    lambda acts, forget, retain: circuit_breaker_loss(
                        acts["forget_acts"],
                        acts["forget_ref_acts"],
                        forget.token_mask,
                        ref_jitter=cfg.ref_jitter,
                    ),
                    cfg.forget.forget_coef,
                    RAMPS[cfg.forget.forget_ramp],
                )
            )
        if cfg.orth_coef:
            terms.append(
                Term(
                    "orth",
                    lambda acts, forget, retain: orthogonality_loss_fused(
                        acts["forget_acts"], forget.token_mask
                    ),
                    cfg.orth_coef,
                    RAMPS[cfg.orth_ramp],
                )
            )
        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (*nodes, *retain.nodes)
        self.terms: tuple[Term, ...] = (*terms, *retain.terms)


def build(cfg: CircuitBreakersConfig, ctx: Context) -> Plan:
    """One phase of circuit breakers over the run's steps."""
    return Plan([Phase(CircuitBreakers(cfg, ctx.n_layers), ctx.training.num_steps)])


REGISTRATION = Registration(
    name="circuit_breakers",
    config=CircuitBreakersConfig,
    build=build,
    summary="Orthogonal circuit breakers: reroute forget activations, pooled ones orthogonal.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=9e-3)),
)
