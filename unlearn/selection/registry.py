"""The token selectors by name, and what a `--token_mask` value means.

`SELECTORS` is the one table of selectors (an explicit dict literal, like the method registry).
`--token_mask` (`unlearn.config.DataConfig.token_mask`) takes one of four kinds of value:

- "all" (the default): every token, no selection;
- "values": the ground truth, the value tokens of the documents' facts
  (`TokenizedDocuments.value_masks`);
- a selector's name: its mask with its default settings, computed on the model before unlearning
  and cached (`unlearn.selection.cache`);
- anything else: a mask file, or a folder holding one, that `python -m recipes.select_tokens` wrote.

`token_mask_source` classifies a value before anything loads (so a typo fails at once), and
`resolve_token_mask` turns it into one bool per token of the forget rows (None for "all").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from unlearn.config import ALL_TOKENS, VALUES
from unlearn.data import TokenizedDocuments
from unlearn.selection import activations, attribution, keywords, linear_probe, sae
from unlearn.selection.base import SelectionInputs, Selector
from unlearn.selection.cache import cached_selection
from unlearn.selection.masks import MASK_FILE, load_token_mask

SELECTORS: dict[str, Selector] = {
    "keywords": Selector(
        "keywords",
        keywords.KeywordSettings,
        keywords.select,
        "tokens overlapping a case-insensitive keyword match",
    ),
    "activations": Selector(
        "activations",
        activations.ActivationSettings,
        activations.select,
        "tokens whose activation is most similar to the keyword tokens' mean",
    ),
    "probe": Selector(
        "probe",
        linear_probe.ProbeSettings,
        linear_probe.select,
        "tokens a logistic forget-vs-retain probe scores highest",
    ),
    "sae": Selector(
        "sae",
        sae.SaeSettings,
        sae.select,
        "tokens where forget-specific TopK SAE latents fire",
    ),
    "attribution": Selector(
        "attribution",
        attribution.AttributionSettings,
        attribution.select,
        "tokens whose training most lowers the forget dev loss (first-order influence)",
    ),
}
"""Every token selector by name, in benchmark order."""

NEEDS_KEYWORDS = ("keywords", "activations")
"""Selectors that read the keywords."""


def selector(name: str) -> Selector:
    """The selector `name`.

    Raises:
        ValueError: Unknown name (the message lists the selectors).
    """
    if name not in SELECTORS:
        raise ValueError(f"unknown token selector {name!r}; choose one of {', '.join(SELECTORS)}")
    return SELECTORS[name]


def token_mask_source(spec: str) -> Literal["all", "values", "selector", "file"]:
    """What a `--token_mask` value names, checked before anything loads.

    Raises:
        ValueError: Neither "all", "values", a selector, nor an existing mask file or folder.
    """
    if spec == ALL_TOKENS:
        return "all"
    if spec == VALUES:
        return "values"
    if spec in SELECTORS:
        return "selector"
    path = Path(spec).expanduser()
    if path.is_file() or (path / MASK_FILE).is_file():
        return "file"
    raise ValueError(
        f"--token_mask {spec!r} is not {ALL_TOKENS!r} (every token), {VALUES!r} (the "
        "ground-truth value tokens), a selector "
        f"({', '.join(SELECTORS)}) nor a mask file or a folder holding {MASK_FILE} (write one with "
        "python -m recipes.select_tokens)"
    )


def resolve_token_mask(
    spec: str, forget: TokenizedDocuments, inputs: Callable[[], SelectionInputs]
) -> tuple[list[list[bool]] | None, dict[str, Any]]:
    """One bool per token of the forget rows for a `--token_mask` value, and where it came from.

    Args:
        spec: "all", "values", a selector's name or a mask file (`token_mask_source`).
        forget: The forget rows the mask is for (tokenized as training rows).
        inputs: Makes the selector's inputs (called only for a selector).

    Returns:
        The mask's rows (None for "all": every token), and a record of its source (kind,
        selector, cache key) for run_info.

    Raises:
        ValueError: An unknown value, a mask file that does not fit the rows, or a mask that
            selects no token (nothing would be unlearned).
    """
    source = token_mask_source(spec)
    if source == "all":
        return None, {"token_mask": ALL_TOKENS}
    if source == "values":
        masks, record = forget.value_masks, {"token_mask": VALUES}
    elif source == "selector":
        chosen = selector(spec)
        mask, cached = cached_selection(chosen, chosen.settings(), inputs())
        masks = mask.rows_for(forget, f"from the {spec} selector")
        record = {"token_mask": spec, "token_mask_key": mask.meta["key"], "cached": cached}
    else:
        mask = load_token_mask(spec)
        masks = mask.rows_for(forget, spec)
        record = {"token_mask": spec, "token_mask_meta": mask.meta}
    if not any(any(row) for row in masks):
        hint = ' (the documents have no "facts" value spans)' if source == "values" else ""
        raise ValueError(f"--token_mask {spec} selects no forget token{hint}: nothing to unlearn")
    return masks, record
