"""One site naming scheme for every model: TransformerLens names mapped to module paths.

A *site* is a place in the forward pass where an activation can be read or written. Sites are named
the TransformerLens way, whatever the model:

=============================  ==================================================================
``hook_embed``                 token embeddings (before any positional embedding is added)
``blocks.{l}.hook_resid_pre``  residual stream entering block ``l`` (= HF ``hidden_states[l]``)
``blocks.{l}.hook_attn_out``   attention output that block ``l`` adds to the residual stream
``blocks.{l}.hook_resid_mid``  residual after attention, before the MLP (sequential blocks only)
``blocks.{l}.hook_mlp_out``    MLP output that block ``l`` adds to the residual stream
``blocks.{l}.hook_resid_post`` residual stream leaving block ``l`` (= HF ``hidden_states[l + 1]``)
``ln_final.hook_normalized``   output of the final norm
``unembed``                    logits
=============================  ==================================================================

The convention ``blocks.{l}.hook_resid_post == hidden_states[l + 1]`` holds for every block but the
last: Hugging Face GPT-NeoX, Llama and GPT-2 put the *final norm* into their last
``hidden_states`` entry, so ``hidden_states[-1] == ln_final.hook_normalized`` while
``blocks.{L-1}.hook_resid_post`` is the un-normed output of the last block. Maps, probes and lenses
are fitted and applied at one named site, so this off-by-one cannot creep back in.

`ARCHITECTURES` is the data table that maps each site to a module path, per architecture. Adding
an architecture is adding a row; nothing else branches on the architecture. Wrappers are looked
through: a model inside peft's ``PeftModel`` resolves to paths under ``base_model.model.``, one
inside DDP or an `interventions.frozen.FrozenView` to paths under ``module.``, so the same site
names work on a LoRA, distributed or frozen-view model.

Usage::

    site = resolve_site(hf_model, "blocks.3.hook_resid_post")  # Site(path="gpt_neox.layers.3")
    sites = resolve_sites(hf_model, "blocks.{l}.hook_resid_post", layers="all")
    expand_layers(-1, n_layers=4)                              # [3]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from torch import nn

from interventions import tl_backend

__all__ = [
    "ARCHITECTURES",
    "BLOCK_SITES",
    "GLOBAL_SITES",
    "WRAPPERS",
    "Architecture",
    "Hook",
    "LayerSpec",
    "ModelInfo",
    "Site",
    "describe_model",
    "expand_layers",
    "resolve_site",
    "resolve_sites",
    "site_names",
]


class Hook(NamedTuple):
    """Where a site lives in one architecture: a module, which side of it, which tuple item."""

    module: str
    """Dotted module path from the unwrapped model; ``{l}`` stands for the block index."""
    attr: Literal["input", "output"]
    """``input`` is the module's first argument, ``output`` its return value."""
    index: int | None = None
    """Item of a tuple output (e.g. 0 for an attention module returning ``(out, weights)``)."""


@dataclass(frozen=True)
class Architecture:
    """One row of the site table: how the TransformerLens site names map onto a model family."""

    sites: dict[str, Hook]
    """Site kind (``hook_resid_post``, ``unembed``, ...) to where it lives."""
    layers: str
    """Path of the ``ModuleList`` of blocks; its length is the number of layers."""
    final_norm: str
    """Path of the final norm module (the first half of a lens)."""
    unembed: str
    """Path of the unembedding module (the second half of a lens)."""
    parallel_residual: str | None = None
    """Dotted path, from the unwrapped model, of a flag that is true when attention and MLP both
    read ``resid_pre`` (GPT-NeoX, GPT-J); such blocks have no ``hook_resid_mid``."""
    input_name: str = "input_ids"
    """Keyword under which the forward takes token ids."""
    uses_position_ids: bool = True
    """Pass ``position_ids`` computed from the attention mask, so left padding gets positions 0.."""
    forward_kwargs: tuple[tuple[str, Any], ...] = ()
    """Extra keyword arguments for every forward (e.g. no KV cache in training)."""


BLOCK_SITES = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)
"""Per-block site kinds, in the order the forward pass reaches them."""

GLOBAL_SITES = ("hook_embed", "ln_final.hook_normalized", "unembed")
"""Sites outside the blocks: before them, after them, and the logits."""

