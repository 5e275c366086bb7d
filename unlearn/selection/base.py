"""What every token selector reads and returns, and the per-token plumbing they share.

A selector turns the forget documents into one boolean per token of the rows that training sees
(`unlearn.data.tokenize_documents`, BOS first): `SelectionInputs` holds the model, the documents,
the forget dev items and the keywords; `Selection` is the mask plus what the selector chose. Scores
and masks are handled flat, one entry per token of every row in order (`flatten`, `unflatten`), so
"the top 15% of tokens" is one `top_fraction` over the whole set, as in the reference. The BOS
separator (a token with an empty character span) is never selected.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from interventions import capture_acts, describe_model, expand_layers
from unlearn.data import TokenizedDocuments, tokenize_documents
from unlearn.keys import settings_key

SITE = "blocks.{layer}.hook_resid_post"
"""Where the activation-based selectors read: the output of a block (`interventions.sites`)."""


@dataclass
class SelectionInputs:
    """Everything a selector may read (never test items)."""

    model: nn.Module
    """The model before unlearning (a Hugging Face causal LM; left as it was)."""
    tokenizer: Any
    """Its tokenizer."""
    forget_docs: list[dict[str, Any]]
    """The documents to mask (the forget documents a run trains on)."""
    retain_docs: list[dict[str, Any]]
    """Retain documents (the probe's and the SAE's other class)."""
    max_len: int
    """Row length of the training rows (`DataConfig.max_len`)."""
    model_key: str
    """Content key of the model (`unlearn.models.model_key`), for the cache."""
    dev_items: list[dict[str, Any]] = field(default_factory=list)
    """Forget dev items (gradient attribution's target); never forget_test items."""
    keywords: list[str] | None = None
    """Keywords of the forget domain (the keyword selector and the activation prototype)."""
    batch_size: int = 64
    """Rows per forward pass."""

    @functools.cached_property
    def forget(self) -> TokenizedDocuments:
        """The forget documents tokenized exactly as training rows."""
        return tokenize_documents(self.tokenizer, self.forget_docs, self.max_len)

    @functools.cached_property
    def retain(self) -> TokenizedDocuments:
        """The retain documents tokenized exactly as training rows."""
        return tokenize_documents(self.tokenizer, self.retain_docs, self.max_len)

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return next(self.model.parameters()).device

    def content_keys(self) -> dict[str, str]:
        """Content keys of every input a selection depends on (the cache's inputs)."""
        return {
            "model": self.model_key,
            "forget": settings_key(self.forget.ids),
            "retain": settings_key(self.retain.ids),
            "dev_items": settings_key(self.dev_items),
            "keywords": settings_key(self.keywords),
        }

    def require_keywords(self, selector: str) -> list[str]:
        """The keywords, for a selector that needs them.

        Raises:
            ValueError: There are none.
        """
        if not self.keywords:
            raise ValueError(
                f"the {selector} selector needs keywords: pass --keywords <file> (one keyword a "
                "line) to python -m recipes.select_tokens, or use the toy world (it has its own)"
            )
        return self.keywords


@dataclass
class Selection:
    """A selector's mask over the forget rows, and what it chose."""

    masks: list[list[bool]]
    """One bool per token of every forget row."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the selector chose or measured (threshold, latents, probe accuracy), JSON-ready."""


@dataclass(frozen=True)
class Selector:
    """A registered token selector (`unlearn.selection.SELECTORS`)."""

    name: str
    """Its name (`--selector`, `--token_mask`)."""
    settings: type
    """Its settings dataclass (flags of `python -m recipes.select_tokens`)."""
    select: Callable[[Any, SelectionInputs], Selection]
    """Make the mask."""
    summary: str
    """One line for listings."""


def flatten(rows: Sequence[Sequence[Any]]) -> Tensor:
    """Per-token values of every row, concatenated in row order."""
    return torch.tensor([value for row in rows for value in row])


def unflatten(flat: Bool[Tensor, " token"], lengths: Sequence[int]) -> list[list[bool]]:
    """Split a flat per-token mask back into rows of the given lengths."""
    return [chunk.tolist() for chunk in torch.split(flat.cpu(), list(lengths))]


def row_lengths(docs: TokenizedDocuments) -> list[int]:
    """Tokens of every row."""
    return [len(row) for row in docs.ids]


def selectable(docs: TokenizedDocuments) -> Bool[Tensor, " token"]:
    """Per token of every row: may a selector mark it (everything but the BOS separator)."""
    if docs.offsets is None:
        return torch.ones(sum(row_lengths(docs)), dtype=torch.bool)
    return flatten([[b > a for a, b in row] for row in docs.offsets]).bool()


def check_fraction(fraction: float, name: str = "fraction") -> None:
    """Raise ValueError unless 0 < fraction <= 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--{name} must be in (0, 1] (a share of the tokens), got {fraction}")


def top_fraction(
    scores: Float[Tensor, " token"], fraction: float, allowed: Bool[Tensor, " token"]
) -> Bool[Tensor, " token"]:
    """The round(fraction · n_tokens) highest-scoring allowed tokens (all allowed ones at most).

    The share is of every token, the unselectable BOS included, so that the fraction a summary
    reports is the one asked for. Ties are broken by position (torch.topk on a stable sort).
    """
    check_fraction(fraction)
    n_keep = min(round(fraction * len(scores)), int(allowed.sum()))
    masked = torch.where(allowed, scores.double(), torch.tensor(float("-inf"), dtype=torch.double))
    order = torch.sort(masked, descending=True, stable=True).indices[:n_keep]
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[order] = True
    return keep


def block_index(model: nn.Module, layer: int) -> int:
    """Block `layer` of the model (negative counts from the end).

    Raises:
        ValueError: No such block.
    """
    n_layers = describe_model(model).n_layers
    try:
        return expand_layers(layer, n_layers)[0]
    except IndexError:
        raise ValueError(
            f"--layer {layer} is not a block of the model: it has {n_layers} blocks, so use "
            f"0..{n_layers - 1} (or -{n_layers}..-1 from the end)"
        ) from None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode without gradients, its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def site_activations(
    model: nn.Module, docs: TokenizedDocuments, layer: int, batch_size: int, desc: str = "acts"
) -> Float[Tensor, "token d_model"]:
    """Block `layer`'s output at every token of every row, flat in row order (float32, CPU).

    Raises:
        ValueError: No such block.
    """
    site = SITE.format(layer=block_index(model, layer))
    device = next(model.parameters()).device
    chunks = []
    with evaluating(model):
        for batch in tqdm(docs.batches(batch_size), desc=desc, dynamic_ncols=True, leave=False):
            acts = capture_acts(model, batch.to(device), site)[site]
            real = batch.attention_mask.bool().to(acts.device)
            chunks.append(acts[real].float().cpu())
    return torch.cat(chunks)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block on one CPU thread, then restore the thread count.

    Trained selectors (the probe, the SAE) run their training loops inside it: a reduction split
    over several threads rounds differently, and training amplifies the difference into another
    mask, so without it a mask would depend on the machine's core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
