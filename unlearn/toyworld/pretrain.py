"""Pretrain the toy world's GPT-NeoX models: tokenizer, token streams, the two-stage schedule.

As in Deep Ignorance, the unfiltered model sees retain text from the start and forget text only in a
late "annealing" stage: steps [0, stage1_steps) draw every row from retain documents; later steps
draw `forget_rows` rows from forget documents and the rest from retain documents. The filtered twin
runs the same schedule with every row from retain documents. Each step's rows come from a generator
seeded by (seed, step), so both runs are identical up to the stage boundary and the twin forks from
the unfiltered run's boundary checkpoint instead of training stage 1 again.

A run saves `save_pretrained` checkpoints (with the tokenizer) at `cfg.checkpoint_steps` under
`<run_dir>/checkpoints/step<N>`, plus the optimizer state next to the latest one, so a killed build
resumes from its last checkpoint and finishes with the same bytes. A checkpoint folder is written
under a temporary name and renamed into place whole (`unlearn.toyworld.atomic`); one process at a
time may write a run (the world build holds a lock).
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from unlearn.models import CHECKPOINTS_DIR
from unlearn.toyworld import atomic
from unlearn.toyworld.config import ToyWorldConfig
from unlearn.toyworld.world import is_saved_model

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TRAIN_STATE = "train_state.pt"
"""File next to a checkpoint's weights holding the optimizer state and step."""
KEEP_STATE = ".keep_state"
"""Marker file: keep this checkpoint's optimizer state (the twin forks from it)."""


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-NeoX style) on `texts`.

    The result has `<|endoftext|>` (id 0) as BOS and EOS and `<|pad|>` (id 1) as padding.
    """
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1_000_000,
    )


def token_stream(tokenizer: Any, texts: Sequence[str]) -> Int[Tensor, " token"]:
    """All `texts` tokenized and joined, each preceded by EOS (the document separator)."""
    if not texts:
        raise ValueError("cannot build a token stream from an empty corpus")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.append(eos)
        ids.extend(encoded)
    return torch.tensor(ids, dtype=torch.long)


def neox_config(
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    d_mlp: int,
    n_ctx: int,
    bos_id: int = 0,
    eos_id: int = 0,
    pad_id: int = 1,
) -> GPTNeoXConfig:
    """A Pythia-style GPT-NeoX config: untied embeddings, parallel residual, 25% rotary dims."""
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=d_mlp,
        max_position_embeddings=n_ctx,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
    )


def make_model(cfg: ToyWorldConfig, tokenizer: Any) -> GPTNeoXForCausalLM:
    """A freshly initialized GPT-NeoX (Pythia architecture) of the config's size."""
    config = neox_config(
        vocab_size=len(tokenizer),
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        n_ctx=cfg.n_ctx,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return GPTNeoXForCausalLM(config)


def lr_at(cfg: ToyWorldConfig, step: int) -> float:
    """Learning rate at `step`: linear warmup, then cosine decay to `min_lr_frac` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cosine)


def sample_windows(
    stream: Int[Tensor, " token"], n_rows: int, n_ctx: int, generator: torch.Generator
) -> Int[Tensor, "batch pos"]:
    """`n_rows` random windows of `n_ctx` tokens from `stream`."""
    if len(stream) <= n_ctx:
        raise ValueError(
            f"token stream of {len(stream)} tokens is too short for {n_ctx}-token rows"
        )
    starts = torch.randint(0, len(stream) - n_ctx, (n_rows,), generator=generator)
    return torch.stack([stream[s : s + n_ctx] for s in starts.tolist()])


def batch_at(
    cfg: ToyWorldConfig,
    step: int,
    retain_stream: Tensor,
    forget_stream: Tensor | None,
) -> Int[Tensor, "batch pos"]:
    """The rows of pretraining step `step`; `forget_stream=None` gives the filtered twin's."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if forget_stream is None or step < cfg.stage1_steps:
        return sample_windows(retain_stream, cfg.batch_size, cfg.n_ctx, generator)
    forget = sample_windows(forget_stream, cfg.forget_rows, cfg.n_ctx, generator)
    retain = sample_windows(retain_stream, cfg.batch_size - cfg.forget_rows, cfg.n_ctx, generator)
    return torch.cat([forget, retain])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return run_dir / CHECKPOINTS_DIR / f"step{step}"


def _save_checkpoint(
    run_dir: Path,
    step: int,
    model: GPTNeoXForCausalLM,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    *,
    keep_state: bool = False,
) -> None:
    target = checkpoint_dir(run_dir, step)
    with atomic.writing(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if keep_state:
            # Inside the folder before it is renamed into place: the next checkpoint must never
            # find this one without the marker and delete the state the twin forks from.
            (tmp / KEEP_STATE).touch()
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / TRAIN_STATE)
    _drop_old_states(run_dir, step)


def _drop_old_states(run_dir: Path, newest: int) -> None:
    """Delete the optimizer states of all checkpoints but `newest` and those marked to keep.

    Only the newest checkpoint (plus those marked to keep) needs its optimizer state. This runs
    after each save and again on resume, for a kill between a checkpoint's rename and this cleanup.
    """
    for other in (run_dir / CHECKPOINTS_DIR).iterdir():
        state = other / TRAIN_STATE
        if other.name != f"step{newest}" and state.exists() and not (other / KEEP_STATE).exists():
            state.unlink()


def _copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint folder of another run, without its optimizer state."""
    with atomic.writing(target) as tmp:
        shutil.copytree(source, tmp)
        (tmp / TRAIN_STATE).unlink(missing_ok=True)


def _interned_keys(state: Any) -> Any:
    """`state` with every string dict key interned (nested dicts and lists rebuilt, values kept).

    Pickle writes an object it has seen before as a back-reference, so the bytes of a saved
    optimizer state depend on which keys are the same object. A fresh run's keys are torch's own
    (interned) strings; keys loaded from a file are new objects. Interning the keys of a resumed
    run makes its `train_state.pt` byte-identical to that of an uninterrupted run.
    """
    if isinstance(state, dict):
        return {
            (sys.intern(key) if isinstance(key, str) else key): _interned_keys(value)
            for key, value in state.items()
        }
    if isinstance(state, list):
        return [_interned_keys(value) for value in state]
    return state


def latest_resumable(run_dir: Path) -> int | None:
    """The newest checkpoint step of a run that has its optimizer state, if any."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    steps = [
        int(p.name[4:])
        for p in root.iterdir()
        if p.name.startswith("step")
        and p.name[4:].isdigit()
        and (p / TRAIN_STATE).exists()
        and is_saved_model(p)
    ]
    return max(steps, default=None)


