"""TAR-style tamper-resistant unlearning: maximum entropy on forget text after a simulated attack.

Tamirisa et al. 2025 (ICLR), "Tamper-Resistant Safeguards for Open-Weight LLMs": adversarial
training in which every outer step simulates a short fine-tuning attack on the forget domain and
pushes the *attacked* model's predictions on forget text to maximum entropy, with a retain term
that keeps the model itself. Here, first order as in the paper:

- forget term: the KL from the uniform distribution to the model's next-token prediction at the
  positions that predict selected forget tokens (`unlearn.losses.max_entropy_loss`, 0 at maximum
  entropy), evaluated after the training core's simulated attack (`OptimSettings.tar_steps`
  AdamW steps at `tar_lr` on attack-split forget text, `unlearn.training`), its gradient applied
  to the weights themselves;
- retain term: KL to the original model on retain text (`retain.py`), at the weights themselves.

The simulated attack is the training core's, so any method can use it (`--tar_steps` on its
recipe); this method is its natural objective. The paper starts from an initial safeguard and
samples its adversaries (learning rates, steps, optimizers) from a distribution; here the attack
is fixed per run (one learning rate, a few steps, batches of the run's own forget stream), which
keeps one step's cost at `tar_steps` + 2 forward/backward passes. With `--tar_steps 0` it is the
ablation without the simulated attack: maximum forget entropy at the weights themselves.

Defaults: 4 attack steps at lr 1e-3 (the attack suite's strongest learning rate), 200 outer
steps; the outer learning rate, 9e-4, was chosen on the dev split (`python -m benchmarks.tune_dev
--methods tar`, `benchmarks/results/tune_dev_tar.md`: the one rate of 1e-4, 3e-4, 9e-4 with dev
forget <= 35%, at retain 96.5%; its dev excess over the filtered twin still peaks at 46 points).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interventions import Read
from unlearn.config import DataConfig, OptimSettings, TrainingConfig
from unlearn.losses import max_entropy_loss
from unlearn.methods.base import FORGET, TRAINABLE, ForgetSettings, Node, Term
from unlearn.methods.lens_unlearn import predicting
from unlearn.methods.plan import Context, Phase, Plan, Registration
from unlearn.methods.retain import RetainSettings


@dataclass
class TarConfig:
    """TAR-style unlearning settings (the simulated attack: `--tar_steps`, `--tar_lr`)."""

    forget: ForgetSettings = field(default_factory=lambda: ForgetSettings(forget_ramp="constant"))
    """Weight and schedule of the maximum-entropy term at the attacked weights."""
    retain: RetainSettings = field(
        default_factory=lambda: RetainSettings(retain_loss="kl", retain_ramp="constant")
    )
    """Retain term (KL to the original on retain text by default)."""


class TamperResistant:
    """Nodes and terms of TAR-style unlearning: forget logits' entropy, plus retain."""

    def __init__(self, cfg: TarConfig) -> None:
        """Declare the trainable model's forget logits and the two terms."""
        retain = cfg.retain.component()
        self.nodes: tuple[Node, ...] = (
            Read("forget_logits", "unembed", model=TRAINABLE, batch=FORGET),
            *retain.nodes,
        )
        forget_term = cfg.forget.term(
            lambda acts, forget, retain: max_entropy_loss(
                acts["forget_logits"], predicting(forget.token_mask)
            )
        )
        self.terms: tuple[Term, ...] = (forget_term, *retain.terms)


def build(cfg: TarConfig, ctx: Context) -> Plan:
    """One phase of TAR-style training (with --tar_steps 0: its ablation without the attack)."""
    return Plan([Phase(TamperResistant(cfg), ctx.training.num_steps)])


REGISTRATION = Registration(
    name="tar",
    config=TarConfig,
    build=build,
    summary="TAR-style: maximum forget entropy after a simulated fine-tuning attack (--tar_steps).",
    data=lambda: DataConfig(batch_size=32),
    training=lambda: TrainingConfig(
        num_steps=200, optim=OptimSettings(lr=9e-4, tar_steps=4, tar_lr=1e-3)
    ),
)
