"""Checkpoint activation transfer, the first pieces: choosing the teacher checkpoint, fitting maps.

`sweep_checkpoints` scores a model's training checkpoints on forget (and retain) items;
`select_checkpoint` picks the latest one whose forget accuracy is still within `margin` of chance
(the reference chose by hand, ALGORITHMS.md section 3.4); `write_sweep` saves the table and a PNG.

`AffineStats` fits an affine map y ≈ W x + b from a teacher's activations x to the model's y by
ridge regression in float64 from streamed sufficient statistics (Σ x̃x̃ᵀ, Σ x̃yᵀ with x̃ = [x, 1]),
so any number of tokens fits in O(d²) memory. `fit_affine_maps` streams retain batches through both
models at one site per layer, fits on all but the held-out batches, and reports the held-out MSE of
the map next to the identity map's. Maps are fitted and applied at the same site (the reference
fitted on block inputs and applied to block outputs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interventions import Execution, capture_acts
from unlearn.data import Batch
from unlearn.eval import evaluate_mc
from unlearn.models import load_model
from unlearn.plots import plt, save_figure


@dataclass(frozen=True)
class CheckpointScore:
    """How much one checkpoint knows."""

    revision: str
    """Checkpoint name or hub revision."""
    forget_acc: float
    """Accuracy on the forget items."""
    retain_acc: float | None = None
    """Accuracy on the retain items, if given."""


def sweep_checkpoints(
    source: str,
    revisions: Sequence[str],
    forget_items: Sequence[dict[str, Any]],
    retain_items: Sequence[dict[str, Any]] | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    remote: Execution = False,
) -> list[CheckpointScore]:
    """Evaluate each checkpoint of `source` (a local model directory or a hub name).

    `remote` runs the evaluation traces elsewhere (see `interventions.Remote`), e.g. on NDIF for
    a hosted model's revisions.

    Raises:
        ValueError: No revisions were given.
    """
    if not revisions:
        raise ValueError("no checkpoints to sweep; pass revisions, e.g. list_checkpoints(dir)")
    scores = []
    for revision in revisions:
        loaded = load_model(source, revision=revision, device=device, dtype=dtype)
        forget = evaluate_mc(loaded.model, loaded.tokenizer, forget_items, remote=remote).acc
        retain = (
            evaluate_mc(loaded.model, loaded.tokenizer, retain_items, remote=remote).acc
            if retain_items is not None
            else None
        )
        scores.append(CheckpointScore(revision, forget, retain))
    return scores


def select_checkpoint(
    scores: Sequence[CheckpointScore], chance: float = 0.25, margin: float = 0.05
) -> CheckpointScore:
    """The latest checkpoint (in the given order) whose forget accuracy is <= chance + margin.

    Raises:
        ValueError: No checkpoint is that close to chance (the message lists the sweep).
    """
    eligible = [s for s in scores if s.forget_acc <= chance + margin]
    if not eligible:
        table = ", ".join(f"{s.revision}: {s.forget_acc:.3f}" for s in scores)
        raise ValueError(
            f"no checkpoint has forget accuracy <= {chance + margin:.3f} (chance {chance} + margin "
            f"{margin}); sweep: {table}. Add earlier checkpoints or raise the margin."
        )
    return eligible[-1]


def write_sweep(
    scores: Sequence[CheckpointScore],
    chosen: CheckpointScore,
    out_dir: str | Path,
    chance: float = 0.25,
) -> Path:
    """Write sweep.json, sweep.md and sweep.png (accuracy per checkpoint, the chosen one marked)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {"chosen": chosen.revision, "chance": chance, "scores": [asdict(s) for s in scores]},
            indent=2,
        )
        + "\n"
    )
    rows = [
        f"| {s.revision} | {s.forget_acc:.3f} | "
        f"{'' if s.retain_acc is None else f'{s.retain_acc:.3f}'} | "
        f"{'chosen' if s == chosen else ''} |"
        for s in scores
    ]
    (out / "sweep.md").write_text(
        "| checkpoint | forget | retain | |\n| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(scores))
    ax.plot(x, [s.forget_acc for s in scores], marker="o", color="tab:red", label="forget")
    if all(s.retain_acc is not None for s in scores):
        ax.plot(x, [s.retain_acc for s in scores], marker="o", color="tab:blue", label="retain")
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.axvline(list(scores).index(chosen), color="black", linestyle="--", label="chosen teacher")
    ax.set_xticks(list(x), [s.revision for s in scores], rotation=45, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out / "sweep.png")


@dataclass
class AffineMap:
    """y = x @ weight.T + bias."""

    weight: Float[Tensor, "d_out d_in"]
    bias: Float[Tensor, " d_out"]

    def __call__(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Apply the map (in the input's dtype)."""
        return x @ self.weight.to(x.dtype).T + self.bias.to(x.dtype)


class AffineStats:
    """Streamed sufficient statistics for ridge regression y ≈ W x + b, in float64."""

    def __init__(self, d_in: int, d_out: int) -> None:
        """Empty statistics for inputs of width `d_in` and targets of width `d_out`."""
        self.xx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
        self.xy = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
        self.n = 0

    def update(self, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"]) -> None:
        """Add rows (tokens) to the statistics."""
        x1 = torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], dim=1).cpu()
        self.xx += x1.T @ x1
        self.xy += x1.T @ y.double().cpu()
        self.n += len(x)

    def solve(self, ridge: float = 1e-3) -> AffineMap:
        """The ridge solution (the penalty, scaled by the mean input energy, spares the bias).

        Raises:
            ValueError: No rows were added.
        """
        if self.n == 0:
            raise ValueError("no activations were added; check that the batches have tokens")
        d = self.xx.shape[0] - 1
        scale = self.xx.diagonal()[:d].mean().clamp_min(1e-12)
        penalty = torch.zeros_like(self.xx)
        penalty.diagonal()[:d] = ridge * scale
        solution = torch.linalg.solve(self.xx + penalty, self.xy)  # [d_in + 1, d_out]
        return AffineMap(weight=solution[:d].T.float(), bias=solution[d].float())


def _tokens(
    model: nn.Module, batch: Batch, site: str, layers: Sequence[int], remote: Execution
) -> list[Tensor]:
    acts = capture_acts(model, batch, site, layers=list(layers), remote=remote)
    mask = batch.attention_mask.bool()
    return [acts[site.format(l=layer)][mask] for layer in layers]


def fit_affine_maps(
    teacher: nn.Module,
    student: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[int],
    *,
    site: str = "blocks.{l}.hook_resid_post",
    ridge: float = 1e-3,
    n_heldout: int = 1,
    remote: Execution = False,
) -> tuple[dict[int, AffineMap], dict[str, dict[int, float]]]:
    """Fit teacher -> student maps per layer on all but the last `n_heldout` batches.

    Only activations are read, so `remote` can run the reads elsewhere (the statistics are
    accumulated here).

    Returns:
        The maps by layer, and {"affine": {layer: mse}, "identity": {layer: mse}} on held-out
        tokens (mean over tokens and dimensions).

    Raises:
        ValueError: Fewer batches than `n_heldout` + 1.
    """
    if len(batches) <= n_heldout:
        raise ValueError(
            f"need more than {n_heldout} batches (the held-out ones), got {len(batches)}"
        )
    stats: dict[int, AffineStats] = {}
    with torch.no_grad():
        for batch in batches[: len(batches) - n_heldout]:
            for layer, x, y in zip(
                layers,
                _tokens(teacher, batch, site, layers, remote),
                _tokens(student, batch, site, layers, remote),
                strict=True,
            ):
                stats.setdefault(layer, AffineStats(x.shape[-1], y.shape[-1])).update(x, y)
        maps = {layer: s.solve(ridge) for layer, s in stats.items()}
        errors: dict[str, dict[int, list[float]]] = {"affine": {}, "identity": {}}
        for batch in batches[len(batches) - n_heldout :]:
            for layer, x, y in zip(
                layers,
                _tokens(teacher, batch, site, layers, remote),
                _tokens(student, batch, site, layers, remote),
                strict=True,
            ):
                errors["affine"].setdefault(layer, []).append(
                    float(((maps[layer](x) - y) ** 2).mean())
                )
                errors["identity"].setdefault(layer, []).append(float(((x - y) ** 2).mean()))
    mse = {
        kind: {layer: sum(v) / len(v) for layer, v in per.items()} for kind, per in errors.items()
    }
    return maps, mse


def save_maps(maps: dict[int, AffineMap], path: str | Path) -> Path:
    """Write maps to `path/maps.safetensors` (keys `<layer>.weight`, `<layer>.bias`)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{layer}.{part}": getattr(m, part).contiguous()
        for layer, m in maps.items()
        for part in ("weight", "bias")
    }
    save_file(tensors, out / "maps.safetensors")
    return out


def load_maps(path: str | Path) -> dict[int, AffineMap]:
    """Read maps written by `save_maps`.

    Raises:
        FileNotFoundError: The directory holds no maps.
    """
    from safetensors.torch import load_file

    file = Path(path) / "maps.safetensors"
    if not file.exists():
        raise FileNotFoundError(
            f"no maps at {file}; fit them with unlearn.transfer.fit_affine_maps"
        )
    tensors = load_file(file)
    layers = sorted({int(key.split(".")[0]) for key in tensors})
    return {
        layer: AffineMap(tensors[f"{layer}.weight"], tensors[f"{layer}.bias"]) for layer in layers
    }