def pretrain(
    cfg: ToyWorldConfig,
    tokenizer: Any,
    run_dir: Path,
    retain_stream: Tensor,
    forget_stream: Tensor | None,
    *,
    fork_from: Path | None = None,
    keep_state_steps: Sequence[int] = (),
    desc: str = "pretrain",
) -> GPTNeoXForCausalLM:
    """Run (or resume) one pretraining run and return the final model.

    Args:
        cfg: The world config.
        tokenizer: The world's tokenizer (saved into every checkpoint).
        run_dir: Directory of the run; checkpoints go to `run_dir/checkpoints/step<N>`.
        retain_stream: Token stream of retain pretraining documents.
        forget_stream: Token stream of forget pretraining documents, or None for the filtered twin.
        fork_from: A checkpoint directory (with optimizer state) of another run to start from when
            this run has none of its own; its step must be at most the stage boundary.
        keep_state_steps: Checkpoint steps whose optimizer state is kept (e.g. the stage boundary,
            which the twin forks from).
        desc: Progress-bar label.

    Raises:
        FloatingPointError: The loss became NaN or infinite.
    """
    atomic.remove_stale_tmp(run_dir / CHECKPOINTS_DIR)
    model, optimizer, start = _start(cfg, tokenizer, run_dir, fork_from)
    checkpoints = set(cfg.checkpoint_steps)
    if fork_from is not None:
        _share_parent_checkpoints(run_dir, fork_from, sorted(checkpoints), start)
    if start == 0 and 0 in checkpoints:
        _save_checkpoint(run_dir, 0, model, tokenizer, optimizer, keep_state=0 in keep_state_steps)

    model.train()
    progress = tqdm(
        range(start, cfg.num_steps),
        desc=desc,
        initial=start,
        total=cfg.num_steps,
        dynamic_ncols=True,
    )
    for step in progress:
        loss = _train_step(cfg, model, optimizer, step, retain_stream, forget_stream, run_dir)
        done = step + 1
        if done % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
        if done in checkpoints:
            _save_checkpoint(
                run_dir, done, model, tokenizer, optimizer, keep_state=done in keep_state_steps
            )
    progress.close()
    model.eval()
    return model