_RESID_MID_WRITE = (
    "blocks.{l}.hook_resid_mid can be read but not written: the model adds the residual inside "
    "the block, so a write there would reach only the MLP branch. Write blocks.{l}.hook_attn_out "
    "instead."
)

_GPT_NEOX = Architecture(
    sites={
        "hook_embed": Hook("gpt_neox.embed_in", "output"),
        "hook_resid_pre": Hook("gpt_neox.layers.{l}", "input"),
        "hook_attn_out": Hook("gpt_neox.layers.{l}.post_attention_dropout", "output"),
        "hook_resid_mid": Hook("gpt_neox.layers.{l}.post_attention_layernorm", "input"),
        "hook_mlp_out": Hook("gpt_neox.layers.{l}.post_mlp_dropout", "output"),
        "hook_resid_post": Hook("gpt_neox.layers.{l}", "output"),
        "ln_final.hook_normalized": Hook("gpt_neox.final_layer_norm", "output"),
        "unembed": Hook("lm_head", "output"),
    },
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    parallel_residual="config.use_parallel_residual",
    forward_kwargs=(("use_cache", False),),
)

_LLAMA = Architecture(
    sites={
        "hook_embed": Hook("model.embed_tokens", "output"),
        "hook_resid_pre": Hook("model.layers.{l}", "input"),
        "hook_attn_out": Hook("model.layers.{l}.self_attn", "output", 0),
        "hook_resid_mid": Hook("model.layers.{l}.post_attention_layernorm", "input"),
        "hook_mlp_out": Hook("model.layers.{l}.mlp", "output"),
        "hook_resid_post": Hook("model.layers.{l}", "output"),
        "ln_final.hook_normalized": Hook("model.norm", "output"),
        "unembed": Hook("lm_head", "output"),
    },
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    forward_kwargs=(("use_cache", False),),
)

_GPT2 = Architecture(
    sites={
        "hook_embed": Hook("transformer.wte", "output"),
        "hook_resid_pre": Hook("transformer.h.{l}", "input"),
        "hook_attn_out": Hook("transformer.h.{l}.attn", "output", 0),
        "hook_resid_mid": Hook("transformer.h.{l}.ln_2", "input"),
        "hook_mlp_out": Hook("transformer.h.{l}.mlp", "output"),
        "hook_resid_post": Hook("transformer.h.{l}", "output"),
        "ln_final.hook_normalized": Hook("transformer.ln_f", "output"),
        "unembed": Hook("lm_head", "output"),
    },
    layers="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    forward_kwargs=(("use_cache", False),),
)

_TL_BRIDGE = Architecture(
    sites={
        "hook_embed": Hook("embed.hook_out", "output"),
        "hook_resid_pre": Hook("blocks.{l}.hook_in", "output"),
        "hook_attn_out": Hook("blocks.{l}.attn.hook_out", "output"),
        "hook_resid_mid": Hook("blocks.{l}.ln2.hook_in", "output"),
        "hook_mlp_out": Hook("blocks.{l}.mlp.hook_out", "output"),
        "hook_resid_post": Hook("blocks.{l}.hook_out", "output"),
        "ln_final.hook_normalized": Hook("ln_final.hook_out", "output"),
        "unembed": Hook("unembed.hook_out", "output"),
    },
    layers="blocks",
    final_norm="ln_final",
    unembed="unembed",
    parallel_residual="cfg.parallel_attn_mlp",
    input_name="input",
    uses_position_ids=False,
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt_neox": _GPT_NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": _GPT2,
    tl_backend.ARCHITECTURE_KEY: _TL_BRIDGE,
}
"""Hugging Face ``config.model_type`` (or the TransformerLens bridge key) to its site table row.
Llama, Mistral and Qwen2 share one module layout and so one row."""

WRAPPERS: dict[str, str] = {
    "DistributedDataParallel": "module",
    "PeftModel": "base_model.model",
    "FrozenView": "module",
}
"""Wrapper class name (matched anywhere in the class's MRO) to the path of the model it wraps."""

LayerSpec = int | Sequence[int] | range | Literal["all"]
"""Which blocks: one index (negative counts from the end), several, a range, or ``"all"``."""

