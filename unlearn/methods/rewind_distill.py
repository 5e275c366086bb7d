"""Rewind-and-distill: start again from the latest near-chance checkpoint, distill retain back.

The latest pretraining checkpoint still at chance on the forget domain is an ignorant model that
costs nothing to obtain (the one checkpoint transfer uses as its teacher). Instead of noising an
unlearned model's weights (UNDO, `undo.py`), the student starts from that checkpoint's weights and
is distilled (`distill.py`, forward KL at temperature 1):

- student: the checkpoint (`checkpoint_revision`, or chosen as checkpoint transfer chooses its
  teacher: the latest saved checkpoint of `checkpoint` (default: the model being unlearned) whose
  accuracy on tuning items (attack split and dev, never test) is within `margin` of chance; sweep
  in teacher_sweep/). It becomes the model's weights through the plan's `Phase.init`, so the
  step graph's "base" (the frozen original as training starts) is the checkpoint itself;
- retain term: KL(p_original ‖ p_θ) on every retain token, where the original is a frozen copy of
  the model being unlearned as loaded ("original"; or NLL, L2 or MSE of block outputs against it);
- forget term, on forget text (the attack split) at the positions that predict a selected token
  (`--token_mask`): KL(p_teacher ‖ p_θ) to an unlearned model given as `--teacher` (e.g. the
  model/ folder of an unlearning run); without one, KL(p_checkpoint ‖ p_θ): the student keeps the
  checkpoint's own, ignorant, predictions there.

The original model's outputs on forget text are never distilled, at any position: the simplest
exclusion of forget positions, which gives up whatever the original knows about the context of
forget documents. Defaults: equal, constant weights on the two terms; 400 steps as UNDO's, batch
32; the learning rate, 3.33e-4, was chosen on the dev split (`python -m benchmarks.tune_dev
--methods rewind_distill`, `benchmarks/results/tune_dev_rewind_distill.md`: dev forget 25.3%,
retain 97.3%, dev excess over the filtered twin at most 0.7 points on the default world, whose
step-400 checkpoint keeps 95.5% of retain).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from torch import nn

from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.methods.base import BASE, ForgetSettings
from unlearn.methods.distill import TEACHER, Distillation, copy_weights_, load_frozen
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings

ORIGINAL = "original"
"""Model name of the frozen original (the model being unlearned, as loaded) in the step graph."""


@dataclass
class RewindDistillConfig:
    """Rewind-and-distill settings."""

    checkpoint: str | None = None
    """Model whose training checkpoints the student rewinds to (local directory or hub name);
    default: the model being unlearned."""
    checkpoint_revision: str | None = None
    """Checkpoint the student starts from (e.g. "step400"); None sweeps `checkpoint_revisions`
    and selects the latest one near chance."""
    checkpoint_revisions: list[str] | None = None
    """Checkpoints to sweep, oldest first (default: every saved checkpoint but the last; a hub
    model needs them listed)."""
    chance: float = 0.25
    """Chance accuracy of the forget items."""
    margin: float = 0.05
    """The student starts from the latest checkpoint with forget accuracy <= chance + margin."""
    teacher: str | None = None
    """An unlearned model whose outputs on forget text the student learns (e.g. the model/ folder
    of an unlearning run); None: the forget term keeps the checkpoint's own outputs there."""

    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Weight and schedule of the KL on forget text (to --teacher, or to the checkpoint)."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(retain_loss="kl", retain_ramp="constant")
    )
    """Retain term against the original model (KL to its logits on retain text by default)."""


def start_from_checkpoint(model: nn.Module, source: str, revision: str | None, device: str) -> None:
    """Set `model` to the weights of checkpoint `revision` of `source` (loaded when called)."""
    copy_weights_(model, load_frozen(source, device, revision))


def build(cfg: RewindDistillConfig, ctx: Context) -> Plan:
    """Choose the checkpoint; one phase that starts from it and distills the original into it."""
    selection = SimpleNamespace(
        teacher=cfg.checkpoint,
        teacher_revision=cfg.checkpoint_revision,
        teacher_revisions=cfg.checkpoint_revisions,
        chance=cfg.chance,
        margin=cfg.margin,
    )
    choice, _ = ctx.choose_teacher(selection, score_retain=True)
    info: dict[str, Any] = {"rewind_checkpoint": choice.revision}
    if choice.score is not None:  # swept: how ignorant, and how weak on retain, the start is
        info["rewind_checkpoint_forget_acc"] = choice.score.forget_acc
        info["rewind_checkpoint_retain_acc"] = choice.score.retain_acc
    # A frozen copy: the phase overwrites the model's own weights with the checkpoint's.
    models = {ORIGINAL: copy.deepcopy(ctx.model)}
    forget_teacher = BASE
    if cfg.teacher is not None:
        models[TEACHER] = load_frozen(cfg.teacher, ctx.device)
        forget_teacher = TEACHER
    init = functools.partial(
        start_from_checkpoint, source=choice.source, revision=choice.revision, device=ctx.device
    )
    method = Distillation(cfg.forget, cfg.retain, forget_teacher, ORIGINAL, models)
    return Plan([Phase(method, ctx.training.num_steps, init=init)], info)


REGISTRATION = Registration(
    name="rewind_distill",
    config=RewindDistillConfig,
    build=build,
    summary="Rewind-and-distill: start from the near-chance checkpoint, distill retain text back.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=400, optim=OptimSettings(lr=3.33e-4)),
    inputs=lambda cfg, model_cfg, data_cfg: {
        "models": {"checkpoint": cfg.checkpoint, "teacher": cfg.teacher}
    },
)
