"""Interactive primitives: read, write, route and lens in one call each.

Each function builds a one-off `StepGraph` and runs it, so a notebook and a training step share
one code path. For a loop, declare the graph once and `StepGraph.compile` it instead.

Models are Hugging Face causal LMs (possibly peft- or DDP-wrapped), TransformerLens bridges, or
nnsight envoys of either; batches are token ids or mappings/objects with ``input_ids`` and
optionally ``attention_mask``::

    acts = capture_acts(model, batch, "blocks.{l}.hook_resid_post", layers="all")
    logits = patch_acts(model, batch, [Write("blocks.1.hook_attn_out", mode="zero")])["unembed"]
    routed = route(trainable, base, batch, "blocks.1.hook_resid_post")
    lens_logits = lens(model, batch, "blocks.{l}.hook_resid_post", layers=[0, 1])

Every function takes ``remote=`` (`interventions.remote`): the same call runs on NDIF
(``remote=True``), another host (a URL), or nnsight's local simulation (``remote="local"``), as
long as it needs no gradient; ``grad=True`` with ``remote`` raises `RemoteTrainingError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from jaxtyping import Float
from nnsight import Envoy
from torch import Tensor, nn

from interventions.graph import StepGraph
from interventions.nodes import DEFAULT_BATCH, DEFAULT_MODEL, Lens, Read, Route, Translator, Write
from interventions.remote import Execution, require_local
from interventions.sites import LayerSpec, describe_model, resolve_sites

__all__ = ["capture_acts", "lens", "patch_acts", "route"]

Model = nn.Module | Envoy


def _reads(
    model: Model, sites: str | Sequence[str], layers: LayerSpec | None, grad: bool
) -> list[Read]:
    """One read per concrete site, named by its canonical site name."""
    info = describe_model(model)
    names = [sites] if isinstance(sites, str) else list(sites)
    return [
        Read(site.name, site.name, grad=grad)
        for name in names
        for site in resolve_sites(model, name, layers if "{l}" in name else None, info)
    ]


def capture_acts(
    model: Model,
    batch: Any,
    sites: str | Sequence[str],
    *,
    layers: LayerSpec | None = None,
    grad: bool = False,
    remote: Execution = False,
) -> dict[str, Tensor]:
    """Read activations at some sites in one forward pass that stops after the last of them.

    Args:
        model: The model.
        batch: Token ids, or a mapping/object with ``input_ids`` (and ``attention_mask``).
        sites: Site names or ``{l}`` templates (expanded over ``layers``).
        layers: Layer selection for templates.
        grad: Keep the autograd graph (otherwise the results are detached).
        remote: Where to run (`interventions.remote`); needs ``grad=False``.

    Returns:
        Activation by canonical site name (e.g. ``blocks.3.hook_resid_post``).
    """
    if grad:
        require_local(remote, "capture_acts(grad=True)")
    graph = StepGraph(_reads(model, sites, layers, grad))
    return _run(graph, {DEFAULT_MODEL: model}, batch, remote)


def patch_acts(
    model: Model,
    batch: Any,
    writes: Sequence[Write],
    *,
    sites: str | Sequence[str] = "unembed",
    layers: LayerSpec | None = None,
    grad: bool = False,
    remote: Execution = False,
) -> dict[str, Tensor]:
    """Run a forward pass with some activations overwritten, and read some sites.

    Args:
        model: The model.
        batch: Token ids, or a mapping/object with ``input_ids`` (and ``attention_mask``).
        writes: The writes; their ``model`` and ``batch`` fields are ignored.
        sites: Sites to read (after the writes), by default the logits.
        layers: Layer selection for templates in ``sites``.
        grad: Keep the autograd graph.
        remote: Where to run (`interventions.remote`); needs ``grad=False``.

    Returns:
        Activation by canonical site name.
    """
    if grad:
        require_local(remote, "patch_acts(grad=True)")
    bound = [replace(write, model=DEFAULT_MODEL, batch=DEFAULT_BATCH) for write in writes]
    graph = StepGraph([*bound, *_reads(model, sites, layers, grad)])
    return _run(graph, {DEFAULT_MODEL: model}, batch, remote)


def route(
    source: Model, target: Model, batch: Any, site: str, *, output: str = "unembed"
) -> Float[Tensor, "batch pos d"]:
    """Read ``site`` on ``source`` and run ``target`` from that site on.

    Gradients of the result reach ``source``'s parameters up to ``site`` and none of ``target``'s
    (whose earlier blocks are skipped, where the site allows it).

    Args:
        source: Model the activation comes from (e.g. the model being unlearned).
        target: Model that continues from the site (e.g. the frozen original).
        batch: Token ids, or a mapping/object with ``input_ids`` (and ``attention_mask``).
        site: Concrete site, e.g. ``blocks.5.hook_resid_post``.
        output: Site of ``target`` to return, by default the logits.

    Returns:
        The target's activation at ``output``.
    """
    graph = StepGraph([Route("routed", site, source="source", target="target", output=output)])
    return _run(graph, {"source": source, "target": target}, batch)["routed"]


def lens(
    model: Model,
    batch: Any,
    site: str,
    *,
    layers: LayerSpec | None = None,
    translator: Translator | Mapping[int, Translator] | None = None,
    grad: bool = False,
    remote: Execution = False,
) -> Float[Tensor, "*layer batch pos d_vocab"]:
    """Decode a site through the final norm and unembedding: the logit lens, or a tuned lens.

    Args:
        model: The model.
        batch: Token ids, or a mapping/object with ``input_ids`` (and ``attention_mask``).
        site: A site, or a ``{l}`` template with ``layers``.
        layers: Layer selection for a template; the result is stacked along a new first dim.
        translator: Applied first (tuned lens): one callable, or one per layer index.
        grad: Keep the autograd graph.
        remote: Where to run (`interventions.remote`); needs ``grad=False``. The decoding runs
            remotely too, and a translator ships with the request.

    Returns:
        Lens logits ``[batch pos d_vocab]``, or ``[layer batch pos d_vocab]`` for a template.
    """
    if grad:
        require_local(remote, "lens(grad=True)")
    node = Lens("lens", site, layers=layers, translator=translator, grad=grad)
    return _run(StepGraph([node]), {DEFAULT_MODEL: model}, batch, remote)["lens"]


def _run(
    graph: StepGraph, models: Mapping[str, Model], batch: Any, remote: Execution = False
) -> dict[str, Tensor]:
    out = graph.run(models, {DEFAULT_BATCH: batch}, remote=remote)
    out.pop(f"{DEFAULT_BATCH}/attention_mask", None)
    return out
