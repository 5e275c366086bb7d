"""Checkpoint activation transfer: pull forget activations onto a mapped early checkpoint's.

ALGORITHMS.md section 3.4. A teacher checkpoint that is still at chance on the forget domain
(chosen by `unlearn.checkpoints.select_checkpoint`) reads the same forget batch; its block outputs,
mapped into the final model's basis by per-layer affine maps fitted at that same site
(`unlearn.maps.fit_affine_maps`: ridge or SVCCA, both stored as `AffineMap`s), are the targets of
a masked MSE on the trainable model's block outputs:
L_f = (1/|L|) Σ_l Σ_{b,s} m_bs · mean_d (A_l(h_l^teacher) − h_l^θ)² / Σ m.
Retain term: KL, NLL or L2 (`retain.py`). Unlike the reference there is no silent fallback: a
missing teacher or map file is an error (an identity map is an explicit choice: `map_kind`).

`build` prepares the method: it selects the teacher (`unlearn.checkpoints.choose_teacher`: the
latest saved checkpoint within `margin` of chance on tuning items, teacher_sweep/ in the run's
output) and fits a map per layer from the teacher's block outputs to the model's on retain text
(`map_kind`: ridge "affine", or "svcca"), reporting held-out MSE of every fitted kind next to the
identity map's (maps/heldout_mse.json; svcca also writes kept dimensions and canonical correlations
to maps/svcca.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from interventions import Read
from unlearn.checkpoints import TeacherChoice
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.data import tokenize_documents
from unlearn.losses import activation_mse_loss
from unlearn.maps import FittedMaps, fit_affine_maps, load_maps, save_maps
from unlearn.methods.base import FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings
from unlearn.models import load_model

TEACHER = "teacher"
"""Model name of the teacher checkpoint in the step graph."""


@dataclass
class CheckpointTransferConfig:
    """Checkpoint activation transfer settings."""

    teacher: str | None = None
    """Teacher model (local directory or hub name); default: the model being unlearned."""
    teacher_revision: str | None = None
    """Teacher checkpoint name or hub revision (e.g. "step400", "global_step38144"); None sweeps
    `teacher_revisions` and selects one."""
    teacher_revisions: list[str] | None = None
    """Checkpoints to sweep, oldest first (default: every saved checkpoint of the teacher but the
    last; a hub model needs them listed)."""
    chance: float = 0.25
    """Chance accuracy of the forget items."""
    margin: float = 0.05
    """The teacher is the latest checkpoint with forget accuracy <= chance + margin."""
    maps_path: str | None = None
    """Directory of fitted maps (maps.safetensors, ridge or SVCCA) to use instead of fitting."""
    map_kind: Literal["affine", "svcca", "identity"] = "affine"
    """Map teacher activations into the model's basis by ridge regression ("affine") or through
    SVCCA ("svcca"; the ridge map is fitted too, as a baseline in the MSE report), or use them as
    they are ("identity")."""
    ridge: float = 1e-3
    """Ridge penalty of the affine maps (relative to the mean input energy)."""
    svcca_variance: float = 0.99
    """Share of each side's variance that SVCCA keeps before CCA, in (0, 1]."""
    map_docs: int = 640
    """Retain documents to fit the maps on (the last fifth held out for the MSE report)."""
    layers: list[int] | None = None
    """Target layers (block outputs); None means every layer."""

    forget: ForgetSettings = field(default_factory=ForgetSettings)
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(default_factory=RetainSettings)
    """Retain term."""

    def __post_init__(self) -> None:
        if not 0.0 < self.svcca_variance <= 1.0:
            raise ValueError(
                f"--svcca_variance must be in (0, 1] (a share of variance), got "
                f"{self.svcca_variance}"
            )


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
                "--teacher_revision, or build the method with `build` (it selects one)"
            )
        layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
        teacher = load_model(cfg.teacher, revision=cfg.teacher_revision, device=device).hf_model
        self.models = {TEACHER: teacher.eval().requires_grad_(False)}
        maps = (
            load_maps(cfg.maps_path)
            if cfg.maps_path is not None and cfg.map_kind != "identity"
            else None
        )
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

        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (*nodes, *retain.nodes)
        self.terms: tuple[Term, ...] = (
            cfg.forget.term(forget_term),
            *retain.terms,
        )


def fit_maps(cfg: CheckpointTransferConfig, ctx: Context, teacher: TeacherChoice) -> str:
    """Fit and save the maps from the teacher's block outputs to the model's on retain text.

    Writes maps/ (maps.safetensors, heldout_mse.json, svcca.json for SVCCA) and returns its path.
    """
    model = load_model(teacher.source, revision=teacher.revision, device=ctx.device).hf_model
    rows = tokenize_documents(ctx.tokenizer, ctx.retain_docs[: cfg.map_docs], ctx.data.max_len)
    batches = rows.batches(ctx.data.batch_size)
    fitted = fit_affine_maps(
        model,
        ctx.model,
        batches,
        cfg.layers or list(range(ctx.n_layers)),
        ridge=cfg.ridge,
        svcca_variance=cfg.svcca_variance if cfg.map_kind == "svcca" else None,
        n_heldout=max(1, len(batches) // 5),
    )
    maps = (
        fitted.affine
        if cfg.map_kind == "affine"
        else {layer: fit.map for layer, fit in fitted.svcca.items()}
    )
    out = save_maps(maps, ctx.out_dir / "maps")
    (out / "heldout_mse.json").write_text(json.dumps(fitted.mse, indent=2) + "\n")
    if fitted.svcca:
        svcca_info = {
            layer: {
                "dims_teacher": fit.dims_in,
                "dims_model": fit.dims_out,
                "correlations": fit.correlations.tolist(),
            }
            for layer, fit in fitted.svcca.items()
        }
        (out / "svcca.json").write_text(json.dumps(svcca_info, indent=2) + "\n")
    _print_maps(fitted)
    return str(out)


def _print_maps(fitted: FittedMaps) -> None:
    print(
        f"held-out map MSE ({' / '.join(fitted.mse)}): "
        + ", ".join(
            f"L{layer} " + "/".join(f"{per[layer]:.3f}" for per in fitted.mse.values())
            for layer in fitted.mse["identity"]
        )
    )
    if fitted.svcca:
        print(
            "svcca kept dims (teacher/model), top canonical correlations: "
            + ", ".join(
                f"L{layer} {fit.dims_in}/{fit.dims_out} "
                + " ".join(f"{rho:.3f}" for rho in fit.correlations[:3].tolist())
                for layer, fit in fitted.svcca.items()
            )
        )


def build(cfg: CheckpointTransferConfig, ctx: Context) -> Plan:
    """Select the teacher, fit the maps, and train one phase of activation transfer."""
    teacher, info = ctx.choose_teacher(cfg, score_retain=True)
    maps_path = cfg.maps_path
    if maps_path is None and cfg.map_kind != "identity":
        maps_path = fit_maps(cfg, ctx, teacher)
    final = replace(
        cfg, teacher=teacher.source, teacher_revision=teacher.revision, maps_path=maps_path
    )
    method = CheckpointTransfer(final, ctx.n_layers, device=ctx.device)
    return Plan([Phase(method, ctx.training.num_steps)], info)


REGISTRATION = Registration(
    name="checkpoint_transfer",
    config=CheckpointTransferConfig,
    build=build,
    summary="Checkpoint activation transfer: forget activations onto a near-chance checkpoint's.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=3e-3)),
    inputs=lambda cfg, model_cfg, data_cfg: {
        "models": {"teacher": cfg.teacher},
        "paths": {"maps_path": cfg.maps_path},
    },
)
