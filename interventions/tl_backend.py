"""TransformerLens 4 adapter: recognise a ``TransformerBridge`` and build one offline.

A bridge exposes TransformerLens hook points (``blocks.{l}.hook_out``, ``ln_final.hook_out``,
...) as modules, so nnsight reads and writes them like any other module. The bridge's row in
`interventions.sites.ARCHITECTURES` (key `ARCHITECTURE_KEY`) maps the library's site names onto
those hook points; everything else (primitives, step graphs) is shared with the Hugging Face path,
and the two agree to float precision on the same weights.

Usage::

    bridge = bridge_from_hf(copy.deepcopy(hf_model), tokenizer)    # offline, no hub access
    acts = capture_acts(bridge, input_ids, ["blocks.1.hook_resid_post"])

transformer_lens is imported only when a bridge is built, so the rest of the package does not pay
its import time.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["ARCHITECTURE_KEY", "bridge_from_hf", "is_bridge"]

ARCHITECTURE_KEY = "transformer_lens_bridge"
"""The site table row used for every TransformerLens ``TransformerBridge``."""


def is_bridge(module: nn.Module) -> bool:
    """Whether ``module`` is a TransformerLens ``TransformerBridge`` (without importing TL).

    Args:
        module: Any torch module.

    Returns:
        True for a bridge (or a subclass of one).
    """
    return any(
        cls.__name__ == "TransformerBridge" and cls.__module__.startswith("transformer_lens")
        for cls in type(module).__mro__
    )


def bridge_from_hf(hf_model: nn.Module, tokenizer: Any, name: str | None = None) -> nn.Module:
    """Wrap a Hugging Face causal LM in a TransformerLens 4 ``TransformerBridge``, offline.

    The bridge *takes over the model's modules in place* (its blocks become bridge components and
    attention is switched to the eager implementation), so pass a copy when the plain Hugging Face
    model is still needed. Weights are shared, not copied, and logits match the Hugging Face model.

    Args:
        hf_model: A causal LM whose architecture TransformerLens supports.
        tokenizer: Its tokenizer. Required: without one the bridge would try the hub.
            TransformerLens re-loads a tokenizer that has a BOS token but no ``name_or_path`` it
            can read, so a tokenizer built in memory should have no BOS token (the bridge then
            uses EOS).
        name: Model name recorded on the bridge; defaults to the config's ``name_or_path``.

    Returns:
        The ``TransformerBridge``.
    """
    from transformer_lens import TransformerBridge

    config = getattr(hf_model, "config")  # noqa: B009 (nn.Module's __getattr__ types it as a Tensor)
    name = name or getattr(config, "name_or_path", None) or config.model_type
    param = next(hf_model.parameters())
    return TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=param.device, dtype=param.dtype
    )
