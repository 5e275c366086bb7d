"""Every registered method accepts a forget token mask, which selects loss positions only.

Parametrized over `unlearn.methods.REGISTRY` and the contract suite's settings (`VARIANTS` of
tests/unlearn/test_methods.py, whose helpers build each method exactly as a run does), so a method
registered later is covered without touching this file.

For a mask M that selects some tokens of every forget row:
- the step graph's activations are identical with and without M (the mask never reaches the
  forward pass: it is not an attention mask);
- the gradient of the forget objective (every term but "retain") with respect to every activation
  it reads is zero at each position p where neither M[p] nor M[p + 1] holds (a next-token loss at
  p scores token p + 1), and nonzero somewhere: the loss changes only through selected positions;
- the forget objective with M differs from the one over every token (the mask is used).
"""

import dataclasses

import pytest
import torch

from tests.unlearn.test_methods import (  # noqa: F401  (batches is a fixture)
    VARIANTS,
    _config,
    _forget_objective,
    _wire,
    batches,
)
from unlearn.methods import FORGET, REGISTRY, RETAIN

CASES = [
    pytest.param(name, kwargs, id=f"{name}-{i}")
    for name in REGISTRY
    for i, kwargs in enumerate(VARIANTS.get(name, [{}]))
    # Detractor learning's "detractors" variant trains on retain tokens only; it refuses a mask
    # (tests/unlearn/test_detractor.py).
    if kwargs.get("train_on") != "detractors"
]


def _mask(batch) -> torch.Tensor:
    """Real tokens at positions 1, 4, 7, ...: every row selects some, most tokens are left out."""
    positions = torch.arange(batch.input_ids.shape[1])
    chosen = (positions % 3 == 1)[None].expand_as(batch.attention_mask)
    return chosen & batch.attention_mask.bool()


def _masked(pair: dict) -> dict:
    forget = pair[FORGET]
    mask = _mask(forget)
    assert mask.any(1).all() and (forget.attention_mask.bool() & ~mask).any()
    return {**pair, FORGET: dataclasses.replace(forget, token_mask=mask)}


def _batch_axes(tensor: torch.Tensor, batch_size: int, width: int) -> int | None:
    """The first axis i with shape[i:i + 2] == (batch, pos), if any."""
    shape = tuple(tensor.shape)
    return next((i for i in range(len(shape) - 1) if shape[i : i + 2] == (batch_size, width)), None)


@pytest.mark.parametrize("name, kwargs", CASES)
def test_the_mask_never_changes_the_forward_pass(name, kwargs, tiny_lm, batches, tmp_path):  # noqa: F811
    model, tokenizer = tiny_lm
    cfg = _config(name, kwargs, tmp_path, model, tokenizer)
    _, _, _, step = _wire(model, tokenizer, cfg, name, False, tmp_path)
    with torch.no_grad():
        plain = step(batches)
        masked = step(_masked(batches))
    assert plain.keys() == masked.keys()
    for key, value in plain.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, masked[key]), key


@pytest.mark.parametrize("name, kwargs", CASES)
def test_the_forget_loss_changes_only_through_selected_positions(
    name,
    kwargs,
    tiny_lm,
    batches,  # noqa: F811
    tmp_path,
):
    model, tokenizer = tiny_lm
    cfg = _config(name, kwargs, tmp_path, model, tokenizer)
    method, _, _, step = _wire(model, tokenizer, cfg, name, False, tmp_path)
    masked = _masked(batches)
    forget = masked[FORGET]
    mask = forget.token_mask
    allowed = mask.clone()
    allowed[:, :-1] |= mask[:, 1:]  # a next-token loss at p scores token p + 1

    torch.manual_seed(1)
    acts = step(masked)
    objective = sum(
        term.fn(acts, forget, masked[RETAIN]) for term in method.terms if term.name != "retain"
    )
    read = {
        key: value
        for key, value in acts.items()
        if isinstance(value, torch.Tensor)
        and value.requires_grad
        and not key.startswith(RETAIN)
        and _batch_axes(value, *mask.shape) is not None
    }
    assert read, "the forget terms read no activation with a gradient"
    grads = torch.autograd.grad(objective, list(read.values()), allow_unused=True)
    reached = 0.0
    for (key, value), grad in zip(read.items(), grads, strict=True):
        if grad is None:
            continue
        axis = _batch_axes(value, *mask.shape)
        per_position = grad.abs().movedim((axis, axis + 1), (0, 1)).flatten(2).sum(-1)
        assert float(per_position[~allowed].sum()) == 0.0, key
        reached += float(per_position[allowed].sum())
    assert reached > 0, "no gradient reached a selected position"

    torch.manual_seed(1)
    everywhere = _forget_objective(method, step, batches)
    assert not torch.allclose(objective.detach(), everywhere.detach()), "the mask is ignored"
