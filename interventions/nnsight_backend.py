"""nnsight adapter: wrap a model, build its forward arguments, and run one planned trace.

Everything in this package that touches a live forward pass goes through `run_trace`, the single
``with model.trace(...)`` block. A step graph (`interventions.graph`) compiles into a list of
`Point`s per trace, sorted in forward-pass order; `run_trace` visits each point once, applies its
edits (replace, add, scale, zero-ablate, optionally under a per-token mask), records what the
point's reads ask for (or skips a module outright, for routing), and stops the forward after the
last point. The body is ordinary Python run by nnsight in a greenlet alongside the forward, so
values land in the caller's ``values`` dict.

nnsight re-parses trace bodies from source files, so this module must stay a real ``.py`` file
(it is), and the body must follow module execution order (the planner guarantees it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from jaxtyping import Bool, Float, Int
from nnsight import Envoy, NNsight, TransformersModel, save
from nnsight.intervention.tracer import InterleavingTracer
from torch import Tensor, nn

from interventions.remote import CapturingBackend, Remote, make_backend, wait_for_result
from interventions.sites import Architecture

__all__ = [
    "Edit",
    "Point",
    "WrappedLM",
    "as_envoy",
    "forward_kwargs",
    "position_ids_from_mask",
    "run_trace",
    "unwrap",
    "wrap_lm",
]

WrappedLM = TransformersModel
"""The nnsight wrapper of a Hugging Face causal LM (what `wrap_lm` returns)."""

WriteMode = Literal["replace", "add", "scale", "zero"]
"""How a write combines its value with the activation: ``value``, ``act + value``,
``act * value``, or zeros."""


def as_envoy(model: nn.Module | Envoy) -> Envoy:
    """Return an nnsight envoy for ``model``, wrapping a plain torch module with ``NNsight``.

    Args:
        model: A torch module, or an already wrapped model (``NNsight``, ``TransformersModel``).

    Returns:
        An envoy whose ``trace`` runs the model. Wrapping is cheap (about 1 ms for a small model)
        and leaves the module usable outside traces exactly as before.
    """
    return model if isinstance(model, Envoy) else NNsight(model)


def unwrap(model: nn.Module | Envoy) -> nn.Module:
    """Return the torch module behind ``model``: the wrapped module of an envoy, else ``model``.

    The module shares its weights with the wrapper, so it can be trained, saved or moved directly.

    Args:
        model: A torch module, or an nnsight wrapper of one (``NNsight``, `WrappedLM`).
    """
    return model._module if isinstance(model, Envoy) else model


def wrap_lm(model: nn.Module, tokenizer: Any) -> WrappedLM:
    """Wrap a Hugging Face causal LM for nnsight, with its tokenizer (so ``trace`` takes text).

    Args:
        model: The loaded model; the wrapper shares its weights (`unwrap` gives it back).
        tokenizer: Its Hugging Face tokenizer.
    """
    return TransformersModel(model, tokenizer=tokenizer)


def position_ids_from_mask(
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"],
) -> Int[Tensor, "batch pos"]:
    """0-based positions counting only attended tokens, so left padding starts real text at 0.

    Args:
        attention_mask: 1 for tokens, 0 for padding.

    Returns:
        ``cumsum(mask) - 1``, clamped at 0 (padding before the first token gets position 0).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_kwargs(
    arch: Architecture,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for one forward of a model of architecture ``arch``.

    Args:
        arch: The model's site table row.
        input_ids: Token ids.
        attention_mask: 1 for tokens, 0 for padding; None for no padding.

    Returns:
        Token ids under the row's input name, the mask and (where the row asks for it) position ids
        derived from the mask, plus the row's fixed extras (e.g. ``use_cache=False``).
    """
    kwargs: dict[str, Any] = {arch.input_name: input_ids, **dict(arch.forward_kwargs)}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        if arch.uses_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return kwargs


@dataclass(frozen=True, eq=False)
class Edit:
    """One write at a point: combine the activation with a value, optionally under a token mask."""

    mode: WriteMode
    """How to combine (see `WriteMode`)."""
    value: Tensor | float | str | None = None
    """A constant, or the key of a tensor in the run's ``values`` (e.g. another model's read)."""
    mask: Tensor | str | None = None
    """``[batch pos]`` mask, or its key in ``values``; the edit applies only where it is true."""

    def apply(
        self, act: Float[Tensor, "batch pos *d"], values: Mapping[str, Tensor]
    ) -> Float[Tensor, "batch pos *d"]:
        """Return the edited activation (``act`` itself is never modified in place).

        Args:
            act: The activation at the point, after any earlier edits.
            values: The run's values, for keys in `value` and `mask`.

        Returns:
            The activation the rest of the forward pass sees.
        """
        if self.mode == "zero":
            new = torch.zeros_like(act)
        else:
            value = values[self.value] if isinstance(self.value, str) else self.value
            value = torch.as_tensor(value, dtype=act.dtype, device=act.device)
            if self.mode == "add":
                new = act + value
            elif self.mode == "scale":
                new = act * value
            else:
                new = value
        mask = values[self.mask] if isinstance(self.mask, str) else self.mask
        if mask is not None:
            mask = mask.to(device=act.device, dtype=torch.bool)
            return torch.where(mask.reshape(*mask.shape, *[1] * (act.ndim - mask.ndim)), new, act)
        return new if new.shape == act.shape else new.expand_as(act).contiguous()


@dataclass(eq=False)
class Point:
    """One module input or output visited by a trace, with what to do there."""

    envoy: Envoy
    """The module's envoy in the model's nnsight tree."""
    attr: Literal["input", "output"]
    """Which side of the module."""
    index: int | None = None
    """Item of a tuple output, or None."""
    edits: list[Edit] = field(default_factory=list)
    """Writes, applied in order."""
    reads: list[tuple[str, bool]] = field(default_factory=list)
    """``(key, detach)``: store the activation (after the edits) under ``key`` in ``values``."""
    skip: str | None = None
    """Instead of visiting: skip the module, using ``values[skip]`` as its output."""
    skip_dtype: torch.dtype | None = None
    """Dtype the skip replacement is cast to (the module's own)."""


def _with_item(container: tuple, index: int, item: Tensor) -> tuple:
    return (*container[:index], item, *container[index + 1 :])


def run_trace(
    root: Envoy,
    kwargs: Mapping[str, Any],
    points: list[Point],
    values: dict[str, Tensor],
    *,
    stop: bool = True,
    remote: Remote | None = None,
    decodes: Sequence[tuple[Sequence[str], Callable[[list[Tensor]], list[Tensor]]]] = (),
) -> None:
    """Run one forward of ``root`` under nnsight, visiting ``points`` in order.

    Reads are written into ``values`` as the forward reaches them; edits take their values and masks
    from ``values``. No hook or nnsight state outlives the call, also when it raises.

    Args:
        root: The model's root envoy.
        kwargs: Forward keyword arguments (see `forward_kwargs`).
        points: Points in forward-pass order, at most one per module input/output.
        values: Inputs to the edits and outputs of the reads; updated in place.
        stop: Stop the forward right after the last point (later layers never run).
        remote: Run elsewhere (`interventions.remote`). The body then saves its reads, which come
            back detached and are written into ``values`` after the trace.
        decodes: ``(keys, fn)`` pairs applied in the trace after the last point:
            ``values[keys] = fn(values[keys])``. A remote run decodes lenses here, on the server's
            modules (the client's copy of a hosted model may have no weights).
    """
    backend = None if remote is None else CapturingBackend(make_backend(root, remote))
    with root.trace(**kwargs, backend=backend) as tracer:
        for point in points:
            if point.skip is not None:
                point.envoy.skip(values[point.skip].to(point.skip_dtype))
                continue
            raw = getattr(point.envoy, point.attr)
            act = raw if point.index is None else raw[point.index]
            if point.edits:
                for edit in point.edits:
                    act = edit.apply(act, values)
                new = act if point.index is None else _with_item(raw, point.index, act)
                setattr(point.envoy, point.attr, new)
            for key, detach in point.reads:
                values[key] = act.detach() if detach else act
        for keys, decode in decodes:
            for key, decoded in zip(keys, decode([values[key] for key in keys]), strict=True):
                values[key] = decoded
        if remote is not None:  # a remote run returns saved locals by name: "reads"
            reads = save(  # noqa: F841
                {key: values[key].detach() for point in points for key, _ in point.reads}
            )
        if stop:
            cast(InterleavingTracer, tracer).stop()
    if remote is not None:
        result = wait_for_result(cast(CapturingBackend, backend), remote)
        if result is not None:  # a simulated run wrote into ``values`` itself, like a local one
            values.update(result["reads"])
