"""Saved training states: what `unlearn.training.train` resumes from, and what a resume checks.

A state (`train_state.pt` in the run's output directory) holds the trainable parameters, the
optimizer states, the settings that shaped the run (`train` decides which), the step, the training
time so far and the number of skipped steps. `save_state` writes it atomically; `train` calls it
only when `is_finite(floating_tensors(...))`, so a state on disk is never NaN. `load_state`
restores one only for the same trainable parameters and settings, and raises `RunMismatchError`
naming the settings that differ otherwise: two runs are never mixed.

Usage:
    >>> save_state(out, params, optimizers, settings, Progress(step=50, elapsed_seconds=12.0))
    >>> progress = load_state(out, params, optimizers, settings)   # Progress(step=50, ...)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn.runs import RunMismatchError, setting_differences

STATE_FILE = "train_state.pt"
"""The state's file name in a run's output directory."""


@dataclass
class Progress:
    """Where a run is, as its saved state records it beside the weights."""

    step: int = 0
    """Optimizer steps done."""
    elapsed_seconds: float = 0.0
    """Training time up to that step, summed over every segment of a resumed run."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient norm."""


def floating_tensors(params: list[nn.Parameter], optimizers: list) -> list[torch.Tensor]:
    """The parameters and every floating-point optimizer-state tensor (moments, momentum)."""
    states = [
        value
        for opt in optimizers
        for per_param in opt.state.values()
        for value in per_param.values()
    ]
    return [p.detach() for p in params] + [
        value for value in states if torch.is_tensor(value) and value.is_floating_point()
    ]


def is_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and infinity."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def save_state(
    out_dir: Path,
    params: dict[str, nn.Parameter],
    optimizers: list,
    settings: dict[str, Any],
    progress: Progress,
) -> None:
    """Write the state to `out_dir/train_state.pt` atomically (a kill never leaves half a file).

    Args:
        out_dir: The run's output directory.
        params: The trainable parameters by name.
        optimizers: Their optimizers.
        settings: The settings a resume must match.
        progress: Step, time and skipped steps.
    """
    tmp = out_dir / (STATE_FILE + ".tmp")
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in params.items()},
            "optimizers": [opt.state_dict() for opt in optimizers],
            "settings": settings,
            **asdict(progress),
        },
        tmp,
    )
    tmp.replace(out_dir / STATE_FILE)


def load_state(
    out_dir: Path,
    params: dict[str, nn.Parameter],
    optimizers: list,
    settings: dict[str, Any],
) -> Progress:
    """Load a saved state into `params` and `optimizers`, if it was saved with `settings`.

    Raises:
        RunMismatchError: The state has other trainable parameters or other settings (or none:
            saved by an older version).
        FloatingPointError: The state holds NaN or infinite weights (saved by an older version).
    """
    path = out_dir / STATE_FILE
    state = torch.load(path, weights_only=False)
    if state.get("sharded"):
        raise RunMismatchError(
            f"{path} is the progress of a sharded (--parallel fsdp) run; resume it under torchrun "
            "with the same number of processes' settings, or use a new output directory"
        )
    if set(state["params"]) != set(params):
        raise RunMismatchError(
            f"{path} was saved by a run with other trainable parameters; "
            "use a fresh --out or the same settings"
        )
    stored = state.get("settings", {"saved by": "an older version, without settings"})
    differences = setting_differences(stored, settings)
    if differences:
        raise RunMismatchError(
            f"{path} was saved by a run with other settings ({'; '.join(differences)}); resuming "
            "it would mix two runs: pass the settings it was made with to resume it, or use a new "
            "output directory (or delete the file) to start over"
        )
    if not is_finite(list(state["params"].values())):
        raise FloatingPointError(
            f"{path} holds NaN or infinite weights (saved before states were checked); delete "
            "it to start over"
        )
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    return Progress(
        int(state["step"]),
        float(state.get("elapsed_seconds", 0.0)),
        int(state.get("skipped_steps", 0)),
    )


def saved_train_seconds(out_dir: str | os.PathLike[str]) -> float:
    """The training time recorded in `out_dir`'s saved state (0 if there is none)."""
    path = Path(out_dir) / STATE_FILE
    if not path.exists():
        return 0.0
    return float(torch.load(path, weights_only=False, mmap=True).get("elapsed_seconds", 0.0))
