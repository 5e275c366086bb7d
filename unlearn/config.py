"""The config groups every recipe shares: which model, which data, how to train.

`ModelConfig` (the toy world by default, or any Hugging Face name or local directory),
`DataConfig` (forget/retain documents and evaluation items; the toy world's by default) and
`TrainingConfig` (steps, optimizer, LoRA, evaluation and saving), and the settings the training
core and the tamper attack take from it (`OptimSettings`, `LoraSettings`, `NonFinitePolicy`).
Recipes nest them as `model`, `data` and `training`; their flags are flat on the command line
(`--lr`, `--batch_size`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NonFinitePolicy = Literal["stop", "skip"]
"""What a step with a NaN or infinite loss or gradient norm does: stop the run with the last
finite state on disk, or skip the step (no update; counted as `skipped_steps`)."""


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer and step settings."""

    lr: float = 3e-4
    """Peak learning rate."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """AdamW, or Muon on 2-D weight matrices with AdamW on the rest."""
    weight_decay: float = 0.0
    """Weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warmup: constant, or decaying to 0 at the last step (linear, cosine)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per rank)."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of the forward passes (weights stay fp32)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number (0 trains nothing), got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(
                f"grad_accum must be >= 1 (micro-batches per step), got {self.grad_accum}"
            )
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(
                "warmup_steps, grad_clip and weight_decay must be >= 0, got "
                f"{self.warmup_steps}, {self.grad_clip}, {self.weight_decay}"
            )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters instead of full fine-tuning."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    """Module names; None means every linear layer of a block (`LORA_TARGETS`)."""


TOYWORLD = "toyworld"
"""`--model` value meaning the toy world's unfiltered model ("toyworld:filtered" for the twin)."""


@dataclass
class ModelConfig:
    """Which model to unlearn."""

    model: str = TOYWORLD
    """"toyworld" (the toy world's unfiltered model), "toyworld:filtered", a Hugging Face name,
    or a local directory written by save_pretrained."""
    revision: str | None = None
    """Hub revision, or checkpoint name of a local directory (e.g. "step400")."""
    world_preset: Literal["default", "tiny"] = "default"
    """Toy-world preset (built on first use)."""
    world_seed: int = 0
    """Toy-world seed."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype when loading (train in float32)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Device of the model."""


@dataclass
class DataConfig:
    """Forget/retain documents and evaluation items."""

    forget_data: str | None = None
    """JSON-lines forget documents ({"text", optional "facts"}); default: the toy world's attack
    split (non-reserved templates)."""
    retain_data: str | None = None
    """JSON-lines retain documents; default: the toy world's retain corpus."""
    eval_items: str | None = None
    """Directory of <split>.jsonl cloze items: forget_dev (tuning), forget_test (reported only),
    retain, optionally forget_attack; default: the toy world's items."""
    eval_template: Literal["reserved", "seen"] = "reserved"
    """Which toy-world template the headline numbers use (the other is reported too)."""
    max_len: int = 128
    """Longest document row in tokens."""
    batch_size: int = 16
    """Forget rows (and retain rows) per optimizer step."""
    use_value_mask: bool = False
    """Apply forget losses only at value tokens (per-token unlearning)."""
    max_forget_docs: int | None = None
    """Use only the first N forget documents."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_len < 2:
            raise ValueError(
                f"--batch_size must be >= 1 and --max_len >= 2, got {self.batch_size}, "
                f"{self.max_len}"
            )
        if self.max_forget_docs is not None and self.max_forget_docs < 1:
            raise ValueError(f"--max_forget_docs must be >= 1, got {self.max_forget_docs}")


@dataclass
class TrainingConfig:
    """Optimization, adapters, evaluation and saving."""

    num_steps: int = 200
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """AdamW, or Muon on 2-D weights with AdamW on the rest."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warmup: constant, or a linear or cosine decay to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of forward passes."""
    lora_rank: int = 0
    """LoRA rank; 0 fine-tunes every weight."""
    lora_alpha: float = 16.0
    """LoRA alpha."""
    eval_every: int = 50
    """Steps between evaluations (0: start and end only)."""
    save_every: int = 50
    """Steps between resumable states."""
    seed: int = 0
    """Seed of data order and random loss targets."""
    on_nonfinite: NonFinitePolicy = "stop"
    """A step with a NaN or infinite loss or gradient norm stops the run, keeping the last finite
    state ("stop"), or is skipped without an update ("skip"; counted as skipped_steps)."""

    def __post_init__(self) -> None:
        counts = {"num_steps": self.num_steps, "grad_accum": self.grad_accum}
        counts["save_every"] = self.save_every
        problems = [
            f"--{name} must be >= 1, got {value}" for name, value in counts.items() if value < 1
        ]
        for name in ("eval_every", "warmup_steps", "lora_rank", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a positive number (0 trains nothing), got {self.lr}")
        if problems:
            raise ValueError("; ".join(problems))

    def optim_settings(self) -> OptimSettings:
        """The optimizer settings `unlearn.training.train` takes."""
        return OptimSettings(
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            grad_clip=self.grad_clip,
            grad_accum=self.grad_accum,
            precision=self.precision,
        )

    def lora_settings(self) -> LoraSettings | None:
        """LoRA settings, or None for full fine-tuning (`lora_rank` 0)."""
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha) if self.lora_rank else None
