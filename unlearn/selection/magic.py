"""Exact per-token attribution (MAGIC): metagradients of an eval loss through a training run.

Ilyas & Engstrom 2025, "MAGIC: Near-Optimal Data Attribution for Deep Learning" (ALGORITHMS.md
sections 3.7 and 4.5). A copy of the model trains for T steps of SGD with momentum on candidate
rows (forget attack text and retain text, tokenized as training rows), every token's loss
weighted by w_i (all 1):

    L_t(θ, w) = Σ_{i ∈ B_t} w_i ℓ_i(θ) / n_t,    g_t = ∇_θ L_t(θ_t, w),
    m_{t+1} = μ m_t + g_t,    θ_{t+1} = θ_t − η m_{t+1},    m_0 = 0,

with ℓ_i = −log p(x_i | x_<i) and n_t the number of scored tokens of step t's batches (a count,
not Σ w, so L_t is linear in w). At the end each target loss E(θ_T) is evaluated (the mean
answer-token NLL of the forget **dev** items, and of the retain items: `answer_rows`) and its
gradient walked back through the trajectory (reverse-mode over the optimizer, as in the paper):
with adjoints ā_θ = ∇E(θ_T), ā_m = 0, for t = T−1 … 0,

    u = ā_m − η ā_θ                      (the adjoint of m_{t+1}),
    ā_θ ← ā_θ + ∇²_θ L_t(θ_t, w) u,       ā_m ← μ u,       dE/dw_i += ∂(g_t · u)/∂w_i,

so each step costs one forward pass, one backward pass with `create_graph=True` and one double
backward (a Hessian-vector product and the weights' gradient in the same call), once per target.
Without momentum (μ = 0) this is ā_θ ← ā_θ − η ∇²L_t ā_θ, ā_w += −η ∂(∇L_t · ā_θ)/∂w. The score
of token i is dE/dw_i: positive when training on the token raises the target loss (a "detractor"
of the forget domain, the reference's sign convention), negative when it lowers it.

The states θ_t, m_t are kept every `magic_checkpoint_every` steps (default ⌈√T⌉); on the way back
each segment's states are recomputed from its checkpoint, so memory holds O(√T) states for about
one extra forward-backward per step. The run is deterministic: the batch order comes from
`unlearn.data.PairedBatches` with a fixed seed, and the copy runs in eval mode (no dropout).
Attention runs on PyTorch's math kernel (`sdpa_kernel(SDPBackend.MATH)`): the fused CPU and CUDA
kernels have no double backward, and transformers' eager attention takes its softmax in float32,
which would spoil float64 checks.

Why plain SGD (with momentum) and not Adam: Adam's update divides by √v, so its reverse pass needs
the adjoints of both moments and the derivative of the normalization, and near v ≈ 0 the update
is badly conditioned; the metagradient through SGD is exact, cheap, and checkable by finite
differences (`tests/unlearn/test_magic.py`), which is the point on the toy world. Why not
`bergson`'s MAGIC module: bergson 2.5.1 requires torchvision>=0.20 and torchaudio>=2.5
(Requires-Dist), which would pull other torch builds next to the project's CPU torch.

Usage:
    >>> forget = tokenize_documents(tokenizer, world.corpus("forget_attack"), max_len=128)
    >>> retain = tokenize_documents(tokenizer, world.corpus("retain"), max_len=128)
    >>> targets = {"forget_dev": answer_rows(tokenizer, dev_items, 128)}
    >>> result = metagradients(model, forget, retain, targets, MagicSettings())
    >>> result.scores["forget_dev"][: result.n_forget_tokens]   # forget tokens, row order
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from unlearn.data import Batch, PairedBatches, TokenizedDocuments, tokenize_documents
from unlearn.losses import TokenMask, next_token_logprobs, next_token_mask
from unlearn.selection.attribution import answer_documents

Params = dict[str, Tensor]
"""Parameters by name (what `torch.func.functional_call` takes)."""


@dataclass(frozen=True)
class MagicSettings:
    """The attributed training run (flags are prefixed: a method nests these next to its own)."""

    magic_steps: int | None = None
    """SGD steps of the run; None: one epoch of the larger candidate set."""
    magic_batch_size: int = 8
    """Forget rows and retain rows per step (each)."""
    magic_lr: float = 0.01
    """SGD learning rate η."""
    magic_momentum: float = 0.9
    """Momentum μ (0: plain SGD)."""
    magic_seed: int = 0
    """Seed of the batch order."""
    magic_checkpoint_every: int | None = None
    """Keep the optimizer state every k steps and recompute the rest on the way back (1: keep
    every step); None: ⌈√T⌉."""
    magic_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the run (float64 for finite-difference checks)."""

    def __post_init__(self) -> None:
        bad = [
            name
            for name in ("magic_steps", "magic_checkpoint_every")
            if getattr(self, name) is not None and getattr(self, name) < 1
        ]
        if bad or self.magic_batch_size < 1:
            raise ValueError(f"--{', --'.join(bad) or 'magic_batch_size'} must be >= 1")
        if not (math.isfinite(self.magic_lr) and self.magic_lr > 0):
            raise ValueError(f"--magic_lr must be > 0, got {self.magic_lr}")
        if not 0 <= self.magic_momentum < 1:
            raise ValueError(f"--magic_momentum must be in [0, 1), got {self.magic_momentum}")

    def num_steps(self, forget: TokenizedDocuments, retain: TokenizedDocuments) -> int:
        """T: the steps asked for, or one epoch of the larger candidate set."""
        if self.magic_steps is not None:
            return self.magic_steps
        return math.ceil(max(len(forget), len(retain)) / self.magic_batch_size)

    def checkpoint_every(self, num_steps: int) -> int:
        """k: steps between kept optimizer states."""
        return self.magic_checkpoint_every or math.ceil(math.sqrt(num_steps))


