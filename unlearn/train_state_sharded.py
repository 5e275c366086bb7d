"""The resumable state of a torchrun run: every rank writes its part (a sharded checkpoint).

Under torchrun the weights are DTensors (FSDP2 shards them, or replicates them for DDP) and under
FSDP2 no rank holds the whole model or optimizer state, so the state is a
`torch.distributed.checkpoint` (DCP) directory, `train_state_dcp/`, holding the model's and the
optimizers' sharded state dicts, and rank 0 writes `train_state.pt` with the settings and
progress only (`"sharded": True`, no weights), the file `unlearn.train_state` and the run caches
read. The progress is also written inside the checkpoint (`progress.pt`), and that copy is the
one loaded, so shards and step always belong together. Writes are atomic: the shards go to
`train_state_dcp.tmp/`, which replaces the last checkpoint once every rank has written (the old
one moved aside to `train_state_dcp.old/` first, and read if a kill came in between).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from unlearn.runs import RunMismatchError, setting_differences
from unlearn.train_state import STATE_FILE, Progress

SHARDS_DIR = "train_state_dcp"
"""The sharded checkpoint's directory in a run's output directory."""
PROGRESS_FILE = "progress.pt"
"""Settings and progress inside the checkpoint's directory."""


def save(
    out_dir: Path,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    settings: dict[str, Any],
    progress: Progress,
) -> None:
    """Write every rank's shards of the model and optimizers, then rank 0 the progress file.

    Every rank calls this (collective).
    """
    model_state, optim_state = get_state_dict(model, optimizers)
    staging = out_dir / (SHARDS_DIR + ".tmp")
    if dist.get_rank() == 0 and staging.exists():
        shutil.rmtree(staging)
    dist.barrier()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        record = {"sharded": True, "settings": settings, **asdict(progress)}
        torch.save(record, staging / PROGRESS_FILE)
        final, old = out_dir / SHARDS_DIR, out_dir / (SHARDS_DIR + ".old")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        staging.rename(final)
        if old.exists():
            shutil.rmtree(old)
        tmp = out_dir / (STATE_FILE + ".tmp")
        torch.save(record, tmp)
        tmp.replace(out_dir / STATE_FILE)
    dist.barrier()


def load(
    out_dir: Path,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    settings: dict[str, Any],
) -> Progress:
    """Load the sharded state into `model` and `optimizers` if it was saved with `settings`.

    Every rank calls this (collective).

    Raises:
        RunMismatchError: The state was saved by a run with other settings, or in one process.
        FileNotFoundError: The progress file names a checkpoint that is missing.
    """
    shards = out_dir / SHARDS_DIR
    if not shards.is_dir() and (out_dir / (SHARDS_DIR + ".old")).is_dir():
        shards = out_dir / (SHARDS_DIR + ".old")  # killed while swapping checkpoints
    path = shards / PROGRESS_FILE
    if not (out_dir / STATE_FILE).exists() or not torch.load(
        out_dir / STATE_FILE, weights_only=False
    ).get("sharded"):
        raise RunMismatchError(
            f"{out_dir / STATE_FILE} was saved by a run that was not sharded; resume it with the "
            "settings it was made with, or use a new output directory"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"{out_dir / STATE_FILE} names a sharded checkpoint; {path} is missing"
        )
    state = torch.load(path, weights_only=False)
    differences = setting_differences(state["settings"], settings)
    if differences:
        raise RunMismatchError(
            f"{path} was saved by a run with other settings ({'; '.join(differences)}); pass the "
            "settings it was made with to resume it, or use a new output directory"
        )
    model_state, optim_state = get_state_dict(model, optimizers)
    # Parameters that never had a gradient (e.g. past a trace's early stop) had no optimizer
    # state when it was saved; `get_state_dict` gives every parameter a zero state, which is what
    # the optimizer would start them from, so only the saved ones are read.
    saved = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    optim_state["state"] = {
        name: values
        for name, values in optim_state["state"].items()
        if all(f"optim.state.{name}.{key}" in saved for key in values)
    }
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=shards)
    set_state_dict(
        model,
        optimizers,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=StateDictOptions(strict=False),  # those parameters keep their zero state
    )
    return Progress(
        int(state["step"]),
        float(state.get("elapsed_seconds", 0.0)),
        int(state.get("skipped_steps", 0)),
    )
