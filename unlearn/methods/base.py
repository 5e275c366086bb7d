"""What a method is: the activations it needs (step-graph nodes) and its weighted loss terms.

A method never registers a hook and never runs a model. It declares `nodes` (reads, routes and
lenses of `interventions.graph` on the models "trainable" and "base", the frozen original, and the
batches "forget" and "retain") and `terms`: functions from the step's named activations to scalar
losses, each with a coefficient and a ramp over training. The training core (`unlearn.training`)
compiles the nodes once, runs them every micro-batch, and sums the weighted terms.

Methods stack: `stack(a, b)` is a method with the nodes of both (shared by name) and all their
terms, so a lens-entropy forget term can be combined with the orthogonality term, say.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from interventions import Lens, Read, Route, Write
from unlearn.data import Batch

Node = Read | Write | Route | Lens

TRAINABLE = "trainable"
"""Model name of the model being unlearned in every step graph."""
BASE = "base"
"""Model name of the frozen original (the reference for retain and circuit-breaker terms)."""
FORGET = "forget"
"""Batch name of forget data."""
RETAIN = "retain"
"""Batch name of retain data."""
RETAIN_TERM = "retain"
"""Name of the retain term (`unlearn.methods.retain`): the one term a sharpness-aware step
(`OptimSettings.sam_rho`) takes at the unperturbed weights; every other term is a forget term."""


@dataclass(frozen=True)
class Ramp:
    """A coefficient multiplier that moves linearly from `start` to `end` over training.

    Progress runs from 0 at the first optimizer step to 1 at the last (the reference advanced it per
    micro-batch; here it follows optimizer steps, so gradient accumulation does not change it).
    """

    start: float = 1.0
    """Multiplier at step 0."""
    end: float = 1.0
    """Multiplier at the last step."""

    def __call__(self, progress: float) -> float:
        """The multiplier at `progress` in [0, 1] (clamped)."""
        progress = min(1.0, max(0.0, progress))
        return self.start + (self.end - self.start) * progress


CONSTANT = Ramp(1.0, 1.0)
RAMP_UP = Ramp(0.0, 1.0)
"""The reference's orthogonality schedule: c."""
RETAIN_WARMUP = Ramp(0.1, 1.0)
"""The reference's retain schedule with --retain_warmup: 0.1 + 0.9c."""
FORGET_DECAY = Ramp(1.0, 0.75)
"""The reference's forget schedule: 1 - 0.25c."""

RampName = Literal["constant", "ramp_up", "retain_warmup", "forget_decay"]
"""Names of the ramps a config can choose."""

RAMPS: dict[str, Ramp] = {
    "constant": CONSTANT,
    "ramp_up": RAMP_UP,
    "retain_warmup": RETAIN_WARMUP,
    "forget_decay": FORGET_DECAY,
}
"""Named ramps for configs."""

TermFn = Callable[[Mapping[str, Tensor], Batch, Batch], Float[Tensor, ""]]
"""(step activations, forget batch, retain batch) -> scalar loss."""


@dataclass(frozen=True)
class Term:
    """One weighted loss term."""

    name: str
    """Metric key: logged as `loss/<name>`."""
    fn: TermFn
    """Computes the unweighted loss."""
    coef: float = 1.0
    """Peak coefficient."""
    ramp: Ramp = CONSTANT
    """Coefficient multiplier over training."""

    def weight(self, progress: float) -> float:
        """Coefficient at `progress` in [0, 1]."""
        return self.coef * self.ramp(progress)


@dataclass
class ForgetSettings:
    """The weight of a method's forget term (nested as `forget` in every method's config)."""

    forget_coef: float = 1.0
    """Peak forget coefficient."""
    forget_ramp: RampName = "forget_decay"
    """Forget coefficient schedule (a key of `RAMPS`)."""

    def term(self, fn: TermFn, name: str = "forget") -> Term:
        """`fn` weighted by these settings."""
        return Term(name, fn, self.forget_coef, RAMPS[self.forget_ramp])


@runtime_checkable
class Method(Protocol):
    """The contract every method satisfies (runtime-checkable, for beartype/jaxtyping checks).

    A method may also have a `models` attribute: extra frozen models its nodes read, by name
    (checkpoint transfer's "teacher"); the training core adds them to the step graph.
    """

    @property
    def nodes(self) -> Sequence[Node]:
        """Step-graph nodes on models "trainable"/"base" and batches "forget"/"retain"."""
        ...

    @property
    def terms(self) -> Sequence[Term]:
        """Weighted loss terms computed from the nodes' results."""
        ...


@dataclass(frozen=True)
class Stacked:
    """Several methods (components) trained together."""

    nodes: tuple[Node, ...] = field(default_factory=tuple)
    terms: tuple[Term, ...] = field(default_factory=tuple)
    models: dict[str, Any] = field(default_factory=dict)
    """Extra frozen models the nodes read (e.g. a teacher checkpoint)."""


def _node_key(node: Node) -> str:
    return getattr(node, "name", None) or f"write:{id(node)}"


def stack(*methods: Method) -> Stacked:
    """Combine methods: nodes are shared by name (equal nodes only), terms are all kept.

    Raises:
        ValueError: Two different nodes with one name, or two terms with one name.
    """
    nodes: dict[str, Node] = {}
    terms: dict[str, Term] = {}
    models: dict[str, Any] = {}
    for method in methods:
        for name, model in extra_models(method).items():
            if name in models and models[name] is not model:
                raise ValueError(f"two methods bring different models named {name!r}")
            models[name] = model
        for node in method.nodes:
            key = _node_key(node)
            if key in nodes and nodes[key] != node:
                raise ValueError(f"two methods declare different nodes named {key!r}")
            nodes[key] = node
        for term in method.terms:
            if term.name in terms:
                raise ValueError(f"two methods declare a loss term named {term.name!r}")
            terms[term.name] = term
    return Stacked(tuple(nodes.values()), tuple(terms.values()), models)


def extra_models(method: Method) -> dict[str, Any]:
    """The frozen models a method brings beyond "trainable" and "base" (an optional attribute)."""
    return dict(getattr(method, "models", {}))
