"""Per-token unlearning: which forget tokens the forget losses score.

Each selector turns the forget documents into one bool per token of the rows training sees
(`unlearn.data.tokenize_documents`); the mask becomes `Batch.token_mask`, the positions every
registered method's forget terms score, and never the attention mask (the reference's orthogonal
circuit breakers passed it as the attention mask, which changed the forward pass itself).

| selector | module | marks |
| --- | --- | --- |
| keywords | `keywords` | tokens overlapping a case-insensitive keyword match |
| activations | `activations` | the top fraction by cosine to the keyword tokens' mean activation |
| probe | `linear_probe` | the top fraction by a logistic forget-vs-retain probe |
| sae | `sae` | tokens where enough forget-specific latents of a TopK SAE fire |
| attribution | `attribution` | the top fraction by first-order influence on the forget dev loss |

Selections are cached on disk, keyed by the selector, its settings, the content of its inputs
and the code version (`cache`); mask files carry the key of the rows they were made for
(`masks`). `registry` names the selectors and resolves a `--token_mask` value ("all", "values",
a selector's name, or a mask file).

Usage:
    >>> inputs = SelectionInputs(model, tokenizer, forget_docs, retain_docs, max_len=128,
    ...                          model_key=key, dev_items=dev, keywords=world.keywords())
    >>> mask, cached = cached_selection(SELECTORS["probe"], ProbeSettings(), inputs)
    >>> mask_quality(mask.rows, inputs.forget.value_masks).precision

`python -m recipes.select_tokens --selector <name>` does the same from the command line and
writes the mask, a summary and a picture; `--token_mask <name|values|path>` on any unlearning
recipe trains with it (`--token_mask all`, the default, scores every token).
"""

from unlearn.selection.activations import ActivationSettings
from unlearn.selection.attribution import AttributionSettings
from unlearn.selection.base import Selection, SelectionInputs, Selector
from unlearn.selection.cache import cache_root, cached_selection, selection_key
from unlearn.selection.keywords import KeywordSettings, keyword_masks, read_keywords
from unlearn.selection.linear_probe import ProbeSettings
from unlearn.selection.masks import (
    MASK_FILE,
    MaskQuality,
    TokenMask,
    documents_key,
    load_token_mask,
    mask_quality,
    save_token_mask,
)
from unlearn.selection.registry import (
    NEEDS_KEYWORDS,
    SELECTORS,
    resolve_token_mask,
    selector,
    token_mask_source,
)
from unlearn.selection.sae import SaeSettings, TopKSAE

__all__ = [
    "MASK_FILE",
    "NEEDS_KEYWORDS",
    "SELECTORS",
    "ActivationSettings",
    "AttributionSettings",
    "KeywordSettings",
    "MaskQuality",
    "ProbeSettings",
    "SaeSettings",
    "Selection",
    "SelectionInputs",
    "Selector",
    "TokenMask",
    "TopKSAE",
    "cache_root",
    "cached_selection",
    "documents_key",
    "keyword_masks",
    "load_token_mask",
    "mask_quality",
    "read_keywords",
    "resolve_token_mask",
    "save_token_mask",
    "selection_key",
    "selector",
    "token_mask_source",
]
