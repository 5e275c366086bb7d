"""Representation misdirection for unlearning (RMU): scramble one layer's forget activations.

Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use with Unlearning"
(`ALGORITHMS.md` section 10). Pick a block ℓ and draw a random unit vector u (entries uniform in
[0, 1), normalized, from a generator seeded by `direction_seed`), fixed for the run. With h_ℓ the
output of block ℓ (`blocks.ℓ.hook_resid_post`), d its width, T the selected forget tokens and R
the retain tokens:

- forget: (1/|T|) Σ_{t∈T} (1/d) ‖h_ℓ^θ(t) − c·u‖², pushing forget activations toward the fixed
  vector c·u (c = `steering_coef`), so later blocks read noise where the knowledge was;
- retain (by default): (1/|R|) Σ_{t∈R} (1/d) ‖h_ℓ^θ(t) − h_ℓ^frozen(t)‖², weighted α = `retain_coef`
  (the `mse` retain loss at `retain_layers` = [ℓ]); the KL, NLL and L2 retain losses work too;
- only the MLP parameters of blocks ℓ−2, ℓ−1, ℓ train (`update_layers`, `update_params`): the
  plan's phase names them and the training core freezes the rest, or puts LoRA adapters only on
  those MLP layers.

Total: forget_coef · forget + α · retain, both constant. Where this deliberately differs from the
WMDP code: the MSE means leave padding out (the reference's `F.mse_loss` counts padded positions);
the default trains every MLP parameter of the update blocks, where the reference trains only the
MLP output projection's weight (pass `--update_params mlp.dense_4h_to_h.weight` on GPT-NeoX for
that); the layer defaults to the middle block, since the toy models have 2 to 4 blocks (the paper
used block 7 of Zephyr-7B's 32, with c = 6.5 and α = 1200, values tied to that model's activation
norms). Known weakness: a few fine-tuning steps restore most of the knowledge (Łucki et al. 2024).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from interventions import Read
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.losses import activation_mse_loss
from unlearn.methods.base import FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings

SITE = "blocks.{l}.hook_resid_post"
"""The steered activation: block ℓ's output."""


@dataclass
class RMUConfig:
    """RMU settings."""

    layer: int | None = None
    """Block ℓ whose output is steered; None: the middle block, n_layers // 2 (block 2 of the
    default 4-block toy model)."""
    update_layers: list[int] | None = None
    """Blocks whose parameters train, each at or below `layer`; None: ℓ−2, ℓ−1, ℓ (those >= 0)."""
    update_params: list[str] = field(default_factory=lambda: ["mlp.*"])
    """Parameters that train in each update block: glob patterns of names relative to the block
    ("mlp.*": every MLP weight and bias; "mlp.dense_4h_to_h.weight": the WMDP code's choice, the
    MLP output projection, on GPT-NeoX)."""
    steering_coef: float = 50.0
    """c: forget activations are pushed toward c·u. Scale it with the activation norms at `layer`
    (a few times their mean); the default suits the default toy model, whose block-2 outputs have
    norms near 25."""
    direction_seed: int = 0
    """Seed of the random direction u (the same seed gives the same u)."""
    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Forget-term weight and schedule."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(
            retain_loss="mse", retain_coef=100.0, retain_ramp="constant"
        )
    )
    """Retain term, by default RMU's: the MSE of block ℓ's outputs from the frozen model's, with
    α = retain_coef. Here retain_layers None means [ℓ], not every layer."""

    def __post_init__(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"--layer must be a block index >= 0 (or unset), got {self.layer}")
        if self.update_layers is not None and not self.update_layers:
            raise ValueError("--update_layers must name at least one block (or be unset)")
        if not self.update_params:
            raise ValueError('--update_params must give at least one pattern, e.g. "mlp.*"')
        if not math.isfinite(self.steering_coef):
            raise ValueError(f"--steering_coef must be a finite number, got {self.steering_coef}")


def control_vector(d_model: int, steering_coef: float, seed: int) -> Float[Tensor, " d_model"]:
    """RMU's target c·u, with c = `steering_coef` and u a seeded random unit vector.

    u has uniform [0, 1) entries before normalizing (as in the WMDP code), drawn on the CPU from a
    generator seeded with `seed`: the same vector on every device and rerun.
    """
    generator = torch.Generator().manual_seed(seed)
    direction = torch.rand(d_model, generator=generator)
    return steering_coef * direction / direction.norm()


def rmu_layers(cfg: RMUConfig, n_layers: int) -> tuple[int, tuple[int, ...]]:
    """(ℓ, the blocks that train) for a model with `n_layers` blocks.

    Raises:
        ValueError: ℓ is not a block of the model, or an update block is not at or below it.
    """
    layer = n_layers // 2 if cfg.layer is None else cfg.layer
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"RMU layer {layer} is not a block of this {n_layers}-block model; pass --layer "
            f"between 0 and {n_layers - 1}"
        )
    if cfg.update_layers is None:
        return layer, tuple(range(max(0, layer - 2), layer + 1))
    update = tuple(cfg.update_layers)
    wrong = [u for u in update if not 0 <= u <= layer]
    if wrong:
        raise ValueError(
            f"--update_layers {wrong} must be blocks between 0 and --layer {layer}: later blocks "
            f"cannot change block {layer}'s output"
        )
    return layer, update


class RMU:
    """Nodes and terms of RMU at one layer of a model with `n_layers` blocks of width `d_model`."""

    def __init__(self, cfg: RMUConfig, n_layers: int, d_model: int) -> None:
        """Draw the control vector; declare the forget read at ℓ and the retain term.

        Raises:
            ValueError: The layers do not fit the model (`rmu_layers`).
        """
        self.layer, self.update_layers = rmu_layers(cfg, n_layers)
        self.control_vec = control_vector(d_model, cfg.steering_coef, cfg.direction_seed)

        def forget_term(acts, forget, retain):
            acts_l = acts["forget_acts"]
            target = self.control_vec.to(acts_l.device, acts_l.dtype).expand_as(acts_l)
            return activation_mse_loss([acts_l], [target], forget.token_mask)

        retain_settings = cfg.retain
        if retain_settings.retain_layers is None:
            retain_settings = dataclasses.replace(retain_settings, retain_layers=[self.layer])
        retain = retain_settings.component()
        self.nodes: tuple[Node, ...] = (
            Read("forget_acts", SITE.format(l=self.layer), model=TRAINABLE, batch=FORGET),
            *retain.nodes,
        )
        self.terms: tuple[Term, ...] = (cfg.forget.term(forget_term), *retain.terms)


def build(cfg: RMUConfig, ctx: Context) -> Plan:
    """One phase of RMU training only the update blocks' chosen (MLP) parameters."""
    method = RMU(cfg, ctx.n_layers, int(ctx.model.config.hidden_size))
    phase = Phase(
        method,
        ctx.training.num_steps,
        blocks=method.update_layers,
        parameters=tuple(cfg.update_params),
    )
    info = {"rmu_layer": method.layer, "rmu_update_layers": list(method.update_layers)}
    return Plan([phase], info)


REGISTRATION = Registration(
    name="rmu",
    config=RMUConfig,
    build=build,
    summary="RMU: one layer's forget activations pushed to a fixed random vector, MLPs only.",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(num_steps=300, optim=OptimSettings(lr=3e-3)),
)