_BLOCK_NAME = re.compile(r"^blocks\.(-?\d+)\.(hook_\w+)$")


@dataclass(frozen=True)
class Site:
    """A site resolved on one model: where to find it and where it falls in the forward pass."""

    name: str
    """Canonical name, e.g. ``blocks.3.hook_resid_post`` (negative indices made positive)."""
    path: str
    """Dotted module path from the model as given (wrapper prefixes included)."""
    attr: Literal["input", "output"]
    """Which side of the module holds the activation."""
    index: int | None
    """Item of a tuple output, or None."""
    layer: int | None
    """Block index, or None for a site outside the blocks."""
    order: tuple[int, int, int]
    """Sort key in forward-pass order: (stage, layer, position within the block)."""
    write_error: str | None = None
    """Why this site cannot be written, or None when it can."""


class ModelInfo(NamedTuple):
    """What the site resolver knows about one model."""

    key: str
    """Row of `ARCHITECTURES` (an HF ``model_type`` or the TransformerLens bridge key)."""
    arch: Architecture
    """The row itself."""
    prefix: str
    """Path from the model as given to the unwrapped model (``""``, ``"module."``, ...)."""
    n_layers: int
    """Number of blocks."""
    parallel_residual: bool
    """Whether blocks add attention and MLP outputs to the same ``resid_pre``."""


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _unwrap(module: nn.Module) -> tuple[nn.Module, str]:
    """Look through DDP and peft wrappers: (innermost model, path prefix to reach it)."""
    prefix = ""
    while True:
        inner = next(
            (WRAPPERS[c.__name__] for c in type(module).__mro__ if c.__name__ in WRAPPERS), None
        )
        if inner is None:
            return module, prefix
        module = _get_path(module, inner)
        prefix += inner + "."


def _root_module(model: Any) -> nn.Module:
    """The torch module behind an nnsight envoy, or the module itself."""
    module = getattr(model, "_module", model)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"Expected a torch nn.Module or an nnsight-wrapped one, got {type(model).__name__}."
        )
    return module


def describe_model(model: Any) -> ModelInfo:
    """Find a model's row in the site table, its wrapper prefix and its number of blocks.

    Args:
        model: A Hugging Face causal LM, a TransformerLens ``TransformerBridge``, either one inside
            peft's ``PeftModel``, DDP or a ``FrozenView``, or an nnsight envoy wrapping any of
            these.

    Returns:
        What the resolver needs to map site names onto this model.

    Raises:
        ValueError: If the architecture has no row in `ARCHITECTURES`.
    """
    inner, prefix = _unwrap(_root_module(model))
    if tl_backend.is_bridge(inner):
        key = tl_backend.ARCHITECTURE_KEY
    else:
        key = getattr(getattr(inner, "config", None), "model_type", None)
        if key not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ValueError(
                f"No site table row for {type(inner).__name__} (config.model_type={key!r}). "
                f"Known architectures: {known}. Add a row to interventions.sites.ARCHITECTURES."
            )
    arch = ARCHITECTURES[key]
    try:
        n_layers = len(_get_path(inner, arch.layers))
    except AttributeError as error:
        raise ValueError(
            f"{type(inner).__name__} has no module {arch.layers!r}, which the {key!r} row expects; "
            "pass the causal LM (with its head), not the bare backbone."
        ) from error
    parallel = bool(_get_path(inner, arch.parallel_residual)) if arch.parallel_residual else False
    return ModelInfo(key, arch, prefix, n_layers, parallel)


def expand_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """Turn a layer selection into a list of block indices in ``[0, n_layers)``.

    Args:
        spec: An int (negative counts from the end), a sequence of ints, a range, or ``"all"``.
        n_layers: Number of blocks in the model.

    Returns:
        The selected indices, in the order given, negatives made positive.

    Raises:
        IndexError: If an index is out of range.
        TypeError: If the spec is not a layer selection.
        ValueError: If the selection is empty.
    """
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, (bool, str)):
        raise TypeError(f"Layer selection must be an int, ints, a range or 'all', got {spec!r}.")
    indices = [spec] if isinstance(spec, int) else list(spec)
    if not indices:
        raise ValueError("The layer selection is empty.")
    out = []
    for index in indices:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"Layer indices must be ints, got {index!r} in {spec!r}.")
        if not -n_layers <= index < n_layers:
            raise IndexError(
                f"Layer {index} is out of range: the model has {n_layers} blocks, so layers are "
                f"0..{n_layers - 1} (or -{n_layers}..-1 from the end)."
            )
        out.append(index % n_layers)
    return out