@dataclass
class MagicResult:
    """Metagradients of every target loss with respect to every candidate token's weight."""

    scores: dict[str, Float[Tensor, " token"]]
    """Per target: dE/dw_i for every token of the forget rows, then of the retain rows (row
    order, BOS included: its score is 0, it is never scored). Float64, CPU."""
    losses: dict[str, float]
    """Per target: E(θ_T), the loss after the run."""
    initial_losses: dict[str, float]
    """Per target: E(θ_0), the loss before the run."""
    n_forget_tokens: int
    """Tokens of the forget rows (the first entries of each score vector)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Steps, checkpoint spacing, states kept, seconds of each pass (JSON-ready)."""

    def forget_scores(self, target: str) -> Float[Tensor, " token"]:
        """The target's scores of the forget rows' tokens."""
        return self.scores[target][: self.n_forget_tokens]

    def retain_scores(self, target: str) -> Float[Tensor, " token"]:
        """The target's scores of the retain rows' tokens."""
        return self.scores[target][self.n_forget_tokens :]


def answer_rows(
    tokenizer: Any, items: Sequence[Mapping[str, Any]], max_len: int
) -> TokenizedDocuments:
    """Items as target rows: prompt + true choice, the choice's tokens as the token mask.

    Raises:
        ValueError: No items, a test item, or no answer token within `max_len`.
    """
    rows = tokenize_documents(tokenizer, answer_documents(items), max_len)
    if not any(any(mask) for mask in rows.value_masks):
        raise ValueError("no answer token of the target items fits in --max_len: raise it")
    return rows.with_token_masks(rows.value_masks)


def weighted_nll_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    weights: Float[Tensor, "batch pos"],
    mask: TokenMask,
    n_scored: int | None = None,
) -> Float[Tensor, ""]:
    """Per-token weighted next-token NLL: Σ_{t∈T} w_t (−log p(x_t | x_<t)) / n, T = scored tokens.

    The denominator is a count (`n_scored`, default |T|), never Σ w, so the loss is linear in the
    weights and a negative weight is gradient ascent on its token. The reference's
    `weighted_causal_lm_ce` (`unlearn/magic/attribution_unlearn.py`, ALGORITHMS.md section 3.7)
    weighted the per-token cross-entropy the same way.

    Raises:
        ValueError: The mask scores no token.
    """
    scored = next_token_mask(mask)
    count = int(scored.sum()) if n_scored is None else n_scored
    if count == 0:
        raise ValueError("the token mask scores no token: nothing to weight")
    logprobs = next_token_logprobs(logits, tokens, mask)
    return -(weights.to(logprobs.dtype) * logprobs).sum() / count


