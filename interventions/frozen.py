"""Frozen views: a model's frozen twin that shares its weights instead of copying them.

A step graph often reads a frozen companion next to the model it trains ("base", the original). With
LoRA the original is the trainable model itself with its adapters switched off, so a copy would only
double weight memory. `FrozenView` is that twin as a torch module: calling it runs the wrapped model
inside a context (peft's ``disable_adapter``) and in eval mode, then puts every module's train/eval
flag back::

    peft_model = get_peft_model(model, lora_config)
    base = FrozenView(peft_model, peft_model.disable_adapter)
    step = StepGraph(nodes).compile({"trainable": peft_model, "base": base})

How the pieces connect:

- sites resolve through the view like through peft or DDP (`interventions.sites.WRAPPERS` maps
  ``FrozenView`` to its ``module`` attribute), so a site of "base" is the same module as that site
  of "trainable", under the prefix ``module.``;
- nnsight lets several envoys share modules (each trace reaches them through its own interleaver),
  so the graph wraps the view and the trained model separately, and a trace of one never sees the
  other's interventions;
- the graph treats a view as frozen (`interventions.graph`): its traces record no autograd graph
  unless a routed activation that carries a gradient flows into them, as for a frozen copy. The
  context must keep the view's own trainable parameters out of its forward (peft's
  ``disable_adapter`` bypasses the adapters and sets their ``requires_grad`` to False while it is
  entered), so what flows back through a view reaches only the routed activation;
- eval mode is entered at every call, not once: the trained model shares these modules and is in
  train mode between the view's calls, and a frozen copy (``copy.deepcopy(model).eval()``) never
  applies dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

__all__ = ["FrozenView", "eval_mode"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put `module` and every submodule in eval mode; restore each one's own flag on exit."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


class FrozenView(nn.Module):
    """`module` run in eval mode inside `context()`: a frozen twin without a copy of its weights.

    Args:
        module: The model (its weights are shared, not copied).
        context: Called at every forward; the context it returns is entered around the call
            (e.g. ``peft_model.disable_adapter``). The default enters nothing.
    """

    def __init__(
        self,
        module: nn.Module,
        context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        super().__init__()
        self.module = module
        self.context = context

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model on these arguments, inside the context and in eval mode."""
        with self.context(), eval_mode(self.module):
            return self.module(*args, **kwargs)
