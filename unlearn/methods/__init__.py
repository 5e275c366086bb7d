"""Unlearning methods: each registered once, as its settings plus a `build` that returns its plan.

`REGISTRY` (name -> `Registration`, `unlearn.methods.plan`) holds every method; the generic recipe
(`python -m recipes.unlearn --method <name>`), the retain ablation, the leaderboard and the methods
benchmark iterate over it. A method's phases declare step-graph nodes and weighted loss terms
(`unlearn.methods.base`); the training core (`unlearn.training`) runs them, alone or stacked with
`stack`. Adding a method: one module with its config, its nodes and terms, `build` and
`REGISTRATION`, plus one line in `_MODULES` below (docs/ARCHITECTURE.md).
"""

from unlearn.methods import (
    checkpoint_transfer,
    circuit_breakers,
    lens_unlearn,
    probe_unlearn,
    rewritten_transfer,
    sequential,
)
from unlearn.methods.base import (
    BASE,
    FORGET,
    RAMPS,
    RETAIN,
    TRAINABLE,
    Method,
    Ramp,
    Stacked,
    Term,
    stack,
)
from unlearn.methods.checkpoint_transfer import CheckpointTransfer, CheckpointTransferConfig
from unlearn.methods.circuit_breakers import CircuitBreakers, CircuitBreakersConfig
from unlearn.methods.lens_unlearn import LensUnlearn, LensUnlearnConfig
from unlearn.methods.plan import (
    REGISTRY,
    Context,
    Phase,
    Plan,
    Registration,
    register,
    registration,
)
from unlearn.methods.probe_unlearn import ProbeUnlearn, ProbeUnlearnConfig

_MODULES = (
    lens_unlearn,
    circuit_breakers,
    checkpoint_transfer,
    sequential,
    rewritten_transfer,
    probe_unlearn,
)
"""The registered methods' modules, in leaderboard order."""

for _module in _MODULES:
    register(_module.REGISTRATION)

__all__ = [
    "BASE",
    "FORGET",
    "RAMPS",
    "REGISTRY",
    "RETAIN",
    "TRAINABLE",
    "CheckpointTransfer",
    "CheckpointTransferConfig",
    "CircuitBreakers",
    "CircuitBreakersConfig",
    "Context",
    "LensUnlearn",
    "LensUnlearnConfig",
    "Method",
    "Phase",
    "Plan",
    "ProbeUnlearn",
    "ProbeUnlearnConfig",
    "Ramp",
    "Registration",
    "Stacked",
    "Term",
    "register",
    "registration",
    "stack",
]
