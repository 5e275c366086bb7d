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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from interventions import Lens
from unlearn.methods.base import FORGET, RAMPS, TRAINABLE, Node, RampName, Term
from unlearn.methods.lens_unlearn import lens_forget_term
from unlearn.methods.retain import RetainLoss, retain_component
from unlearn.probe import SITE, load_probes


@dataclass
class ProbeUnlearnConfig:
    """Probe unlearning settings."""

    probe_path: str | None = None
    """Directory of trained probes (`unlearn.probe.save_probes`); the recipe trains them."""
    layers: list[int] | None = None
    """Probed layers to unlearn through; None means every layer the probes cover."""
    forget_loss: Literal["max_entropy", "random_ce"] = "max_entropy"
    """Forget objective on each probe's decoded prediction."""
    retain_loss: RetainLoss = "kl"
    """Retain objective."""
    forget_coef: float = 1.0
    """Peak forget coefficient."""
    retain_coef: float = 1.0
    """Peak retain coefficient."""
    forget_ramp: RampName = "forget_decay"
    """Forget coefficient schedule (a key of `unlearn.methods.base.RAMPS`)."""
    retain_ramp: RampName = "retain_warmup"
    """Retain coefficient schedule."""
    retain_layers: list[int] | None = None
    """Layers of the L2 retain loss; None means every layer."""


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
        retain = retain_component(
            cfg.retain_loss, cfg.retain_layers or "all", cfg.retain_coef, RAMPS[cfg.retain_ramp]
        )
        self.nodes: tuple[Node, ...] = (forget_node, *retain.nodes)
        self.terms: tuple[Term, ...] = (
            Term("forget", forget_term, cfg.forget_coef, RAMPS[cfg.forget_ramp]),
            *retain.terms,
        )