def _logits(model: nn.Module, params: Params, batch: Batch) -> Float[Tensor, "batch pos d_vocab"]:
    """The model's logits on a batch under the weights `params`."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with sdpa_kernel(SDPBackend.MATH):  # the only attention kernel with a double backward
        return functional_call(model, params, (), inputs).logits


def _real(docs: TokenizedDocuments, width: int) -> Bool[Tensor, "row pos"]:
    """Which positions of a [row, width] table hold a token."""
    lengths = torch.tensor([len(row) for row in docs.ids])
    return torch.arange(width)[None, :] < lengths[:, None]


class _Tables:
    """Per-token weights (or scores) of the forget and retain rows as padded [row, pos] tables."""

    def __init__(self, forget: TokenizedDocuments, retain: TokenizedDocuments) -> None:
        self.width = max(len(row) for docs in (forget, retain) for row in docs.ids)
        self.real = (_real(forget, self.width), _real(retain, self.width))
        self.n_forget = int(self.real[0].sum())

    def tables(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Flat values (forget tokens, then retain tokens) as the two tables (0 at padding)."""
        out = []
        for real, part in zip(
            self.real, (flat[: self.n_forget], flat[self.n_forget :]), strict=True
        ):
            table = torch.zeros(real.shape, dtype=flat.dtype)
            table[real] = part
            out.append(table)
        return out[0], out[1]

    def flat(self, forget: Tensor, retain: Tensor) -> Tensor:
        """The two tables' real entries, forget rows first, in row order."""
        return torch.cat([forget.cpu()[self.real[0]], retain.cpu()[self.real[1]]])


def _gather(table: Tensor, batch: Batch) -> Tensor:
    """The table's rows of a batch, cut to its width, as a fresh leaf tensor."""
    assert batch.rows is not None
    return table[batch.rows.to(table.device), : batch.input_ids.shape[1]].clone()


def _scatter_(table: Tensor, batch: Batch, values: Tensor) -> None:
    """Add a batch's per-token values into its rows of the table (rows may repeat)."""
    assert batch.rows is not None
    rows, width = batch.rows.to(table.device), values.shape[1]
    index = (
        rows[:, None].expand(-1, width),
        torch.arange(width, device=table.device).expand(len(rows), -1),
    )
    table.index_put_(index, values.to(table.dtype), accumulate=True)


class _Run:
    """The attributed run: a frozen copy of the model, the data, the schedule, the step loss."""

    def __init__(
        self,
        model: nn.Module,
        forget: TokenizedDocuments,
        retain: TokenizedDocuments,
        settings: MagicSettings,
    ) -> None:
        dtype = getattr(torch, settings.magic_dtype)
        self.model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.model.set_attn_implementation("sdpa")
        self.device = next(self.model.parameters()).device
        self.theta0 = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.settings = settings
        self.num_steps = settings.num_steps(forget, retain)
        self.batches = PairedBatches(forget, retain, settings.magic_batch_size, settings.magic_seed)
        self.layout = _Tables(forget, retain)
        self._at: dict[int, tuple[Batch, Batch]] = {}

    def step_batches(self, step: int) -> tuple[Batch, Batch]:
        """Step `step`'s forget and retain batches, on the run's device."""
        if step not in self._at:
            forget_batch, retain_batch = self.batches.at(step)
            self._at[step] = (forget_batch.to(self.device), retain_batch.to(self.device))
        return self._at[step]

    def loss(self, params: Params, step: int, weights: tuple[Tensor, Tensor]) -> Float[Tensor, ""]:
        """L_t(θ, w): step `step`'s weighted NLL over its forget and retain rows together."""
        batches = self.step_batches(step)
        n_scored = sum(int(next_token_mask(batch.token_mask).sum()) for batch in batches)
        return sum(
            weighted_nll_loss(
                _logits(self.model, params, batch), batch.input_ids, w, batch.token_mask, n_scored
            )
            for batch, w in zip(batches, weights, strict=True)
        )  # type: ignore[return-value]

    def step_weights(self, tables: tuple[Tensor, Tensor], step: int) -> tuple[Tensor, Tensor]:
        """The weights of step `step`'s tokens, as fresh leaves shaped like its batches."""
        forget_batch, retain_batch = self.step_batches(step)
        return _gather(tables[0], forget_batch), _gather(tables[1], retain_batch)

    def advance(
        self, theta: Params, momentum: Params, step: int, tables: tuple[Tensor, Tensor]
    ) -> tuple[Params, Params]:
        """One SGD-with-momentum step (new tensors; the inputs are kept as they are)."""
        leaves = {name: p.detach().requires_grad_(True) for name, p in theta.items()}
        with torch.enable_grad():
            loss = self.loss(leaves, step, self.step_weights(tables, step))
            grads = torch.autograd.grad(loss, list(leaves.values()))
        mu, lr = self.settings.magic_momentum, self.settings.magic_lr
        momentum = {n: mu * momentum[n] + g for n, g in zip(theta, grads, strict=True)}
        theta = {n: theta[n] - lr * momentum[n] for n in theta}
        return theta, momentum

    def trajectory(
        self,
        tables: tuple[Tensor, Tensor],
        start: int = 0,
        state: tuple[Params, Params] | None = None,
    ) -> Iterator[tuple[int, Params, Params]]:
        """(t, θ_t, m_t) for t = start … T (θ_0, m_0 = 0 unless a state at `start` is given)."""
        theta, momentum = state or (
            self.theta0,
            {n: torch.zeros_like(p) for n, p in self.theta0.items()},
        )
        yield start, theta, momentum
        for step in range(start, self.num_steps):
            theta, momentum = self.advance(theta, momentum, step, tables)
            yield step + 1, theta, momentum


