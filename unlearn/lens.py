"""The tuned lens: a learned affine translator per layer, then the final norm and unembedding.

Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens": for block
output h_l, the lens prediction is softmax(W_U · LN_f(A_l h_l + b_l)), with (A_l, b_l) initialized
to the identity and trained to minimize KL(p_final ‖ p_lens,l) on ordinary text. The last block's
output needs no translator (decoding it *is* the model's output), so a model with L blocks has L−1
translators, for blocks 0..L−2. The reference (EleutherAI unlearn, `unlearn/algorithm/tuned_lens/`)
fitted its lenses on block *inputs* and applied them to block outputs; here both are block outputs
(`blocks.{l}.hook_resid_post`).

Usage:
    >>> lens = TunedLens.for_model(hf_model)
    >>> history = train_tuned_lens(hf_model, lens, token_batches, num_steps=200)
    >>> lens.save("lens_dir");  lens = TunedLens.load("lens_dir")
    >>> kl = lens_kl(hf_model, lens, held_out_batches)   # {"logit": [...], "tuned": [...]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from interventions import Lens, Read, StepGraph, describe_model
from unlearn.data import Batch

SITE = "blocks.{l}.hook_resid_post"
"""Where every lens reads: the output of block l."""


class TunedLens(nn.Module):
    """One affine translator per block output except the last (identity-initialized)."""

    def __init__(self, d_model: int, n_layers: int) -> None:
        """Create identity translators for blocks 0..n_layers-2 of a model of width `d_model`."""
        super().__init__()
        self.d_model, self.n_layers = d_model, n_layers
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers - 1))
        with torch.no_grad():
            for translator in self.translators:
                translator.weight.copy_(torch.eye(d_model))
                translator.bias.zero_()

    @classmethod
    def for_model(cls, model: nn.Module) -> TunedLens:
        """Identity lens sized for `model` (any architecture with a site row)."""
        info = describe_model(model)
        return cls(model.config.hidden_size, info.n_layers)

    def translator_map(self) -> dict[int, nn.Module]:
        """Layer index -> translator, for `interventions.Lens(translator=...)`."""
        return dict(enumerate(self.translators))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `lens.safetensors` and `lens_config.json` into the directory `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, out / "lens.safetensors"
        )
        (out / "lens_config.json").write_text(
            json.dumps({"d_model": self.d_model, "n_layers": self.n_layers})
        )
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TunedLens:
        """Load a lens written by `save`.

        Raises:
            FileNotFoundError: The directory holds no lens.
        """
        root = Path(path)
        if not (root / "lens.safetensors").exists():
            raise FileNotFoundError(
                f"no tuned lens at {root} (expected lens.safetensors); train one with "
                "python -m recipes.tuned_lens"
            )
        config = json.loads((root / "lens_config.json").read_text())
        lens = cls(config["d_model"], config["n_layers"])
        lens.load_state_dict(load_file(root / "lens.safetensors"))
        return lens


def per_token_kl(
    target_logits: Float[Tensor, "*batch d_vocab"], logits: Float[Tensor, "*batch d_vocab"]
) -> Float[Tensor, "*batch"]:
    """KL(softmax(target) ‖ softmax(logits)) at every position (nats)."""
    target = target_logits.float().log_softmax(-1)
    return (target.exp() * (target - logits.float().log_softmax(-1))).sum(-1)


def _graph(lens: TunedLens | None, layers: Sequence[int]) -> StepGraph:
    translators = lens.translator_map() if lens is not None else None
    return StepGraph(
        [
            Lens("lens", SITE, layers=list(layers), translator=translators),
            Read("logits", "unembed", grad=False),
        ]
    )


def _layer_kl(out: dict[str, Tensor], batch: Batch) -> Float[Tensor, " layer"]:
    mask = batch.attention_mask.bool()
    kl = per_token_kl(out["logits"].detach()[None], out["lens"])  # [layer, batch, pos]
    return (kl * mask).sum((1, 2)) / mask.sum()


def train_tuned_lens(
    model: nn.Module,
    lens: TunedLens,
    batches: Iterable[Batch],
    *,
    num_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> list[float]:
    """Fit the translators to the model's own final distribution (the model stays frozen).

    Args:
        model: A Hugging Face causal LM.
        lens: The lens to train in place.
        batches: Token batches, cycled until `num_steps` steps are done.
        num_steps: Optimizer steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Returns:
        The mean KL over layers at every step.
    """
    pool = list(batches)
    if not pool:
        raise ValueError("no batches to train the tuned lens on")
    # The model stays frozen for the duration only; the caller's requires_grad flags come back.
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        step = _graph(lens, range(lens.n_layers - 1)).compile({"model": model})
        optimizer = torch.optim.AdamW(lens.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        for i in tqdm(range(num_steps), desc="tuned lens", dynamic_ncols=True):
            batch = pool[i % len(pool)]
            loss = _layer_kl(step({"batch": batch}), batch).mean()
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            losses.append(loss.item())
    finally:
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)
    return losses


def lens_kl(model: nn.Module, lens: TunedLens, batches: Iterable[Batch]) -> dict[str, list[float]]:
    """Per-layer KL(p_final ‖ p_lens) on held-out batches, for the logit lens and the tuned lens.

    Returns:
        {"logit": [...], "tuned": [...]}: one value per block 0..L−2, token-weighted over batches.
    """
    layers = range(lens.n_layers - 1)
    totals = {"logit": torch.zeros(len(layers)), "tuned": torch.zeros(len(layers))}
    steps = {
        "logit": _graph(None, layers).compile({"model": model}),
        "tuned": _graph(lens, layers).compile({"model": model}),
    }
    n_tokens = 0
    with torch.no_grad():
        for batch in batches:
            n = int(batch.attention_mask.sum())
            for name, step in steps.items():
                totals[name] += _layer_kl(step({"batch": batch}), batch).cpu() * n
            n_tokens += n
    if n_tokens == 0:
        raise ValueError("no held-out tokens to compare the lenses on")
    return {name: (total / n_tokens).tolist() for name, total in totals.items()}
