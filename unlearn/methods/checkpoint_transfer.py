"""Checkpoint activation transfer: pull forget activations onto a mapped early checkpoint's.

ALGORITHMS.md section 3.4. A teacher checkpoint that is still at chance on the forget domain (chosen
by `unlearn.transfer.select_checkpoint`) reads the same forget batch; its block outputs, mapped into
the final model's basis by per-layer affine maps fitted at that same site (`fit_affine_maps`: ridge
or SVCCA, both stored as `AffineMap`s), are the targets of a masked MSE on the trainable model's
block outputs:
L_f = (1/|L|) Σ_l Σ_{b,s} m_bs · mean_d (A_l(h_l^teacher) − h_l^θ)² / Σ m.
Retain term: KL, NLL or L2 (`retain.py`). Unlike the reference there is no silent fallback: a
missing teacher or map file is an error (an identity map is an explicit choice: `maps_path=None`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interventions import Read
from unlearn.losses import activation_mse_loss
from unlearn.methods.base import FORGET, RAMPS, TRAINABLE, Node, RampName, Term
from unlearn.methods.retain import RetainLoss, retain_component
from unlearn.models import load_model
from unlearn.transfer import load_maps

TEACHER = "teacher"
"""Model name of the teacher checkpoint in the step graph."""


@dataclass
class CheckpointTransferConfig:
    """Checkpoint activation transfer settings."""

    teacher: str | None = None
    """Teacher model (local directory or hub name); the recipe fills it in after selection."""
    teacher_revision: str | None = None
    """Teacher checkpoint name or hub revision (e.g. "step400", "global_step38144")."""
    maps_path: str | None = None
    """Directory of fitted maps (maps.safetensors, ridge or SVCCA); None uses the identity map."""
    layers: list[int] | None = None
    """Target layers (block outputs); None means every layer."""
    retain_loss: RetainLoss = "kl"
    """Retain objective."""
    forget_coef: float = 1.0
    """Peak forget (MSE) coefficient."""
    retain_coef: float = 1.0
    """Peak retain coefficient."""
    forget_ramp: RampName = "forget_decay"
    """Forget coefficient schedule."""
    retain_ramp: RampName = "retain_warmup"
    """Retain coefficient schedule."""
    retain_layers: list[int] | None = None
    """Layers of the L2 retain loss; None means every layer."""


class CheckpointTransfer:
    """Nodes, terms and the teacher model of checkpoint activation transfer."""

    def __init__(
        self, cfg: CheckpointTransferConfig, n_layers: int, device: torch.device | str = "cpu"
    ) -> None:
        """Load the teacher (frozen) and the maps, and declare the reads and terms.

        Raises:
            ValueError: No teacher was given.
            FileNotFoundError: The teacher, its checkpoint or the maps are missing.
        """
        if cfg.teacher is None:
            raise ValueError(
                "checkpoint_transfer needs a teacher checkpoint: pass --teacher and "
                "--teacher_revision, or run python -m recipes.checkpoint_transfer (it selects one)"
            )
        layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
        teacher = load_model(cfg.teacher, revision=cfg.teacher_revision, device=device).hf_model
        self.models = {TEACHER: teacher.eval().requires_grad_(False)}
        maps = load_maps(cfg.maps_path) if cfg.maps_path is not None else None
        if maps is not None:
            maps = {layer: m.to(device) for layer, m in maps.items()}
        if maps is not None and not set(layers) <= set(maps):
            raise ValueError(f"maps at {cfg.maps_path} cover layers {sorted(maps)}, not {layers}")
        site = "blocks.{l}.hook_resid_post"
        nodes: list[Node] = [
            Read("forget_acts", site, layers=layers, model=TRAINABLE, batch=FORGET),
            Read("teacher_acts", site, layers=layers, model=TEACHER, batch=FORGET, grad=False),
        ]

        def forget_term(acts, forget, retain):
            targets = acts["teacher_acts"].to(acts["forget_acts"].device)
            if maps is not None:
                targets = torch.stack(
                    [maps[layer](t) for layer, t in zip(layers, targets, strict=True)]
                )
            return activation_mse_loss(acts["forget_acts"], targets, forget.token_mask)

        retain = retain_component(
            cfg.retain_loss, cfg.retain_layers or "all", cfg.retain_coef, RAMPS[cfg.retain_ramp]
        )
        self.nodes: tuple[Node, ...] = (*nodes, *retain.nodes)
        self.terms: tuple[Term, ...] = (
            Term("forget", forget_term, cfg.forget_coef, RAMPS[cfg.forget_ramp]),
            *retain.terms,
        )
