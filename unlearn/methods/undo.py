"""UNDO (Unlearn-Noise-Distill-on-Outputs): distill an unlearned model into a noised copy of itself.

Lee et al. 2025, "Distillation Robustifies Unlearning" (arXiv:2506.06278, NeurIPS 2025). Output
matching leaves latent knowledge in place, so it returns under a fine-tuning attack; a student that
starts far from the teacher's weights and only imitates its outputs does not inherit it. UNDO:

1. unlearn with any method: the teacher, `--teacher <run>/model` (required; e.g. the model/ folder
   of a checkpoint-transfer run);
2. noise a copy of it (`noise_weights_`): θ ← (1 − α)θ_teacher + αβN, N Xavier-uniform
   (`torch.nn.init.xavier_uniform_`, gain 1) for every matrix and 0 for every vector, so biases
   and norm gains only shrink by (1 − α); drawn on the CPU from a generator seeded with
   `noise_seed` (default: the run's seed), parameter by parameter in `named_parameters` order;
3. distill the teacher into it (`distill.py`): forward KL(p_teacher ‖ p_θ) at temperature 1 on
   forget text (the attack split, selected tokens) and on retain text, weighted by `forget_coef`
   and `retain_coef`. The trainable model of the step graph is the student; the teacher is a frozen
   extra model ("teacher"). Steps 2 and 3 are this method: the student's starting point is the
   plan's `Phase.init`, which the training core applies before training.

Defaults: β = 0.1 and 400 steps as in a calibration run on the default toy world (the paper
sweeps α, with β about 0.1); forget and retain text weigh the same, constant over training; batch
32. α = 0.3 and lr 3e-3 were chosen on the dev split with the leaderboard's circuit-breakers model
(seed 0) as the teacher (`benchmarks/results/tune_dev_undo.md`, `python -m benchmarks.tune_dev
--methods undo --unlearn_args "--teacher <circuit_breakers run>/model" --grid alpha=0.3,0.6`):
every α = 0.6 run kept less than 90% of the unfiltered model's retain accuracy (69-82%); at α = 0.3,
lr 3e-3: dev forget 26.7%, retain 95.6%, dev excess over the filtered twin at most 2.0 points.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from unlearn.config import DataConfig, ModelConfig, OptimSettings, TrainingConfig
from unlearn.methods.base import ForgetSettings
from unlearn.methods.distill import (
    TEACHER,
    Distillation,
    check_same_parameters,
    copy_weights_,
    load_frozen,
)
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings


@dataclass
class UndoConfig:
    """UNDO settings."""

    teacher: str | None = None
    """The unlearned model to distill (required): a directory written by save_pretrained, such as
    the model/ folder of an unlearning run, or a hub name."""
    alpha: float = 0.3
    """Noise mix α in [0, 1]: θ ← (1 − α)θ_teacher + αβN (0: the student starts as the teacher;
    1: from noise alone)."""
    beta: float = 0.1
    """Scale β of the Xavier-uniform noise N."""
    noise_seed: int | None = None
    """Seed of the noise draw; None uses the run's --seed."""

    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Weight and schedule of the KL to the teacher on forget text."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(retain_loss="kl", retain_ramp="constant")
    )
    """Retain term against the teacher (KL to its logits on retain text by default)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1] (a mixing weight), got {self.alpha}")
        if not self.beta >= 0.0:
            raise ValueError(f"--beta must be >= 0 (a noise scale), got {self.beta}")


def noise_weights_(model: nn.Module, alpha: float, beta: float, seed: int) -> None:
    """θ ← (1 − α)θ + αβN in place: N Xavier-uniform for matrices, 0 for vectors and scalars.

    UNDO's noising step (Lee et al. 2025, "Distillation Robustifies Unlearning"). N is drawn on
    the CPU in float32 from a generator seeded with `seed`, one parameter after another in
    `named_parameters` order (tied weights once), so the draw is the same on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.mul_(1.0 - alpha)
            if param.ndim >= 2:
                noise = torch.empty(param.shape, dtype=torch.float32)
                nn.init.xavier_uniform_(noise, generator=generator)
                param.add_(noise.to(param.device, param.dtype), alpha=alpha * beta)


def start_from_noised_copy(
    model: nn.Module, teacher: nn.Module, alpha: float, beta: float, seed: int
) -> None:
    """Set `model` to the teacher's weights, then noise them (`noise_weights_`): UNDO's student."""
    copy_weights_(model, teacher)
    noise_weights_(model, alpha, beta, seed)


def _require_teacher(cfg: UndoConfig) -> str:
    if cfg.teacher is None:
        raise ValueError(
            "undo distills an unlearned model: pass --teacher <dir>, e.g. the model/ folder of an "
            "unlearning run (python -m recipes.unlearn --method checkpoint_transfer --out runs/ct "
            "writes runs/ct/model)"
        )
    return cfg.teacher


def _inputs(
    cfg: UndoConfig, model_cfg: ModelConfig, data_cfg: DataConfig
) -> dict[str, dict[str, str | None]]:
    return {"models": {"teacher": _require_teacher(cfg)}}


def build(cfg: UndoConfig, ctx: Context) -> Plan:
    """Load the teacher; one phase that starts from its noised copy and distills it.

    Raises:
        ValueError: No teacher, or one whose parameters differ from the model's.
    """
    teacher = load_frozen(_require_teacher(cfg), ctx.device)
    seed = ctx.training.seed if cfg.noise_seed is None else cfg.noise_seed
    check_same_parameters(ctx.model, teacher)  # before evaluating, not when training starts
    init = functools.partial(
        start_from_noised_copy, teacher=teacher, alpha=cfg.alpha, beta=cfg.beta, seed=seed
    )
    method = Distillation(cfg.forget, cfg.retain, TEACHER, TEACHER, {TEACHER: teacher})
    return Plan([Phase(method, ctx.training.num_steps, init=init)], {"undo_noise_seed": seed})


REGISTRATION = Registration(
    name="undo",
    config=UndoConfig,
    build=build,
    summary="UNDO: distill an unlearned teacher (--teacher) into a noised copy of it.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=400, optim=OptimSettings(lr=3e-3)),
    inputs=_inputs,
    standalone=False,
)
