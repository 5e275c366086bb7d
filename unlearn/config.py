"""The config groups every recipe shares: which model, which data, how to train.

`ModelConfig` (the toy world by default, or any Hugging Face name or local directory),
`DataConfig` (forget/retain documents and evaluation items; the toy world's by default) and
`TrainingConfig` (steps, optimizer, LoRA, evaluation and saving), and the settings the training
core and the tamper attack take from it (`OptimSettings`, `LoraSettings`, `NonFinitePolicy`).
Recipes nest them as `model`, `data` and `training`; their flags are flat on the command line
(`--lr`, `--batch_size`), and `replace_flat` sets nested fields by those same flat names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import torch

from unlearn.toyworld.config import WorldPreset

ConfigT = TypeVar("ConfigT")

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
    sam_rho: float = 0.0
    """Sharpness-aware unlearning (Fan et al., ICML 2025): the radius ρ of the weight-space ball
    whose worst point (first order) the forget terms are minimized at; 0 turns it off. Every term
    but "retain" is sharpness-aware, the retain term is not; it costs one more forward pass and
    one more backward pass of the forget terms per micro-batch (`unlearn.training`)."""
    tar_steps: int = 0
    """Tamper-resistant forget terms, TAR-style (Tamirisa et al., ICLR 2025): before each
    micro-batch's forget terms are differentiated, a simulated fine-tuning attack of this many
    AdamW steps (`tar_lr`) on attack-split forget text moves the weights; the forget terms'
    gradient is taken there (first order) and applied to the weights, the "retain" term's at the
    weights themselves. 0 turns it off. Full fine-tuning in one process; costs `tar_steps`
    forward/backward passes of the model and one more of the forget terms (`unlearn.training`)."""
    tar_lr: float = 1e-3
    """Learning rate of the simulated attack (`tar_steps`)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How `torchrun` ranks share a run (ignored in one process): "ddp" keeps the model on every
    rank and all-reduces gradients block by block while the backward pass runs (DDP on FSDP2's
    hooks, `torch.distributed._composable.replicate_with_fsdp`); "fsdp" shards every block,
    then the root, across the ranks (FSDP2 `fully_shard`: weights gathered per block for each
    forward, gradients reduce-scattered, optimizer state sharded), full fine-tuning only. LoRA
    runs keep the model on every rank and average the adapters' gradients after the backward
    pass."""
    activation_checkpointing: bool = False
    """Keep no activations inside the trained model's blocks for the backward pass: each block's
    forward runs again during it (about one more forward pass of the model a step, for the
    activations of one block at a time instead of all). A graph that writes into the trained
    model refuses it (a recomputed block would not replay the write)."""
    shard_companions: bool = False
    """Under "fsdp", shard the frozen companions (the original model a method reads, and its
    further frozen models) across the ranks too, instead of a full copy on every rank."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number (0 trains nothing), got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(
                f"--grad_accum must be >= 1 (micro-batches per step), got {self.grad_accum}"
            )
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(
                "--warmup_steps, --grad_clip and --weight_decay must be >= 0, got "
                f"{self.warmup_steps}, {self.grad_clip}, {self.weight_decay}"
            )
        if not (math.isfinite(self.sam_rho) and self.sam_rho >= 0):
            raise ValueError(
                f"--sam_rho must be >= 0 (0: no sharpness-aware step), got {self.sam_rho}"
            )
        if self.tar_steps < 0 or not (math.isfinite(self.tar_lr) and self.tar_lr > 0):
            raise ValueError(
                f"--tar_steps must be >= 0 (0: no simulated attack) and --tar_lr > 0, got "
                f"{self.tar_steps} and {self.tar_lr}"
            )
        if self.tar_steps > 0 and self.sam_rho > 0:
            raise ValueError(
                "--tar_steps and --sam_rho both choose where the forget terms are differentiated; "
                "set one of them"
            )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters instead of full fine-tuning (`lora_rank` 0: full fine-tuning)."""

    lora_rank: int = 0
    """LoRA rank; 0 fine-tunes every weight."""
    lora_alpha: float = 16.0
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_targets: list[str] | None = None
    """Module names; None means every linear layer of a block (`unlearn.training.LORA_TARGETS`)."""

    def __post_init__(self) -> None:
        if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"--lora_rank must be >= 0 and --lora_dropout in [0, 1), got {self.lora_rank}, "
                f"{self.lora_dropout}"
            )

    @property
    def enabled(self) -> bool:
        """Whether adapters are trained (a positive rank)."""
        return self.lora_rank > 0


ALL_TOKENS = "all"
"""`--token_mask` value of scoring every forget token (no per-token selection)."""
VALUES = "values"
"""`--token_mask` value of the ground truth: the value tokens of the documents' facts."""

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
    world_preset: WorldPreset = "default"
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
    evaluator: Literal["builtin", "lm_eval"] = "builtin"
    """Who scores the items: the built-in scorer (`unlearn.eval`: BOS first, ties share credit)
    or lm-eval in process (`unlearn.lm_eval_scoring`; needs `pip install -e ".[real]"`)."""
    max_len: int = 128
    """Longest document row in tokens."""
    batch_size: int = 16
    """Forget rows (and retain rows) per optimizer step."""
    token_mask: str = ALL_TOKENS
    """Forget tokens the forget losses score (per-token unlearning): "all", every token; "values",
    the value tokens of the documents' facts (the toy world's ground truth); a selector of
    `unlearn.selection` (keywords, activations, probe, sae, attribution), its mask with its default
    settings (computed on the model before unlearning, cached); or a mask file (or the folder
    holding it) that `python -m recipes.select_tokens` wrote. It selects loss positions only and
    never reaches the attention mask."""
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
        if not self.token_mask.strip():
            raise ValueError(
                f"--token_mask is empty: pass {ALL_TOKENS} (every token), {VALUES}, a selector "
                "name or a mask file"
            )


