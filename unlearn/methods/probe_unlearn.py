"""Probe unlearning: maximize the entropy of every transformer probe's decoded forget prediction.

ALGORITHMS.md section 3.6. Probes (`unlearn.probe`) map an early checkpoint's block output h_l to
the final model's. For each probed layer l the trainable model's forget activations are decoded as
logits_l = W_U · LN_f(probe_l(h_l^θ)): through the frozen probe, then the model's own final norm
and unembedding (an `interventions.Lens` whose translator is the probe). The reference decoded
`embed_out(probe(h))` without the final norm, so its logits lived on the wrong scale; here the norm
is part of the decode, as for every other lens. Forget term, averaged over layers, at the positions
that predict selected forget tokens:
- "max_entropy": the exact KL(U ‖ p_l) / log V (0 when the prediction is uniform);
- "random_ce": cross-entropy against uniformly random targets / log V (the reference's estimate).
Retain term: KL, NLL or L2 (`retain.py`). Coefficients: forget 1 − 0.25c, retain with a warm start.

`build` prepares the probes unless `probe_path` names trained ones: it picks the teacher checkpoint
(`unlearn.checkpoints.choose_teacher`: the latest saved checkpoint within `margin` of chance on
the tuning items, teacher_sweep/; or `teacher_revision` skips the sweep) and trains one causal
transformer probe per layer from the teacher's block outputs to the model's on forget text,
reporting held-out MSE next to the identity map's (probes/ in the run's output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from interventions import Lens
from unlearn.checkpoints import TeacherChoice
from unlearn.config import DataConfig, ModelConfig, OptimSettings, TrainingConfig
from unlearn.data import tokenize_documents
from unlearn.methods.base import FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.lens_unlearn import lens_forget_term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings
from unlearn.models import load_model
from unlearn.probe import SITE, load_probes, save_probes, train_probes


@dataclass
class ProbeUnlearnConfig:
    """Probe unlearning settings."""

    probe_path: str | None = None
    """Directory of trained probes (`unlearn.probe.save_probes`); None trains them."""
    layers: list[int] | None = None
    """Probed layers to unlearn through; None means every layer the probes cover."""
    forget_loss: Literal["max_entropy", "random_ce"] = "max_entropy"
    """Forget objective on each probe's decoded prediction."""
    teacher: str | None = None
    """Teacher model (default: the model being unlearned, at one of its checkpoints)."""
    teacher_revision: str | None = None
    """Teacher checkpoint; None sweeps `teacher_revisions` and picks one."""
    teacher_revisions: list[str] | None = None
    """Checkpoints to sweep, oldest first (default: every saved checkpoint of the model but the
    last; a hub model needs them listed)."""
    chance: float = 0.25
    """Chance accuracy of the forget items."""
    margin: float = 0.05
    """The teacher is the latest checkpoint with forget accuracy <= chance + margin."""
    probe_steps: int = 300
    """Optimizer steps of probe training (ignored with `probe_path`)."""
    probe_lr: float = 1e-3
    """AdamW learning rate of the probes."""
    probe_docs: int = 1280
    """Forget documents to train the probes on (the last fifth held out for the MSE report)."""
    d_probe: int = 64
    """Width inside each probe."""
    probe_heads: int = 4
    """Attention heads of each probe."""
    probe_ffn: int = 256
    """Feed-forward width of each probe."""
    depth_scale: float = 1.0
    """Probe depth = max(1, round(depth_scale * (n_layers - layer)))."""
    layer_stride: int = 2
    """Without `layers`, probe every layer_stride-th block counting down from the last (4 blocks,
    stride 2: blocks 3 and 1). With `probe_path`, the probes' own layers are used."""

    forget: ForgetSettings = field(default_factory=ForgetSettings)
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(default_factory=RetainSettings)
    """Retain term."""

    def __post_init__(self) -> None:
        if self.layer_stride < 1:
            raise ValueError(f"--layer_stride must be >= 1, got {self.layer_stride}")


