"""Compute accounting: the floating-point operations a run spends, and a pretraining run's.

A defence is worth having only if it costs less than the alternative it imitates: pretraining a
model without the forget domain. `FlopCount` counts the matrix-multiply and attention FLOPs of a
block of code (`torch.utils.flop_counter.FlopCounterMode`: forward and backward operations, the
frozen models' forwards included; elementwise operations are not counted, as is usual), and
`pretraining_flops` measures one pretraining step of a toy world's model the same way and
multiplies it by the schedule's steps. The training core counts a run's preparation and training
separately when asked (`TrainingConfig.count_flops`: results.json gets `flops_prepare` and
`flops_train`); evaluations are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from unlearn.toyworld.config import ToyWorldConfig

T = TypeVar("T")


def _cpu_attention(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}
"""The CPU attention kernel's formulas, which torch's FLOP counter lacks (it has the CUDA
kernels'): the same counts as its `sdpa_flop`, full square (the causal mask is not discounted)."""


class FlopCount:
    """FLOPs of named scopes of code (nothing is counted when disabled)."""

    def __init__(self, enabled: bool = True) -> None:
        """An empty count; `enabled=False` makes `scope` a no-op."""
        self.enabled = enabled
        self.flops: dict[str, int] = {}

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Count the code in the `with` block under `flops_<name>` (added to an earlier count)."""
        if not self.enabled:
            yield
            return
        mode = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
        with mode:
            yield
        key = f"flops_{name}"
        self.flops[key] = self.flops.get(key, 0) + int(mode.get_total_flops())

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, counted under `name`."""
        with self.scope(name):
            return fn(*args, **kwargs)

    def exclude(self, name: str, inner: str) -> None:
        """Take scope `inner`'s count (run inside scope `name`) out of `name`'s and drop it."""
        if f"flops_{inner}" in self.flops:
            self.flops[f"flops_{name}"] -= self.flops.pop(f"flops_{inner}")


def step_flops(model: nn.Module, input_ids: torch.Tensor) -> int:
    """FLOPs of one language-modelling training step (forward and backward) on `input_ids`."""
    count = FlopCount()
    with count.scope("step"):
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return count.flops["flops_step"]


def pretraining_flops(model: nn.Module, cfg: ToyWorldConfig) -> int:
    """FLOPs of pretraining `model` on the toy world's schedule: one measured step x num_steps.

    Every pretraining step has the same shape (batch_size windows of n_ctx tokens), so one step
    measured is every step's count. The optimizer's update is elementwise and not counted.
    """
    ids = torch.zeros(cfg.batch_size, cfg.n_ctx, dtype=torch.long, device=_device(model))
    return step_flops(model, ids) * cfg.num_steps


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