@dataclass
class TrainingConfig:
    """Optimization, adapters, evaluation and saving."""

    num_steps: int = 200
    """Optimizer steps."""
    optim: OptimSettings = field(default_factory=OptimSettings)
    """Optimizer and step settings (flags `--lr`, `--optimizer`, ...)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (flags `--lora_rank`, ...; rank 0 fine-tunes every weight)."""
    eval_every: int = 50
    """Steps between evaluations (0: start and end only)."""
    save_every: int = 50
    """Steps between resumable states."""
    seed: int = 0
    """Seed of data order and random loss targets."""
    on_nonfinite: NonFinitePolicy = "stop"
    """A step with a NaN or infinite loss or gradient norm stops the run, keeping the last finite
    state ("stop"), or is skipped without an update ("skip"; counted as skipped_steps)."""
    count_flops: bool = False
    """Count the FLOPs of preparation and training (`unlearn.compute`; results.json gets
    flops_prepare and flops_train, evaluations excluded). Slows the run; counts only what this
    process ran (a resumed run's count misses the steps before the resume)."""

    def __post_init__(self) -> None:
        problems = [
            f"--{name} must be >= 1, got {value}"
            for name, value in {"num_steps": self.num_steps, "save_every": self.save_every}.items()
            if value < 1
        ]
        if self.eval_every < 0:
            problems.append(f"--eval_every must be >= 0, got {self.eval_every}")
        if problems:
            raise ValueError("; ".join(problems))


def _nested_type(hint: Any) -> type | None:
    """The dataclass a field's type names (directly or in a union), if any."""
    return next(
        (c for c in (hint, *get_args(hint)) if dataclasses.is_dataclass(c)),
        None,  # type: ignore[arg-type]
    )


def flat_values(cfg: Any) -> dict[str, Any]:
    """Every setting of a (nested) config dataclass by its flag name, groups flattened."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        is_group = dataclasses.is_dataclass(value) and not isinstance(value, type)
        values |= flat_values(value) if is_group else {f.name: value}
    return values


def flat_names(cfg: Any) -> set[str]:
    """Every setting name of a (nested) config dataclass, as its command-line flags name them."""
    return set(flat_values(cfg))


def replace_flat(cfg: ConfigT, **values: Any) -> ConfigT:
    """`cfg` with settings replaced by their flat (flag) names, nested groups included.

    `replace_flat(lens_cfg, retain_coef=0.0, layers=[1])` sets `lens_cfg.retain.retain_coef` and
    `lens_cfg.layers`; a whole group can still be replaced by its own name (`retain=...`).

    Raises:
        ValueError: A name that is not a setting of `cfg`; the message lists the settings.
    """
    rest = dict(values)
    changes = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if f.name in rest:
            changes[f.name] = rest.pop(f.name)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            own = {k: rest.pop(k) for k in list(rest) if k in flat_names(value)}
            if own:
                changes[f.name] = replace_flat(value, **own)
    if rest:
        known = ", ".join(sorted(flat_names(cfg)))
        raise ValueError(
            f"{type(cfg).__name__} has no setting {', '.join(sorted(rest))}; its settings: {known}"
        )
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def from_dict(config_cls: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
    """The config that `dataclasses.asdict` made `values` from.

    Nested mappings become config groups, and JSON lists of tuple fields tuples again.
    """
    hints = get_type_hints(config_cls)
    kwargs = {}
    for name, value in values.items():
        nested = _nested_type(hints.get(name))
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value)
        elif isinstance(value, list) and tuple in (get_origin(hints.get(name)), hints.get(name)):
            value = tuple(value)  # JSON has no tuples
        kwargs[name] = value
    return config_cls(**kwargs)
