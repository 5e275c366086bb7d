"""Activation reads, writes, routes and lenses over nnsight traces.

This package knows nothing about unlearning: it names sites in a model (TransformerLens-style names
mapped per architecture to module paths, `interventions.sites`) and declares what one step reads and
writes (`interventions.graph`), compiled into the fewest nnsight traces. The same names work
interactively (`interventions.ops`) and on TransformerLens bridges (`interventions.tl_backend`)::

    from interventions import Read, Route, StepGraph, capture_acts

    acts = capture_acts(model, input_ids, "blocks.{l}.hook_resid_post", layers="all")
    step = StepGraph([
        Read("acts", "blocks.2.hook_resid_post", model="trainable", batch="forget"),
        Route("routed", "blocks.2.hook_resid_post", source="trainable", target="base",
              batch="forget"),
    ]).compile({"trainable": model, "base": frozen_copy})
    out = step({"forget": forget_batch})  # {"acts", "routed", "forget/attention_mask"}

Read-only calls also run on NDIF, another host or nnsight's local simulation: pass
``remote=True``, a URL or ``"local"`` (`interventions.remote`); training stays local. An evaluator
asks for log-probabilities, reduced inside the trace (`interventions.scoring`)::

    scores = choice_logprobs(model, input_ids, attention_mask, target_mask, remote="local")

A frozen companion that shares the trained model's weights (the original of a LoRA run: the same
model with its adapters disabled) is a `FrozenView` (`interventions.frozen`).

Code outside this package never touches nnsight itself: `wrap_lm` wraps a Hugging Face model and
`unwrap` gives the torch module back.
"""

from interventions.frozen import FrozenView
from interventions.graph import CompiledStep, StepGraph
from interventions.nnsight_backend import (
    WrappedLM,
    as_envoy,
    position_ids_from_mask,
    unwrap,
    wrap_lm,
)
from interventions.nodes import (
    DEFAULT_BATCH,
    DEFAULT_MODEL,
    Lens,
    Node,
    Read,
    Route,
    Translator,
    Write,
)
from interventions.ops import capture_acts, lens, patch_acts, route
from interventions.remote import Execution, Remote, RemoteTrainingError
from interventions.scoring import choice_logprobs, token_logprobs
from interventions.sites import (
    ARCHITECTURES,
    Site,
    describe_model,
    expand_layers,
    resolve_site,
    resolve_sites,
    site_names,
)
from interventions.tl_backend import bridge_from_hf, is_bridge

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_BATCH",
    "DEFAULT_MODEL",
    "CompiledStep",
    "Execution",
    "FrozenView",
    "Lens",
    "Node",
    "Read",
    "Remote",
    "RemoteTrainingError",
    "Route",
    "Site",
    "StepGraph",
    "Translator",
    "Write",
    "WrappedLM",
    "as_envoy",
    "bridge_from_hf",
    "capture_acts",
    "choice_logprobs",
    "describe_model",
    "expand_layers",
    "is_bridge",
    "lens",
    "patch_acts",
    "position_ids_from_mask",
    "resolve_site",
    "resolve_sites",
    "route",
    "site_names",
    "token_logprobs",
    "unwrap",
    "wrap_lm",
]
