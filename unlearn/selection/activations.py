"""Activation similarity: tokens whose activation points the way the keyword tokens' do.

ALGORITHMS.md section 4.2. At block `layer`'s output (`blocks.{layer}.hook_resid_post`), the
prototype is the normalized mean activation of up to `max_keyword_tokens` keyword tokens (the
keyword selector's mask on the same documents, sampled with `seed`); each token's score is the
cosine similarity of its activation to the prototype. The top `fraction` of tokens is kept, or,
with `threshold`, every token whose cosine reaches it. With `center`, the mean activation over all
forget tokens is subtracted first (from the prototype's tokens and from every token), so the
cosine measures the direction that sets keyword tokens apart rather than the direction every
token's residual stream shares; the reference did not center.

The defaults were chosen on the documents of the forget dev entities (`benchmarks/token_selection.py
--tune`; results in benchmarks/results/token_selection_dev.json), never on test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from unlearn.selection.base import (
    Selection,
    SelectionInputs,
    check_fraction,
    flatten,
    selectable,
    site_activations,
    top_fraction,
    unflatten,
)
from unlearn.selection.keywords import keyword_masks


@dataclass(frozen=True)
class ActivationSettings:
    """Cosine similarity to the keyword tokens' mean activation."""

    layer: int = 0
    """Block whose output is read (negative counts from the end)."""
    fraction: float = 0.1
    """Share of the forget tokens kept (the highest cosines)."""
    threshold: float | None = None
    """Keep every token whose cosine is at least this instead of the top `fraction`."""
    center: bool = True
    """Subtract the mean forget activation before taking cosines."""
    max_keyword_tokens: int = 1000
    """Keyword tokens averaged into the prototype (a random sample when there are more)."""
    seed: int = 42
    """Seed of that sample."""

    def __post_init__(self) -> None:
        check_fraction(self.fraction)
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"--threshold is a cosine, in [-1, 1]; got {self.threshold}")
        if self.max_keyword_tokens < 1:
            raise ValueError(f"--max_keyword_tokens must be >= 1, got {self.max_keyword_tokens}")


def cosine_scores(
    settings: ActivationSettings, inputs: SelectionInputs
) -> tuple[Float[Tensor, " token"], dict]:
    """Every forget token's cosine to the keyword prototype, and the prototype's token count.

    Raises:
        ValueError: No keywords, no keyword token in the documents, or no such block.
    """
    forget = inputs.forget
    assert forget.offsets is not None
    texts = [doc["text"] for doc in inputs.forget_docs]
    keywords = inputs.require_keywords("activations")
    is_keyword = flatten(keyword_masks(texts, forget.offsets, keywords)).bool()
    is_keyword &= selectable(forget)
    positions = is_keyword.nonzero().squeeze(1)
    if len(positions) == 0:
        raise ValueError("no forget token matches a keyword: the prototype would be empty")
    generator = torch.Generator().manual_seed(settings.seed)
    sample = positions[torch.randperm(len(positions), generator=generator)]
    sample = sample[: settings.max_keyword_tokens]
    acts = site_activations(
        inputs.model, forget, settings.layer, inputs.batch_size, desc="activations"
    )
    if settings.center:
        acts = acts - acts.mean(0)
    prototype = torch.nn.functional.normalize(acts[sample].mean(0), dim=0)
    scores = torch.nn.functional.normalize(acts, dim=1) @ prototype
    return scores, {"n_prototype_tokens": len(sample)}


def select(settings: ActivationSettings, inputs: SelectionInputs) -> Selection:
    """Keep the tokens most similar to the keyword prototype."""
    scores, info = cosine_scores(settings, inputs)
    allowed = selectable(inputs.forget)
    if settings.threshold is None:
        keep = top_fraction(scores, settings.fraction, allowed)
        threshold = float(scores[keep].min()) if keep.any() else None
    else:
        keep = (scores >= settings.threshold) & allowed
        threshold = settings.threshold
    quantiles = torch.quantile(scores[allowed], torch.tensor([0.1, 0.5, 0.9])).tolist()
    info |= {"threshold": threshold, "cosine_p10_p50_p90": quantiles}
    lengths = [len(row) for row in inputs.forget.ids]
    return Selection(unflatten(keep, lengths), info)