def _target_loss(
    model: nn.Module, params: Params, rows: TokenizedDocuments, size: int = 64
) -> Float[Tensor, ""]:
    """E(θ): the mean NLL of the rows' masked (answer) tokens."""
    device = next(iter(params.values())).device
    batches = [batch.to(device) for batch in rows.batches(size)]
    n_scored = sum(int(next_token_mask(batch.token_mask).sum()) for batch in batches)
    return sum(
        weighted_nll_loss(
            _logits(model, params, batch),
            batch.input_ids,
            batch.token_mask.float(),
            batch.token_mask,
            n_scored,
        )
        for batch in batches
    )  # type: ignore[return-value]


def _target_losses(
    run: _Run, params: Params, targets: Mapping[str, TokenizedDocuments]
) -> dict[str, float]:
    """Every target's loss at `params` (no gradient)."""
    with torch.no_grad():
        return {
            name: float(_target_loss(run.model, params, rows)) for name, rows in targets.items()
        }


def _weight_tables(run: _Run, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    n_tokens = run.layout.n_forget + int(run.layout.real[1].sum())
    flat = torch.ones(n_tokens, dtype=run.theta0[next(iter(run.theta0))].dtype)
    if weights is not None:
        if weights.shape != (n_tokens,):
            raise ValueError(
                f"need one weight per candidate token ({n_tokens}), got {tuple(weights.shape)}"
            )
        flat = weights.to(flat.dtype)
    return tuple(t.to(run.device) for t in run.layout.tables(flat))  # type: ignore[return-value]


def retrained_losses(
    model: nn.Module,
    forget: TokenizedDocuments,
    retain: TokenizedDocuments,
    targets: Mapping[str, TokenizedDocuments],
    settings: MagicSettings,
    weights: Float[Tensor, " token"] | None = None,
) -> dict[str, float]:
    """Rerun the attributed training with per-token weights (None: all 1); the targets' losses.

    `weights` has one entry per token of the forget rows, then of the retain rows, as
    `MagicResult.scores`; 0 drops a token. The model is left as it was.
    """
    run = _Run(model, forget, retain, settings)
    tables = _weight_tables(run, weights)
    *_, (_, theta, _) = run.trajectory(tables)
    return _target_losses(run, theta, targets)


def first_order_coefficients(
    forget: TokenizedDocuments, retain: TokenizedDocuments, settings: MagicSettings
) -> Float[Tensor, " token"]:
    """c_i: how much of token i's gradient the run adds up, to first order around θ_0.

    With m_0 = 0, θ_T = θ_0 − η Σ_s (1 − μ^{T−s}) / (1 − μ) · g_s, and g_s sums w_i ∇ℓ_i / n_s
    over step s's tokens; with every g_s taken at θ_0, dE/dw_i ≈ −c_i ∇ℓ_i · ∇E(θ_0), where

        c_i = Σ_{s : i ∈ B_s} η (1 − μ^{T−s}) / ((1 − μ) n_s),

    so the first-order influence score of `unlearn.selection.attribution` (∇ℓ_i · ∇E) times −c_i
    is the first-order estimate of the metagradient, in its units. Flat, as `MagicResult.scores`.
    """
    num_steps = settings.num_steps(forget, retain)
    batches = PairedBatches(forget, retain, settings.magic_batch_size, settings.magic_seed)
    layout = _Tables(forget, retain)
    tables = (torch.zeros(layout.real[0].shape), torch.zeros(layout.real[1].shape))
    lr, mu = settings.magic_lr, settings.magic_momentum
    for step in range(num_steps):
        pair = batches.at(step)
        n_scored = sum(int(next_token_mask(batch.token_mask).sum()) for batch in pair)
        coef = lr * (1 - mu ** (num_steps - step)) / ((1 - mu) * n_scored)
        for table, batch in zip(tables, pair, strict=True):
            _scatter_(table, batch, coef * next_token_mask(batch.token_mask).float())
    return layout.flat(*tables).double()


def metagradients(
    model: nn.Module,
    forget: TokenizedDocuments,
    retain: TokenizedDocuments,
    targets: Mapping[str, TokenizedDocuments],
    settings: MagicSettings,
) -> MagicResult:
    """dE/dw for every candidate token and every target loss E, by reverse mode through training.

    Args:
        model: The model to attribute (left as it was).
        forget: Forget rows (tokenized as training rows).
        retain: Retain rows.
        targets: Target rows by name, their token masks on the tokens E scores (`answer_rows`).
        settings: The run.

    Raises:
        ValueError: No target.
    """
    if not targets:
        raise ValueError("metagradients need at least one target (e.g. the forget dev items)")
    run = _Run(model, forget, retain, settings)
    tables = _weight_tables(run, None)
    every = settings.checkpoint_every(run.num_steps)
    start = time.perf_counter()
    kept: dict[int, tuple[Params, Params]] = {}
    for step, theta, momentum in run.trajectory(tables):
        if step % every == 0 and step < run.num_steps:
            kept[step] = (theta, momentum)
    forward_seconds = time.perf_counter() - start

    adjoints, initial, final = {}, _target_losses(run, run.theta0, targets), {}
    leaves = {name: p.detach().requires_grad_(True) for name, p in theta.items()}
    for name, rows in targets.items():
        with torch.enable_grad():
            loss = _target_loss(run.model, leaves, rows)
            adjoints[name] = dict(
                zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True)
            )
        final[name] = float(loss.detach())
    momenta = {name: {n: torch.zeros_like(p) for n, p in theta.items()} for name in targets}
    scores = {name: (torch.zeros_like(tables[0]), torch.zeros_like(tables[1])) for name in targets}

    start = time.perf_counter()
    for seg_start in sorted(kept, reverse=True):
        seg_end = min(seg_start + every, run.num_steps)
        segment = run.trajectory(tables, seg_start, kept[seg_start])
        states = [theta for _, theta, _ in itertools.islice(segment, seg_end - seg_start)]
        for step in range(seg_end - 1, seg_start - 1, -1):
            _reverse_step(run, states[step - seg_start], step, tables, adjoints, momenta, scores)
        del states
    backward_seconds = time.perf_counter() - start

    n_params = sum(p.numel() for p in run.theta0.values())
    info = {
        "num_steps": run.num_steps,
        "checkpoint_every": every,
        "states_kept": len(kept) + every,
        "n_params": n_params,
        "bytes_per_state": 2 * n_params * run.theta0[next(iter(run.theta0))].element_size(),
        "forward_seconds": forward_seconds,
        "backward_seconds": backward_seconds,
        "seconds_per_step": (forward_seconds + backward_seconds) / run.num_steps,
    }
    flat = {name: run.layout.flat(*pair).double() for name, pair in scores.items()}
    return MagicResult(flat, final, initial, run.layout.n_forget, info)


