"""Multiple-choice accuracy by log-likelihood, as lm-eval scores it, on any loaded causal LM.

An item is a prompt, a list of choices (continuations, each starting with its separating space) and
the index of the true one. Each (prompt, choice) pair is scored by the summed log-probability of the
choice's tokens given the prompt. `acc` picks the highest sum; `acc_norm` divides each sum by the
choice's length in UTF-8 bytes first (lm-eval 0.4's `acc_bytes`; its `acc_norm` divides by
characters, the same for ASCII choices). Ties share credit: an item whose top score is shared by k
choices, the true one among them, counts 1/k, so a model with flat outputs scores chance rather
than whatever the choice order favours (lm-eval gives the first tied choice the item).

Tokenization follows lm-eval: the continuation's tokens are those of `prompt + choice` past the
tokens of `prompt` (when the boundary tokens merge, the choice is tokenized on its own; lm-eval
has no such fallback). One convention differs by default: `prepend_bos=True` puts BOS (or EOS)
before every prompt as a document boundary, while lm-eval's HFLM adds nothing to a non-empty
context beyond what the tokenizer adds; with ``prepend_bos=False`` both score the same tokens
(`unlearn.lm_eval_scoring` runs lm-eval itself and lists every difference). Batches may be padded
on either side; positions come from the attention mask, so left and right padding give the same
scores. The log-probabilities come from
`interventions.choice_logprobs`, which reads the logits through an nnsight trace when the model is
an nnsight wrapper or when ``remote=`` asks for a non-local run (NDIF, a host URL, or nnsight's
``"local"`` simulation; see `interventions.remote`), or calls the module otherwise. Each
continuation's summed log-probability is computed inside the trace, so only one number a sequence
travels back from a remote run, not the logits.

Test items (split "forget_test": held-out entities kept for reporting) are scored only inside
`reporting()`, the context of final reporting; anywhere else `evaluate_mc` refuses them, so a
choice made from scores (a default, a checkpoint, a threshold, early stopping) can never see them.

Usage:
    >>> loaded = load_model("path/to/model")
    >>> results = evaluate_splits(loaded.model, loaded.tokenizer, {"retain": items})
    >>> results["retain"].acc
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interventions import (
    Execution,
    choice_logprobs,
    position_ids_from_mask,
    token_logprobs,
    unwrap,
)
from interventions.remote import as_remote

TIE_ATOL = 1e-5
"""Scores within this many nats of the best count as tied."""

TEST_SPLIT = "forget_test"
"""The "split" value of items kept for final reporting."""

_REPORTING: ContextVar[bool] = ContextVar("reporting", default=False)


class ReportOnlyItemsError(RuntimeError):
    """Test items were about to be scored outside `reporting()`."""


@contextmanager
def reporting() -> Iterator[None]:
    """Final reporting: the only context in which test items may be scored."""
    token = _REPORTING.set(True)
    try:
        yield
    finally:
        _REPORTING.reset(token)


def is_reporting() -> bool:
    """Whether the caller runs inside `reporting()`."""
    return _REPORTING.get()


def check_not_test(items: Sequence[Mapping[str, Any]]) -> None:
    """Refuse to score test items outside `reporting()` (every scorer calls this first).

    Raises:
        ReportOnlyItemsError: `items` holds forget_test items and the caller is not reporting.
    """
    if _REPORTING.get():
        return
    n_test = sum(1 for item in items if item.get("split") == TEST_SPLIT)
    if n_test:
        raise ReportOnlyItemsError(
            f"{n_test} test items ({TEST_SPLIT!r}) would be scored outside final reporting; "
            "tune, select and monitor on the dev split (forget_dev) and score test items only "
            "inside unlearn.eval.reporting()"
        )


@dataclass(frozen=True)
class MCResult:
    """Accuracy of one set of multiple-choice items."""

    acc: float
    """Mean credit by summed log-likelihood (ties share credit)."""
    acc_norm: float
    """Mean credit by log-likelihood per byte of the choice."""
    n: int
    """Number of items."""
    correct: tuple[float, ...]
    """Per-item credit (0, 1, or 1/k for a k-way tie) by summed log-likelihood."""
    correct_norm: tuple[float, ...] = ()
    """Per-item credit by log-likelihood per byte (empty when built without it)."""

    def as_dict(self) -> dict[str, float]:
        """The summary numbers (without the per-item credit)."""
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


def encode_credit(credit: Sequence[float]) -> str:
    """Per-item credit as one character an item: "0", "1", or "k" for a k-way tie (1/k).

    Compact enough to keep every evaluation's items in a results file (for bootstrap intervals).

    Raises:
        ValueError: A credit that is not 0, 1 or 1/k for k in 2..9.
    """
    chars = []
    for value in credit:
        k = 1 if value == 1 else (round(1 / value) if value > 0 else 0)
        if k > 9 or (k and abs(value - 1 / k) > 1e-9):
            raise ValueError(f"credit {value} is not 0, 1 or 1/k for k in 2..9")
        chars.append(str(k))
    return "".join(chars)


def decode_credit(encoded: str) -> list[float]:
    """The per-item credit `encode_credit` wrote."""
    return [0.0 if c == "0" else 1.0 / int(c) for c in encoded]


def _module_device(model: Any) -> torch.device:
    param = next(unwrap(model).parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def target_logprobs(
    model: Any,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    *,
    remote: Execution = False,
) -> Float[Tensor, "batch pos"]:
    """Log-probability of each next token: entry [b, t] is log p(input_ids[b, t+1] | ...).

    The last position has no next token and gets 0. Positions are derived from the mask, so either
    padding side works.

    Args:
        model: An nnsight-wrapped causal LM (read through a trace) or a plain Hugging Face module.
        input_ids: Token ids, padded on either side.
        attention_mask: 1 for real tokens, 0 for padding.
        remote: Where to run (`interventions.remote`); a plain module is wrapped for nnsight.
    """
    return token_logprobs(model, input_ids, attention_mask, remote=remote)


def _encode_pair(
    tokenizer: Any, context: str, continuation: str, bos_id: int | None
) -> tuple[list[int], int]:
    """Token ids of context + continuation and how many trailing ids are the continuation."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_continuation = len(whole_ids) - len(context_ids)
    if n_continuation < 1 or whole_ids[: len(context_ids)] != context_ids:
        # The boundary merged into one token: score the continuation tokenized on its own.
        cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        whole_ids, n_continuation = context_ids + cont_ids, len(cont_ids)
    if n_continuation < 1:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
    prefix = [bos_id] if bos_id is not None else []
    return prefix + whole_ids, n_continuation


