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
    detractor,
    grad_diff,
    lens_unlearn,
    npo,
    probe_unlearn,
    rewind_distill,
    rewritten_transfer,
    rmu,
    sequential,
    simnpo,
    tar,
    undo,
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
from unlearn.methods.detractor import DetractorConfig, DetractorLearning
from unlearn.methods.grad_diff import GradDiff, GradDiffConfig
from unlearn.methods.lens_unlearn import LensUnlearn, LensUnlearnConfig
from unlearn.methods.npo import NPO, NPOConfig
from unlearn.methods.plan import (
    REGISTRY,
    Context,
    Phase,
    Plan,
    Registration,
    benchmark_methods,
    register,
    registration,
    tuned_methods,
)
from unlearn.methods.probe_unlearn import ProbeUnlearn, ProbeUnlearnConfig
from unlearn.methods.rewind_distill import RewindDistillConfig
from unlearn.methods.rmu import RMU, RMUConfig
from unlearn.methods.simnpo import SimNPO, SimNPOConfig
from unlearn.methods.tar import TamperResistant, TarConfig
from unlearn.methods.undo import UndoConfig

_MODULES = (
    lens_unlearn,
    circuit_breakers,
    checkpoint_transfer,
    sequential,
    rewritten_transfer,
    probe_unlearn,
    detractor,
    rmu,
    npo,
    simnpo,
    grad_diff,
    undo,
    rewind_distill,
    tar,
)
"""The registered methods' modules, in leaderboard order (the standard baselines, then the
defences that aim to survive a fine-tuning attack)."""

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
    "DetractorConfig",
    "DetractorLearning",
    "GradDiff",
    "GradDiffConfig",
    "LensUnlearn",
    "LensUnlearnConfig",
    "Method",
    "NPO",
    "NPOConfig",
    "Phase",
    "Plan",
    "ProbeUnlearn",
    "ProbeUnlearnConfig",
    "RMU",
    "RMUConfig",
    "Ramp",
    "Registration",
    "benchmark_methods",
    "RewindDistillConfig",
    "SimNPO",
    "SimNPOConfig",
    "Stacked",
    "TamperResistant",
    "TarConfig",
    "Term",
    "UndoConfig",
    "register",
    "registration",
    "tuned_methods",
    "stack",
]