def _reverse_step(
    run: _Run,
    theta: Params,
    step: int,
    tables: tuple[Tensor, Tensor],
    adjoints: dict[str, Params],
    momenta: dict[str, Params],
    scores: dict[str, tuple[Tensor, Tensor]],
) -> None:
    """Walk every target's adjoints back over step `step`, adding its weights' gradient."""
    lr, mu = run.settings.magic_lr, run.settings.magic_momentum
    leaves = {name: p.detach().requires_grad_(True) for name, p in theta.items()}
    weights = tuple(w.requires_grad_(True) for w in run.step_weights(tables, step))
    batches = run.step_batches(step)
    with torch.enable_grad():
        loss = run.loss(leaves, step, weights)  # type: ignore[arg-type]
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        for i, name in enumerate(adjoints):
            u = {n: momenta[name][n] - lr * adjoints[name][n] for n in leaves}
            dot = sum((g * u[n]).sum() for g, n in zip(grads, leaves, strict=True))
            *hvp, d_forget, d_retain = torch.autograd.grad(
                dot, [*leaves.values(), *weights], retain_graph=i < len(adjoints) - 1
            )
            adjoints[name] = {n: adjoints[name][n] + h for n, h in zip(leaves, hvp, strict=True)}
            momenta[name] = {n: mu * u[n] for n in leaves}
            _scatter_(scores[name][0], batches[0], d_forget)
            _scatter_(scores[name][1], batches[1], d_retain)