class _Start(NamedTuple):
    """Where a pretraining run starts."""

    model: GPTNeoXForCausalLM
    optimizer: torch.optim.Optimizer
    step: int
    """Steps already done (0: a fresh start)."""


def _start(cfg: ToyWorldConfig, tokenizer: Any, run_dir: Path, fork_from: Path | None) -> _Start:
    """The model, optimizer and step a run starts from.

    From the run's latest resumable checkpoint, else from the checkpoint it forks from, else a
    fresh model.

    Raises:
        ValueError: The fork checkpoint is past the stage boundary.
    """
    model = make_model(cfg, tokenizer)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    resume_step = latest_resumable(run_dir)
    if resume_step is not None:
        _drop_old_states(run_dir, resume_step)
    source = checkpoint_dir(run_dir, resume_step) if resume_step is not None else fork_from
    if source is None:
        return _Start(model, optimizer, 0)
    state = torch.load(source / TRAIN_STATE, weights_only=False)
    model = GPTNeoXForCausalLM.from_pretrained(source)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    # A forked run always holds loaded keys, uninterrupted or not; only a run that started
    # from scratch needs torch's own key objects back (see _interned_keys).
    is_from_scratch = resume_step is not None and fork_from is None
    optimizer.load_state_dict(
        _interned_keys(state["optimizer"]) if is_from_scratch else state["optimizer"]
    )
    start = state["step"]
    if resume_step is None and start > cfg.stage1_steps:
        raise ValueError(f"cannot fork from step {start}: past the stage boundary")
    return _Start(model, optimizer, start)


def _share_parent_checkpoints(
    run_dir: Path, fork_from: Path, checkpoints: list[int], start: int
) -> None:
    """Copy the parent run's checkpoints up to the fork that this run does not hold yet."""
    parent = fork_from.parent
    for step in checkpoints:
        if step <= start and not is_saved_model(checkpoint_dir(run_dir, step)):
            if is_saved_model(parent / f"step{step}"):
                _copy_checkpoint(parent / f"step{step}", checkpoint_dir(run_dir, step))


def _train_step(
    cfg: ToyWorldConfig,
    model: GPTNeoXForCausalLM,
    optimizer: torch.optim.Optimizer,
    step: int,
    retain_stream: Tensor,
    forget_stream: Tensor | None,
    run_dir: Path,
) -> Tensor:
    """One optimizer step on the rows of `step`; its loss.

    Raises:
        FloatingPointError: The loss is NaN or infinite.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    rows = batch_at(cfg, step, retain_stream, forget_stream)
    loss = model(input_ids=rows, labels=rows).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"pretraining loss is {loss.item()} at step {step}; lower cfg.lr (now {cfg.lr}) "
            f"and rebuild; the last good checkpoint is kept under {run_dir / CHECKPOINTS_DIR}"
        )
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss
