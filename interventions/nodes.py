"""The nodes of a step graph: what to read, write, route and decode, on which model and batch.

Nodes are plain frozen dataclasses; `interventions.graph.StepGraph` turns a list of them into
nnsight traces. Model and batch fields are names, bound to real models and batches when the graph is
compiled and run; single-model, single-batch uses can leave them at their defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from interventions.nnsight_backend import WriteMode
from interventions.sites import LayerSpec

__all__ = ["DEFAULT_BATCH", "DEFAULT_MODEL", "Lens", "Node", "Read", "Route", "Translator", "Write"]

DEFAULT_MODEL = "model"
"""Model name used by nodes that do not set one (single-model graphs)."""
DEFAULT_BATCH = "batch"
"""Batch name used by nodes that do not set one (single-batch graphs)."""

Translator = Callable[[Tensor], Tensor]
"""Maps a residual activation to the final layer's basis (a tuned-lens affine map)."""


@dataclass(frozen=True)
class Read:
    """Read the activation at a site (after any write there)."""

    name: str
    """Key of the result."""
    site: str
    """Site name, or a ``{l}`` template with ``layers``."""
    layers: LayerSpec | None = None
    """Layer selection for a template; the result is stacked along a new first dim."""
    model: str = DEFAULT_MODEL
    """Which model."""
    batch: str = DEFAULT_BATCH
    """Which batch."""
    grad: bool | None = None
    """Keep the autograd graph: None keeps it where the trace has one, False detaches."""


@dataclass(frozen=True, eq=False)
class Write:
    """Overwrite the activation at a site for the rest of the forward pass."""

    site: str
    """Site name, or a ``{l}`` template with ``layers`` (the same write at every layer)."""
    value: Tensor | float | str | None = None
    """A tensor broadcastable to the activation, a number, or the name of a single-site `Read` or
    `Route` of this graph or of a run-time value. None for ``mode="zero"``."""
    mode: WriteMode = "replace"
    """``replace`` (by value), ``add`` (value), ``scale`` (by value) or ``zero`` (ablate)."""
    mask: Tensor | str | None = None
    """Only write where this ``[batch pos]`` mask is true: a tensor, or a field of the batch."""
    layers: LayerSpec | None = None
    """Layer selection for a template."""
    model: str = DEFAULT_MODEL
    """Which model."""
    batch: str = DEFAULT_BATCH
    """Which batch."""

    def __post_init__(self) -> None:
        if (self.mode == "zero") != (self.value is None):
            raise ValueError(
                f"Write at {self.site!r}: mode={self.mode!r} "
                + ("takes no value." if self.mode == "zero" else "needs a value.")
            )


@dataclass(frozen=True)
class Route:
    """Run ``target`` on ``source``'s activation: read the site on source, write it into target.

    With a frozen base as target this is the routing of sequential unlearning: gradients of a loss
    on the result reach the source's parameters up to the site and nothing of the target's. The
    target runs a forward of its own, which the graph's Writes to that model and batch do not touch.
    """

    name: str
    """Key of the result (the target's activation at ``output``)."""
    site: str
    """Concrete site where the activation crosses over."""
    source: str
    """Model the activation is read from."""
    target: str
    """Model that runs on from the site."""
    batch: str = DEFAULT_BATCH
    """Which batch (both models see it)."""
    output: str = "unembed"
    """Concrete site of the target to return, after ``site`` (default: logits)."""


@dataclass(frozen=True, eq=False)
class Lens:
    """Decode a site through the model's final norm and unembedding: a logit or tuned lens.

    The decode never trains the readout: where the model's final norm or unembedding has
    trainable parameters, the lens decodes through frozen copies made when the graph is compiled
    (the readout as it was then), so gradients of a loss on the lens's logits reach the translator
    input, the activation at the site, and nothing else. A translator module follows the device
    of the activations it meets.
    """

    name: str
    """Key of the result, logits ``[batch pos d_vocab]`` (stacked over layers for a template)."""
    site: str
    """Site name, or a ``{l}`` template with ``layers``."""
    layers: LayerSpec | None = None
    """Layer selection for a template."""
    translator: Translator | Mapping[int, Translator] | None = None
    """Applied before the final norm (tuned lens): one callable, or one per layer index."""
    model: str = DEFAULT_MODEL
    """Which model."""
    batch: str = DEFAULT_BATCH
    """Which batch."""
    grad: bool | None = None
    """As for `Read`."""


Node = Read | Write | Route | Lens
