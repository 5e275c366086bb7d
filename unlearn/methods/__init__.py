"""Unlearning methods as declarations: step-graph nodes plus weighted loss terms.

`METHODS` is the one registry: name -> (config dataclass, method class). A method class is built as
`Method(config, n_layers)` and exposes `nodes` and `terms` (see `unlearn.methods.base`); the
training core (`unlearn.training.train`) runs any of them, alone or stacked with `stack`.
"""

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
from unlearn.methods.probe_unlearn import ProbeUnlearn, ProbeUnlearnConfig

METHODS: dict[str, tuple[type, type]] = {
    "lens_unlearn": (LensUnlearnConfig, LensUnlearn),
    "circuit_breakers": (CircuitBreakersConfig, CircuitBreakers),
    "checkpoint_transfer": (CheckpointTransferConfig, CheckpointTransfer),
    "probe_unlearn": (ProbeUnlearnConfig, ProbeUnlearn),
}
"""Every registered method: name -> (config class, method class)."""

__all__ = [
    "BASE",
    "FORGET",
    "METHODS",
    "RAMPS",
    "RETAIN",
    "TRAINABLE",
    "CheckpointTransfer",
    "CheckpointTransferConfig",
    "CircuitBreakers",
    "CircuitBreakersConfig",
    "LensUnlearn",
    "LensUnlearnConfig",
    "Method",
    "ProbeUnlearn",
    "ProbeUnlearnConfig",
    "Ramp",
    "Stacked",
    "Term",
    "stack",
]
