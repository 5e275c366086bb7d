"""Linear probe: tokens that a per-token logistic probe scores as most forget-like.

ALGORITHMS.md section 4.3. At block `layer`'s output, a logistic regression is trained to tell
tokens of forget documents (label 1) from tokens of retain documents (label 0), every token taking
its document's label (the BOS separator left out): standardized activations, balanced classes (up
to `max_tokens` sampled from each), full-batch AdamW with weight decay. The forget tokens with the
highest probe logits, the top `fraction`, are kept. The reference loaded a probe trained
elsewhere (`train_classification_probes.py`); here it is trained on the run's own documents, and
a tenth of the sampled tokens is held out to report its accuracy.

The defaults were chosen on the documents of the forget dev entities (`benchmarks/token_selection.py
--tune`), never on test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from unlearn.selection.base import (
    Selection,
    SelectionInputs,
    check_fraction,
    selectable,
    single_threaded,
    site_activations,
    top_fraction,
    unflatten,
)


@dataclass(frozen=True)
class ProbeSettings:
    """A logistic probe telling forget from retain tokens."""

    layer: int = 0
    """Block whose output is read (negative counts from the end)."""
    fraction: float = 0.4
    """Share of the forget tokens kept (the highest probe logits)."""
    num_steps: int = 300
    """Full-batch AdamW steps."""
    lr: float = 0.05
    """Learning rate."""
    weight_decay: float = 1e-3
    """Weight decay (L2 on the probe's weights)."""
    max_tokens: int = 100_000
    """Training tokens sampled from each class at most."""
    seed: int = 0
    """Seed of the sample and the held-out tenth."""

    def __post_init__(self) -> None:
        check_fraction(self.fraction)
        if min(self.num_steps, self.max_tokens) < 1 or not self.lr > 0:
            raise ValueError(
                "--num_steps and --max_tokens must be >= 1 and --lr > 0, got "
                f"{self.num_steps}, {self.max_tokens}, {self.lr}"
            )


def _sample(n: int, k: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)[:k]


def fit_probe(
    forget_acts: Float[Tensor, "token d_model"],
    retain_acts: Float[Tensor, "token d_model"],
    settings: ProbeSettings,
) -> tuple[torch.nn.Linear, Float[Tensor, " d_model"], Float[Tensor, " d_model"], dict]:
    """Train the logistic probe; return it, the standardization (mean, std) and its accuracy."""
    generator = torch.Generator().manual_seed(settings.seed)
    k = min(settings.max_tokens, len(forget_acts), len(retain_acts))
    x = torch.cat(
        [
            forget_acts[_sample(len(forget_acts), k, generator)],
            retain_acts[_sample(len(retain_acts), k, generator)],
        ]
    )
    y = torch.cat([torch.ones(k), torch.zeros(k)])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    held_out = torch.zeros(len(x), dtype=torch.bool)
    held_out[_sample(len(x), len(x) // 10, generator)] = True
    with torch.random.fork_rng(devices=[]):  # seeded init, the caller's random state untouched
        torch.manual_seed(settings.seed)
        probe = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.AdamW(
        probe.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    with torch.enable_grad(), single_threaded():
        for _ in tqdm(range(settings.num_steps), desc="probe", dynamic_ncols=True, leave=False):
            logits = probe(x[~held_out]).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[~held_out])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        correct = (probe(x).squeeze(1) > 0) == y.bool()
    info = {
        "train_accuracy": float(correct[~held_out].float().mean()),
        "heldout_accuracy": float(correct[held_out].float().mean()),
        "train_tokens_per_class": k,
    }
    return probe, mean, std, info


def probe_scores(
    settings: ProbeSettings, inputs: SelectionInputs
) -> tuple[Float[Tensor, " token"], dict]:
    """The probe logit of every forget token, and the probe's accuracy.

    Raises:
        ValueError: No such block.
    """
    read = {
        name: site_activations(inputs.model, docs, settings.layer, inputs.batch_size, desc=name)
        for name, docs in (("forget", inputs.forget), ("retain", inputs.retain))
    }
    allowed = {"forget": selectable(inputs.forget), "retain": selectable(inputs.retain)}
    probe, mean, std, info = fit_probe(
        read["forget"][allowed["forget"]], read["retain"][allowed["retain"]], settings
    )
    with torch.no_grad():
        scores = probe((read["forget"] - mean) / std).squeeze(1)
    return scores, info


def select(settings: ProbeSettings, inputs: SelectionInputs) -> Selection:
    """Keep the top fraction of forget tokens by probe logit."""
    scores, info = probe_scores(settings, inputs)
    keep = top_fraction(scores, settings.fraction, selectable(inputs.forget))
    info["threshold"] = float(scores[keep].min()) if keep.any() else None
    return Selection(unflatten(keep, [len(row) for row in inputs.forget.ids]), info)