def _pad(
    rows: list[list[int]], pad_id: int, side: Literal["left", "right"]
) -> tuple[Tensor, Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def score_continuations(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 256,
    padding_side: Literal["left", "right"] = "right",
    prepend_bos: bool = True,
    remote: Execution = False,
) -> Float[Tensor, " n"]:
    """Summed log-probability of each continuation given its context.

    Args:
        model: An nnsight-wrapped causal LM or a plain Hugging Face module.
        tokenizer: Its tokenizer.
        contexts: Prompts.
        continuations: One continuation per prompt (include the separating space).
        batch_size: Sequences per forward pass.
        padding_side: Where padding goes; scores do not depend on it.
        prepend_bos: Put the tokenizer's BOS token (or EOS, as GPT-NeoX models use one token for
            both) before each context, as a document boundary.
        remote: Where the forward passes run (`interventions.remote`); inputs then stay on the
            CPU, as a hosted model's local copy may have no weights.

    Raises:
        ValueError: The inputs are empty or of different lengths, or a score is not finite.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if not contexts:
        raise ValueError("nothing to score: the data set is empty")
    bos_id = None
    if prepend_bos:
        bos_id = (
            tokenizer.bos_token_id
            if tokenizer.bos_token_id is not None
            else (tokenizer.eos_token_id)
        )
        if bos_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS or EOS token")
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else (tokenizer.eos_token_id or 0)
    )
    encoded = [
        _encode_pair(tokenizer, c, x, bos_id) for c, x in zip(contexts, continuations, strict=True)
    ]
    device = _module_device(model) if as_remote(remote) is None else torch.device("cpu")
    scores = torch.empty(len(encoded), dtype=torch.float64)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = _pad([row for row, _ in chunk], pad_id, padding_side)
        # The continuation's k tokens end at the row's last real token.
        last = mask.shape[1] - 1 if padding_side == "left" else mask.sum(1) - 1
        last = torch.as_tensor(last).expand(len(chunk))
        n_cont = torch.tensor([n for _, n in chunk])
        cols = torch.arange(mask.shape[1])
        in_continuation: Bool[Tensor, "batch pos"] = (cols[None] > (last - n_cont)[:, None]) & (
            cols[None] <= last[:, None]
        )
        # A row's first real token has nothing before it to predict it (no BOS, empty context).
        in_continuation &= position_ids_from_mask(mask) > 0
        chunk_scores = choice_logprobs(
            model, ids.to(device), mask.to(device), in_continuation.to(device), remote=remote
        )
        scores[start : start + len(chunk)] = chunk_scores.cpu()
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"{bad} of {len(scores)} continuation scores are not finite")
    return scores


def _credit(scores: Float[Tensor, "item choice"], answers: Int[Tensor, " item"]) -> Tensor:
    best = scores.max(dim=1, keepdim=True).values
    tied = (scores >= best - TIE_ATOL).double()
    return tied.gather(1, answers[:, None]).squeeze(1) / tied.sum(1)


def evaluate_mc(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 256,
    padding_side: Literal["left", "right"] = "right",
    prepend_bos: bool = True,
    remote: Execution = False,
) -> MCResult:
    """Multiple-choice accuracy of `model` on `items`.

    Args:
        model: An nnsight-wrapped causal LM or a plain Hugging Face module.
        tokenizer: Its tokenizer.
        items: Mappings with "prompt", "choices" (all items the same number) and "answer" (index).
            A `datasets.Dataset` works too.
        batch_size: Sequences per forward pass.
        padding_side: Where padding goes; scores do not depend on it.
        prepend_bos: See `score_continuations`.
        remote: See `score_continuations`.

    Raises:
        ValueError: No items, items with differing numbers of choices, or an answer index out of
            range.
        ReportOnlyItemsError: Test items outside `reporting()`.
    """
    if len(items) == 0:
        raise ValueError(
            "cannot evaluate an empty item set; check the split name and the data path"
        )
    check_not_test(items)
    n_choices = {len(item["choices"]) for item in items}
    if len(n_choices) != 1:
        raise ValueError(f"all items need the same number of choices, found {sorted(n_choices)}")
    (k,) = n_choices
    answers = torch.tensor([int(item["answer"]) for item in items])
    if ((answers < 0) | (answers >= k)).any():
        raise ValueError(f"an answer index is outside [0, {k})")
    contexts = [item["prompt"] for item in items for _ in range(k)]
    continuations = [choice for item in items for choice in item["choices"]]
    scores = score_continuations(
        model,
        tokenizer,
        contexts,
        continuations,
        batch_size=batch_size,
        padding_side=padding_side,
        prepend_bos=prepend_bos,
        remote=remote,
    ).view(-1, k)
    n_bytes = torch.tensor([len(c.encode()) for c in continuations], dtype=torch.float64)
    credit = _credit(scores, answers)
    credit_norm = _credit(scores / n_bytes.view(-1, k), answers)
    return MCResult(
        acc=float(credit.mean()),
        acc_norm=float(credit_norm.mean()),
        n=len(items),
        correct=tuple(credit.tolist()),
        correct_norm=tuple(credit_norm.tolist()),
    )


def evaluate_splits(
    model: Any,
    tokenizer: Any,
    items_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
    **kwargs: Any,
) -> dict[str, MCResult]:
    """`evaluate_mc` on each named split; any failure raises (no default scores)."""
    return {
        split: evaluate_mc(model, tokenizer, items, **kwargs)
        for split, items in items_by_split.items()
    }
