"""The toy world's configuration, its presets, and the hash that keys its cache directory.

`ToyWorldConfig` holds everything that decides what a world contains: the corpus, the model size and
the pretraining schedule. Two configs that hash the same build the same world byte for byte (up to
floating-point nondeterminism of the BLAS in use), so a build is cached under its hash and reused.

Presets:
    "default": the world the library reports numbers on (150 + 150 entities, 1,500 facts, a 0.9M
        parameter GPT-NeoX, 800 pretraining steps; a few minutes on 2 CPU cores).
    "mixed": the default world with forget text interleaved through all of pretraining, and rarer
        (6 of 32 rows per step from the first step, against 20 of 32 in the second half), so the
        forget domain is learned later than retain and an early near-chance checkpoint is also
        weaker on retain: rewinding to it costs retain knowledge.
    "tiny": a small world for tests and smoke runs (builds in well under a minute).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

GENERATOR_VERSION = 1
"""Bumped whenever generation or training code changes what a given config builds."""


@dataclass(frozen=True)
class ToyWorldConfig:
    """What a toy world contains and how its models are pretrained."""

    seed: int = 0
    """Seed for everything: entities, facts, documents, items, model init and batch order."""
    n_forget_entities: int = 150
    """Number of fictional pathogens (5 facts each)."""
    n_retain_entities: int = 150
    """Number of fictional people (5 facts each)."""
    attack_frac: float = 0.6
    """Share of pathogens whose post-pretraining documents an attacker (and unlearning) may use."""
    docs_per_entity: int = 40
    """Pretraining documents per entity (all templates)."""
    post_docs_per_entity: int = 40
    """Post-pretraining documents per entity (non-reserved templates only)."""
    min_sentences: int = 2
    """Fewest sentences (facts) in one document."""
    max_sentences: int = 4
    """Most sentences (facts) in one document."""
    val_frac: float = 0.05
    """Share of pretraining documents held back as validation text (LM loss only)."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary size, special tokens included (1,024 makes most values one token,
    which lets the model learn the facts in fewer steps than the pilot's 512)."""
    d_model: int = 128
    """Residual stream width of the GPT-NeoX model."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block."""
    d_mlp: int = 512
    """MLP hidden width."""
    n_ctx: int = 128
    """Context length; pretraining samples windows of this many tokens."""
    num_steps: int = 800
    """Total pretraining steps for both models."""
    stage1_steps: int = 400
    """Steps of the first, retain-only stage; forget documents enter only after it (annealing)."""
    batch_size: int = 32
    """Rows (windows) per pretraining step."""
    forget_rows: int = 20
    """Rows per step drawn from forget documents in stage 2 of the unfiltered run."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    """Linear warmup steps before the cosine decay."""
    min_lr_frac: float = 0.1
    """The cosine schedule ends at this fraction of the peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    first_checkpoint: int = 32
    """Checkpoints are saved at step 0 and at first_checkpoint * 2**k, plus the stage boundary and
    the final step."""

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(
                f"seed must be an int, got {type(self.seed).__name__} {self.seed!r}; "
                "pass e.g. ToyWorldConfig(seed=0)"
            )
        for name in (
            "n_forget_entities",
            "n_retain_entities",
            "docs_per_entity",
            "post_docs_per_entity",
            "min_sentences",
            "num_steps",
            "batch_size",
            "first_checkpoint",
            "vocab_size",
            "n_ctx",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < self.attack_frac < 1:
            raise ValueError(f"attack_frac must be in (0, 1), got {self.attack_frac}")
        n_attack = round(self.n_forget_entities * self.attack_frac)
        if not 1 <= n_attack < self.n_forget_entities:
            raise ValueError(
                f"attack_frac={self.attack_frac} with n_forget_entities={self.n_forget_entities} "
                "leaves an empty attack or held-out split; raise n_forget_entities"
            )
        if not self.min_sentences <= self.max_sentences <= 5:
            raise ValueError(
                "need min_sentences <= max_sentences <= 5 (one sentence per attribute), got "
                f"{self.min_sentences}..{self.max_sentences}"
            )
        if not 0 <= self.stage1_steps < self.num_steps:
            raise ValueError(
                f"stage1_steps ({self.stage1_steps}) must be in [0, num_steps={self.num_steps})"
            )
        if not 0 < self.forget_rows < self.batch_size:
            raise ValueError(
                f"forget_rows ({self.forget_rows}) must be in (0, batch_size={self.batch_size})"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0 <= self.val_frac < 0.5:
            raise ValueError(f"val_frac must be in [0, 0.5), got {self.val_frac}")

    @property
    def n_attack_entities(self) -> int:
        """Pathogens in the attack split; the rest are held out."""
        return round(self.n_forget_entities * self.attack_frac)

    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps at which checkpoints are saved: 0, log-spaced, the stage boundary, the final."""
        steps = {0, self.stage1_steps, self.num_steps}
        n_doublings = int(math.log2(self.num_steps / self.first_checkpoint)) + 1
        steps.update(
            self.first_checkpoint * 2**k
            for k in range(max(n_doublings, 0))
            if self.first_checkpoint * 2**k < self.num_steps
        )
        return sorted(steps)

    def hash(self) -> str:
        """A short hash of the config and the generator version: the cache key of the world."""
        payload = json.dumps({"config": asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


WorldPreset = Literal["default", "mixed", "tiny"]
"""The names of `PRESETS` (the choices of every `--world_preset` flag)."""

PRESETS: dict[str, ToyWorldConfig] = {
    "default": ToyWorldConfig(),
    "mixed": ToyWorldConfig(stage1_steps=0, forget_rows=6),
    "tiny": ToyWorldConfig(
        n_forget_entities=30,
        n_retain_entities=30,
        attack_frac=0.5,
        docs_per_entity=10,
        post_docs_per_entity=6,
        vocab_size=384,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_mlp=64,
        n_ctx=64,
        num_steps=40,
        stage1_steps=16,
        batch_size=8,
        forget_rows=4,
        warmup_steps=4,
        first_checkpoint=8,
    ),
}
"""Named configs; "tiny" is for tests and smoke runs."""
assert set(PRESETS) == set(WorldPreset.__args__)  # type: ignore[attr-defined]


def get_preset(name: str, **overrides: object) -> ToyWorldConfig:
    """A named preset, optionally with fields replaced.

    Args:
        name: A key of `PRESETS`.
        **overrides: Fields to replace, e.g. `seed=1`.

    Raises:
        KeyError: The preset does not exist (the message lists those that do).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown toy-world preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]
