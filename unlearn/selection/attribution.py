"""Gradient attribution: tokens whose training would most lower the loss on forget dev prompts.

ALGORITHMS.md sections 3.7 and 4.5 (the reference used MAGIC through a patched bergson; bergson
2.5.1 is on pypi.org but not in the local index, and needs torchvision, torchaudio, bitsandbytes
and torchopt, so it is not a dependency). First-order influence: a gradient step
θ' = θ − η∇ℓ_t on forget token t's loss ℓ_t changes the dev loss by ≈ −η ∇ℓ_t · ∇L_dev, so token
t scores

    score_t = ∇ℓ_t · g,    g = ∇L_dev,

where ℓ_t = −log p(x_t | x_<t) and L_dev is the mean negative log-likelihood of the true answer's
tokens of the forget **dev** items (prompt + true choice; test items are refused). One backward
pass gives g; every score is then the directional derivative of the per-token losses along g,
taken by a central finite difference with two forward passes per batch:

    score_t ≈ ‖g‖ · (ℓ_t(θ + h ĝ) − ℓ_t(θ − h ĝ)) / 2h,    ĝ = g / ‖g‖,   h = step · ‖θ‖.

(`torch.func.jvp` would be exact, but forward-mode AD of CPU scaled-dot-product attention is not
implemented in torch; at step 1e-3 the difference agrees with a float64 one to a correlation of
1 − 1e-7 on the default toy world.) The weights are never modified: the shifted weights go through
`torch.func.functional_call`. The forget tokens with the highest scores, the top `fraction`, are
kept.

The default fraction was chosen on the documents of the forget dev entities
(`benchmarks/token_selection.py --tune`), never on test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from unlearn.data import Batch, tokenize_documents
from unlearn.eval import TEST_SPLIT
from unlearn.selection.base import (
    Selection,
    SelectionInputs,
    check_fraction,
    evaluating,
    selectable,
    top_fraction,
    unflatten,
)


@dataclass(frozen=True)
class AttributionSettings:
    """First-order influence of each forget token on the forget dev loss."""

    fraction: float = 0.2
    """Share of the forget tokens kept (the highest scores)."""
    step: float = 1e-3
    """Finite-difference step, as a share of the weights' norm."""
    max_dev_items: int | None = None
    """Use only the first N dev items for the dev loss (None: all)."""

    def __post_init__(self) -> None:
        check_fraction(self.fraction)
        if not self.step > 0 or (self.max_dev_items is not None and self.max_dev_items < 1):
            raise ValueError(
                f"need --step > 0 and --max_dev_items >= 1, got {self.step}, {self.max_dev_items}"
            )


def answer_documents(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each item's prompt followed by its true choice, the choice marked as the value span.

    Raises:
        ValueError: No items, or a test item (test items are for final reporting only).
    """
    if not items:
        raise ValueError(
            "gradient attribution needs forget dev items (forget_dev.jsonl under --eval_items)"
        )
    n_test = sum(1 for item in items if item.get("split") == TEST_SPLIT)
    if n_test:
        raise ValueError(
            f"{n_test} {TEST_SPLIT} items were passed as dev items: attribution reads only "
            "forget_dev items"
        )
    docs = []
    for item in items:
        prompt, answer = item["prompt"], item["choices"][item["answer"]]
        text = prompt + answer
        docs.append({"text": text, "facts": [["answer", answer, len(prompt), len(text)]]})
    return docs


def token_losses(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch
) -> Float[Tensor, "batch pos"]:
    """−log p(x_t | x_<t) at every position t ≥ 1 under the weights `params` (0 at t = 0)."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    logits = functional_call(model, dict(params), (), inputs).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)
    picked = logprobs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(-picked, (1, 0))


def dev_gradient(
    model: nn.Module, tokenizer: Any, items: Sequence[Mapping[str, Any]], max_len: int, size: int
) -> dict[str, Tensor]:
    """The dev gradient g = ∇L_dev (mean answer-token NLL of the dev items), by parameter."""
    rows = tokenize_documents(tokenizer, answer_documents(items), max_len)
    n_answer = sum(sum(mask) for mask in rows.value_masks)
    if n_answer == 0:
        raise ValueError("no dev answer token fits in --max_len: raise it")
    rows = rows.with_token_masks(rows.value_masks)  # the answer tokens
    params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    device = next(iter(params.values())).device
    for batch in tqdm(rows.batches(size), desc="dev gradient", dynamic_ncols=True, leave=False):
        batch = batch.to(device)
        with torch.enable_grad():
            loss = (token_losses(model, params, batch) * batch.token_mask).sum() / n_answer
            for name, grad in zip(
                params, torch.autograd.grad(loss, list(params.values())), strict=True
            ):
                grads[name] += grad
    return grads


def attribution_scores(
    settings: AttributionSettings, inputs: SelectionInputs
) -> tuple[Float[Tensor, " token"], dict]:
    """score_t = ∇ℓ_t · ∇L_dev for every forget token (flat, row order), and the norms used."""
    items = inputs.dev_items[: settings.max_dev_items]
    model = inputs.model
    with evaluating(model):
        grad = dev_gradient(model, inputs.tokenizer, items, inputs.max_len, inputs.batch_size)
        params = {name: p.detach() for name, p in model.named_parameters()}
        grad_norm = torch.sqrt(sum(g.double().square().sum() for g in grad.values()))
        weight_norm = torch.sqrt(sum(p.double().square().sum() for p in params.values()))
        h = settings.step * float(weight_norm)
        unit = {name: g / grad_norm.to(g.dtype) for name, g in grad.items()}
        plus = {name: p + h * unit[name] for name, p in params.items()}
        minus = {name: p - h * unit[name] for name, p in params.items()}
        chunks = []
        batches = inputs.forget.batches(inputs.batch_size)
        for batch in tqdm(batches, desc="attribution", dynamic_ncols=True, leave=False):
            batch = batch.to(inputs.device)
            slope = (token_losses(model, plus, batch) - token_losses(model, minus, batch)) / (2 * h)
            chunks.append((slope * float(grad_norm))[batch.attention_mask.bool()].cpu())
    info = {"n_dev_items": len(items), "grad_norm": float(grad_norm), "fd_step": h}
    return torch.cat(chunks), info


def select(settings: AttributionSettings, inputs: SelectionInputs) -> Selection:
    """Keep the top fraction of forget tokens by first-order influence on the dev loss."""
    scores, info = attribution_scores(settings, inputs)
    allowed = selectable(inputs.forget)
    keep = top_fraction(scores, settings.fraction, allowed)
    info["threshold"] = float(scores[keep].min()) if keep.any() else None
    info["positive_share"] = float((scores[allowed] > 0).float().mean())
    return Selection(unflatten(keep, [len(row) for row in inputs.forget.ids]), info)