class ProbeUnlearn:
    """Nodes and terms of probe unlearning for a model with `n_layers` blocks."""

    def __init__(
        self, cfg: ProbeUnlearnConfig, n_layers: int, device: torch.device | str = "cpu"
    ) -> None:
        """Load the probes (frozen) and declare the probe-lens read and the terms.

        Args:
            cfg: The settings.
            n_layers: Number of blocks of the model to unlearn.
            device: Where the model lives (the probes are moved there).

        Raises:
            ValueError: No probe path, or a layer outside the model or without a probe.
            FileNotFoundError: No probes at the path.
        """
        if cfg.probe_path is None:
            raise ValueError(
                "probe_unlearn needs trained probes: pass --probe_path, or run "
                "python -m recipes.probe_unlearn (it trains them)"
            )
        probes = load_probes(cfg.probe_path)
        layers = sorted(probes) if cfg.layers is None else list(cfg.layers)
        outside = [layer for layer in [*layers, *probes] if not 0 <= layer < n_layers]
        if not layers or outside:
            raise ValueError(
                f"probe layers must lie in 0..{n_layers - 1}; got layers {layers} and probes for "
                f"{sorted(probes)} (were the probes trained on another model?)"
            )
        missing = sorted(set(layers) - set(probes))
        if missing:
            raise ValueError(
                f"no probe for layers {missing} at {cfg.probe_path}; it has {sorted(probes)}"
            )
        for probe in probes.values():
            probe.to(device)
        self.probes = {layer: probes[layer] for layer in layers}
        forget_node = Lens(
            "forget_probe",
            SITE,
            layers=layers,
            translator=dict(self.probes),
            model=TRAINABLE,
            batch=FORGET,
        )
        forget_term = lens_forget_term(cfg.forget_loss, "forget_probe")
        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (forget_node, *retain.nodes)
        self.terms: tuple[Term, ...] = (
            cfg.forget.term(forget_term),
            *retain.terms,
        )


def fit_probes(cfg: ProbeUnlearnConfig, ctx: Context, teacher: TeacherChoice) -> str:
    """Train one probe per layer from the teacher's block outputs to the model's on forget text.

    Writes probes/ (the probes and heldout_mse.json) and returns its path.

    Raises:
        ValueError: Fewer probe documents than two batches.
    """
    size = ctx.data.batch_size
    _check_probe_docs(cfg.probe_docs, size)
    model = load_model(teacher.source, revision=teacher.revision, device=ctx.device).hf_model
    rows = tokenize_documents(ctx.tokenizer, ctx.forget_docs[: cfg.probe_docs], ctx.data.max_len)
    batches = rows.batches(size)
    layers = cfg.layers or sorted(range(ctx.n_layers - 1, -1, -cfg.layer_stride))
    torch.manual_seed(ctx.training.seed)
    fit = train_probes(
        model.eval().requires_grad_(False),
        ctx.model,
        batches,
        layers,
        num_steps=cfg.probe_steps,
        lr=cfg.probe_lr,
        d_probe=cfg.d_probe,
        n_heads=cfg.probe_heads,
        d_ffn=cfg.probe_ffn,
        depth_scale=cfg.depth_scale,
        n_heldout=max(1, len(batches) // 5),
    )
    out = save_probes(fit.probes, ctx.out_dir / "probes")
    (out / "heldout_mse.json").write_text(json.dumps(fit.mse, indent=2) + "\n")
    print(
        "held-out probe MSE (probe / identity): "
        + ", ".join(
            f"L{layer} {fit.mse['probe'][layer]:.3f}/{fit.mse['identity'][layer]:.3f}"
            for layer in fit.mse["probe"]
        )
    )
    return str(out)


def _check_probe_docs(probe_docs: int, batch_size: int) -> None:
    if probe_docs < 2 * batch_size:
        raise ValueError(
            f"--probe_docs {probe_docs} gives fewer than 2 batches of {batch_size}; raise it or "
            "lower --batch_size"
        )


def _inputs(cfg: ProbeUnlearnConfig, model_cfg: ModelConfig, data_cfg: DataConfig) -> dict:
    if cfg.probe_path is None:
        _check_probe_docs(cfg.probe_docs, data_cfg.batch_size)
    return {"paths": {"probe_path": cfg.probe_path}, "models": {"teacher": cfg.teacher}}


def build(cfg: ProbeUnlearnConfig, ctx: Context) -> Plan:
    """Train the probes (unless given) and one phase of unlearning through them."""
    info: dict[str, object] = {}
    probe_path = cfg.probe_path
    if probe_path is None:
        # Only forget accuracy decides; scoring retain items too would double the sweep's time.
        teacher, info = ctx.choose_teacher(cfg, score_retain=False)
        probe_path = fit_probes(cfg, ctx, teacher)
    method = ProbeUnlearn(replace(cfg, probe_path=probe_path), ctx.n_layers, device=ctx.device)
    return Plan([Phase(method, ctx.training.num_steps)], info)


REGISTRATION = Registration(
    name="probe_unlearn",
    config=ProbeUnlearnConfig,
    build=build,
    summary="Probe unlearning: max entropy of early-checkpoint probes' decoded forget predictions.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=1.5e-3), eval_every=100),
    inputs=_inputs,
)