def site_names(model: Any) -> list[str]:
    """Every site name this model has, in forward-pass order (``{l}`` left as a template).

    Args:
        model: A supported model, possibly wrapped (see `describe_model`).

    Returns:
        Names such as ``hook_embed``, ``blocks.{l}.hook_resid_pre``, ..., ``unembed``.
    """
    info = describe_model(model)
    blocks = [
        f"blocks.{{l}}.{kind}"
        for kind in BLOCK_SITES
        if not (kind == "hook_resid_mid" and info.parallel_residual)
    ]
    return [GLOBAL_SITES[0], *blocks, *GLOBAL_SITES[1:]]


def _unknown_site(name: str, model: Any, info: ModelInfo) -> ValueError:
    return ValueError(
        f"Unknown site {name!r}. Sites on this {info.key} model ({info.n_layers} blocks, "
        f"l in 0..{info.n_layers - 1}): {', '.join(site_names(model))}."
    )


def resolve_site(model: Any, name: str, info: ModelInfo | None = None) -> Site:
    """Map one site name onto a model's modules.

    Args:
        model: A supported model, possibly wrapped (see `describe_model`).
        name: A concrete site name, e.g. ``blocks.-1.hook_resid_post`` or ``unembed``.
        info: The model's `describe_model` result, if already computed.

    Returns:
        The resolved site.

    Raises:
        ValueError: For an unknown site, or ``hook_resid_mid`` on a parallel-residual model.
        IndexError: For a block index out of range.
    """
    info = info or describe_model(model)
    match = _BLOCK_NAME.match(name)
    if match:
        layer = expand_layers(int(match.group(1)), info.n_layers)[0]
        kind = match.group(2)
        if kind not in BLOCK_SITES:
            raise _unknown_site(name, model, info)
        if kind == "hook_resid_mid" and info.parallel_residual:
            raise ValueError(
                f"{name!r} does not exist on this {info.key} model: it uses a parallel residual "
                "(attention and MLP both read hook_resid_pre and are added together), so there is "
                "no residual stream between them. Use hook_resid_pre, hook_attn_out, hook_mlp_out "
                "or hook_resid_post."
            )
        order = (1, layer, BLOCK_SITES.index(kind))
        canonical = f"blocks.{layer}.{kind}"
    elif name in GLOBAL_SITES:
        layer, kind, canonical = None, name, name
        order = (GLOBAL_SITES.index(name) * 2, 0, 0)
    else:
        raise _unknown_site(name, model, info)
    hook = info.arch.sites[kind]
    path = info.prefix + hook.module.format(l=layer)
    write_error = _RESID_MID_WRITE.format(l=layer) if kind == "hook_resid_mid" else None
    return Site(canonical, path, hook.attr, hook.index, layer, order, write_error)


def resolve_sites(
    model: Any, name: str, layers: LayerSpec | None = None, info: ModelInfo | None = None
) -> list[Site]:
    """Resolve a site name, or a ``{l}`` template over a layer selection.

    Args:
        model: A supported model, possibly wrapped (see `describe_model`).
        name: A concrete site name, or a template such as ``blocks.{l}.hook_resid_post``.
        layers: Required with a template, forbidden without one (see `expand_layers`).
        info: The model's `describe_model` result, if already computed.

    Returns:
        One site per selected layer (one site for a concrete name).

    Raises:
        ValueError: If ``layers`` and the template do not go together, or a site is unknown.
    """
    info = info or describe_model(model)
    if "{l}" in name:
        if layers is None:
            raise ValueError(f"Site template {name!r} needs a layer selection (layers=...).")
        return [
            resolve_site(model, name.format(l=layer), info)
            for layer in expand_layers(layers, info.n_layers)
        ]
    if layers is not None:
        raise ValueError(
            f"layers={layers!r} was given with the concrete site {name!r}; "
            "use a template such as 'blocks.{l}.hook_resid_post'."
        )
    return [resolve_site(model, name, info)]
