"""Log-probabilities of given tokens under a causal LM, reduced where the model runs.

A multiple-choice evaluator (`unlearn.eval`) scores a choice by the summed log-probability of its
tokens. These functions compute that next to the model: inside the nnsight trace the logits become
log-probabilities, gathered at the next tokens (and summed over the asked-for ones) before anything
is saved. Only a ``[batch pos]`` or ``[batch]`` tensor leaves the trace, never the
``[batch pos d_vocab]`` logits, which matters when the trace runs on NDIF or another host::

    logprobs = token_logprobs(model, input_ids, attention_mask)               # [batch pos]
    scores = choice_logprobs(model, input_ids, attention_mask, target_mask)   # [batch]
    scores = choice_logprobs(model, input_ids, attention_mask, target_mask, remote="local")

A plain torch module run locally is called directly (no trace); an nnsight wrapper, or any model
run remotely (``remote=``, see `interventions.remote`), goes through one trace. Positions are
derived from the attention mask, so left and right padding give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from jaxtyping import Bool, Float, Int
from nnsight import Envoy
from torch import Tensor, nn

from interventions.nnsight_backend import as_envoy, position_ids_from_mask
from interventions.remote import (
    CapturingBackend,
    Execution,
    as_remote,
    make_backend,
    wait_for_result,
)

__all__ = ["choice_logprobs", "token_logprobs"]


def _next_token_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], input_ids: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos"]:
    """Entry [b, t] is log p(input_ids[b, t+1] | ...) in float32; the last position gets 0."""
    targets = input_ids[:, 1:, None].to(logits.device)
    picked = logits[:, :-1].float().log_softmax(-1).gather(-1, targets).squeeze(-1)
    return torch.cat([picked, picked.new_zeros(picked.shape[0], 1)], dim=1)


def _summed_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, " batch"]:
    """Sum, in float64, of the log-probabilities of the tokens where ``target_mask`` is true."""
    logprobs = _next_token_logprobs(logits, input_ids)
    # logprobs[:, t] scores token t + 1, so the mask moves one position left.
    scored = torch.cat([target_mask[:, 1:], target_mask.new_zeros(target_mask.shape[0], 1)], dim=1)
    return torch.where(scored.to(logits.device), logprobs.double(), 0.0).sum(1)


def _reduce_logits(
    model: nn.Module | Envoy,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    reduce: Callable[[Tensor], Tensor],
    remote: Execution,
) -> Tensor:
    """``reduce(logits)`` of one gradient-free forward pass, computed where the model runs."""
    where = as_remote(remote)
    position_ids = position_ids_from_mask(attention_mask)
    with torch.no_grad():
        if where is None and not isinstance(model, Envoy):
            out = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            )
            return reduce(out.logits)
        envoy = as_envoy(model)
        backend = None if where is None else CapturingBackend(make_backend(envoy, where))
        with envoy.trace(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, backend=backend
        ):
            reduced = reduce(envoy.output.logits).save()
        if where is not None:
            # A remote run returns its saved locals by name; a simulated one ran here, like a
            # local trace, and returns nothing.
            result = wait_for_result(cast(CapturingBackend, backend), where)
            reduced = result["reduced"] if result is not None else reduced
    return reduced


def token_logprobs(
    model: nn.Module | Envoy,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    *,
    remote: Execution = False,
) -> Float[Tensor, "batch pos"]:
    """Log-probability of each next token: entry [b, t] is log p(input_ids[b, t+1] | ...).

    Computed in float32 from the logits; the last position has no next token and gets 0.

    Args:
        model: A Hugging Face causal LM, or an nnsight wrapper of one (read through a trace).
        input_ids: Token ids, padded on either side.
        attention_mask: 1 for real tokens, 0 for padding.
        remote: Where to run (`interventions.remote`); a plain module is wrapped for nnsight.

    Returns:
        The log-probabilities, on the model's device (on the CPU after a host run).
    """
    return _reduce_logits(
        model,
        input_ids,
        attention_mask,
        lambda logits: _next_token_logprobs(logits, input_ids),
        remote,
    )


def choice_logprobs(
    model: nn.Module | Envoy,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    *,
    remote: Execution = False,
) -> Float[Tensor, " batch"]:
    """Summed log-probability of the marked tokens of each row, given the tokens before them.

    Row b scores sum over t with ``target_mask[b, t]`` of log p(input_ids[b, t] | input_ids[b, :t]):
    with a row holding a prompt and one choice, and the choice's tokens marked, that is the
    choice's log-likelihood. Each term is the float32 log-softmax of the logits (as
    `token_logprobs`), summed in float64.

    Args:
        model: A Hugging Face causal LM, or an nnsight wrapper of one (read through a trace).
        input_ids: Token ids, padded on either side.
        attention_mask: 1 for real tokens, 0 for padding.
        target_mask: True at the tokens to score; the first position has no prediction, so it
            must be false.
        remote: Where to run (`interventions.remote`); a plain module is wrapped for nnsight.

    Returns:
        One float64 score per row, on the model's device (on the CPU after a host run).

    Raises:
        ValueError: ``target_mask`` is not boolean, has another shape than ``input_ids``, or marks
            a first token.
    """
    if target_mask.dtype != torch.bool or target_mask.shape != input_ids.shape:
        raise ValueError(
            f"target_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}; "
            f"got {target_mask.dtype} {tuple(target_mask.shape)}"
        )
    if bool(target_mask[:, 0].any()):
        raise ValueError("target_mask marks a first token, which nothing before it predicts")
    return _reduce_logits(
        model,
        input_ids,
        attention_mask,
        lambda logits: _summed_logprobs(logits, input_ids, target_mask),
        remote,
    )
