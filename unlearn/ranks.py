"""Which `torchrun` process this is, and the file rules every process follows under torchrun.

Under `torchrun` every process runs the whole recipe: each loads the model and data, trains its
share of every batch (`unlearn.training`) and evaluates. Files are written by rank 0 alone
(`is_main_process`); what the others then read (a claimed run folder, a keyed cache, a lens or a
token mask computed once) is prepared by rank 0 first (`rank_zero_first`). In one process both
are no-ops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def distributed_context() -> tuple[int, int]:
    """(rank, world size), initializing the process group under torchrun if needed."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes files: rank 0 under torchrun, or the only process."""
    return distributed_context()[0] == 0


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (which find what it wrote).

    Rank 0 reaches the barrier also when its block raises, so the others do not hang; they then
    run the block themselves and meet the same error.
    """
    rank, world_size = distributed_context()
    if world_size > 1 and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if world_size > 1 and rank == 0:
            dist.barrier()
