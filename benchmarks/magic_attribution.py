"""MAGIC attribution on the toy world: does the metagradient predict retraining, and find the facts?

A short SGD run on candidate rows (attack-split forget documents and retain documents, spread over
their entities) is attributed with `unlearn.selection.magic.metagradients`: every token's
dE/dw_i for two targets E, the answer NLL of the forget **dev** items and of the retain items.
The first-order estimate next to it is the attribution selector's score
(`unlearn.selection.attribution.attribution_scores`, ∇ℓ_i · ∇E at the original weights) times the
run's first-order coefficients (`first_order_coefficients`), so both are in the same units.

- **LDS** (linear datamodeling score, Ilyas & Engstrom 2025): for random subsets S of the scored
  tokens (`drop_fraction` of them), the run is repeated with their weights at 0 and the target's
  change measured; an estimate predicts the change as −Σ_{i∈S} dE/dw_i (w_i goes from 1 to 0).
  The Spearman (the LDS) and Pearson correlations over the subsets, and the least-squares slope
  of measured on predicted (1 when the prediction is right in size too).
- **Ground truth**: the forget tokens whose training most lowers the dev loss (most negative
  dE/dw; highest first-order score), the top `fraction` of them and as many as there are value
  tokens, scored by precision and recall against the value tokens (the facts' spans).

Writes magic_attribution.json (command, machine, git SHA, settings, numbers, timings) and
magic_attribution.md to --results.

Commands:
    python -m benchmarks.magic_attribution        # default world: about 15 minutes on 2 CPU cores
    python -m benchmarks.magic_attribution --world_preset tiny --results /tmp/magic  # smoke test
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from simple_parsing import parse
from torch import Tensor

from unlearn.config import DataConfig, ModelConfig
from unlearn.data import tokenize_documents
from unlearn.experiment import load_setup
from unlearn.provenance import git_sha, machine, portable_path, portable_paths
from unlearn.selection import AttributionSettings, SelectionInputs, mask_quality
from unlearn.selection.attribution import attribution_scores
from unlearn.selection.base import selectable, top_fraction, unflatten
from unlearn.selection.magic import (
    MagicSettings,
    answer_rows,
    first_order_coefficients,
    metagradients,
    retrained_losses,
)
from unlearn.toyworld.config import WorldPreset
from unlearn.toyworld.world import DEV

N_SUBSETS = {"default": 40, "tiny": 12}
"""Drop subsets of the LDS by world preset (without --n_subsets)."""


@dataclass
class Config:
    """MAGIC attribution benchmark: LDS against retraining, and precision/recall of value tokens."""

    world_preset: WorldPreset = "default"
    """Toy-world preset."""
    n_forget_docs: int = 800
    """Candidate forget documents (attack split), spread evenly over the corpus."""
    n_retain_docs: int = 800
    """Candidate retain documents, spread evenly over the corpus."""
    magic: MagicSettings = field(default_factory=MagicSettings)
    """The attributed run (default: one epoch of the candidates, 8 + 8 rows a step)."""
    n_subsets: int | None = None
    """Random drop subsets of the LDS (None: 40 on the default world, 12 on the tiny one)."""
    drop_fraction: float = 0.1
    """Share of the scored candidate tokens each subset drops."""
    subset_seed: int = 0
    """Seed of the drop subsets."""
    fraction: float = AttributionSettings().fraction
    """Share of the forget tokens kept for precision and recall (the attribution selector's)."""
    results: str = "benchmarks/results"
    """Where the result files go."""
    device: str = ModelConfig().device
    """Device."""

    def __post_init__(self) -> None:
        if not 0 < self.drop_fraction < 1 or not 0 < self.fraction <= 1:
            raise ValueError("--drop_fraction must be in (0, 1) and --fraction in (0, 1]")
        if min(self.n_forget_docs, self.n_retain_docs) < 1 or (self.n_subsets or 3) < 3:
            raise ValueError("need --n_forget_docs, --n_retain_docs >= 1 and --n_subsets >= 3")


def spread(docs: Sequence[Any], n: int) -> list[Any]:
    """The first of every len/n documents: n spread through the list (all when fewer)."""
    if n >= len(docs):
        return list(docs)
    return [docs[i * len(docs) // n] for i in range(n)]


def _ranks(values: Tensor) -> Tensor:
    return values.argsort().argsort().double()


def correlations(predicted: Tensor, measured: Tensor) -> dict[str, float]:
    """Spearman (the LDS) and Pearson correlations, and the slope of measured on predicted."""
    p, m = predicted.double(), measured.double()
    pearson = float(torch.corrcoef(torch.stack([p, m]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([_ranks(p), _ranks(m)]))[0, 1])
    centered = p - p.mean()
    slope = float((centered * (m - m.mean())).sum() / centered.square().sum())
    return {"spearman": spearman, "pearson": pearson, "slope": slope}


def first_order_estimates(
    setup: Any,
    docs: list[dict[str, Any]],
    items: dict[str, list[dict[str, Any]]],
    coefficients: Tensor,
) -> dict[str, Tensor]:
    """Per target: −c_i (∇ℓ_i · ∇E), the first-order estimate of dE/dw_i at every candidate."""
    estimates = {}
    for target, target_items in items.items():
        inputs = SelectionInputs(
            model=setup.loaded.hf_model,
            tokenizer=setup.loaded.tokenizer,
            forget_docs=docs,
            retain_docs=[],
            max_len=DataConfig().max_len,
            model_key="",
            dev_items=target_items,
        )
        scores, _ = attribution_scores(AttributionSettings(), inputs)
        estimates[target] = -coefficients * scores.double()
    return estimates


def lds(
    setup: Any,
    cfg: Config,
    rows: tuple[Any, Any, dict[str, Any]],
    estimates: dict[str, dict[str, Tensor]],
    base: dict[str, float],
    scored: Tensor,
) -> dict[str, Any]:
    """Retrain with random subsets dropped; each estimator's correlations, per target."""
    forget, retain, targets = rows
    n_subsets = cfg.n_subsets or N_SUBSETS[cfg.world_preset]
    generator = torch.Generator().manual_seed(cfg.subset_seed)
    candidates = scored.nonzero().squeeze(1)
    n_drop = round(cfg.drop_fraction * len(candidates))
    measured: dict[str, list[float]] = {target: [] for target in targets}
    predicted = {name: {t: [] for t in targets} for name in estimates}
    start = time.perf_counter()
    for _ in range(n_subsets):
        dropped = candidates[torch.randperm(len(candidates), generator=generator)[:n_drop]]
        weights = torch.ones(len(scored), dtype=torch.float64)
        weights[dropped] = 0
        losses = retrained_losses(
            setup.loaded.hf_model, forget, retain, targets, cfg.magic, weights
        )
        for target in targets:
            measured[target].append(losses[target] - base[target])
            for name, scores in estimates.items():
                predicted[name][target].append(-float(scores[target][dropped].sum()))
    out: dict[str, Any] = {
        "n_subsets": n_subsets,
        "n_dropped": n_drop,
        "retrain_seconds": (time.perf_counter() - start) / n_subsets,
        "measured": measured,
    }
    for name, by_target in predicted.items():
        out[name] = {
            target: {
                **correlations(torch.tensor(values), torch.tensor(measured[target])),
                "predicted": values,
            }
            for target, values in by_target.items()
        }
    return out


def ground_truth(
    forget: Any, helpful: dict[str, Tensor], fraction: float
) -> dict[str, dict[str, Any]]:
    """Precision and recall of each estimator's most helpful forget tokens.

    The top `fraction` of them and as many as there are value tokens, next to the value tokens
    themselves and to all tokens.
    """
    truth = forget.value_masks
    lengths = [len(row) for row in forget.ids]
    allowed = selectable(forget)
    n_values = sum(map(sum, truth))
    value_share = n_values / sum(lengths)
    rows = {
        "values": mask_quality(truth, truth).as_dict(),
        "all tokens": mask_quality([[True] * n for n in lengths], truth).as_dict(),
    }
    for name, scores in helpful.items():
        for label, share in ((f"top {fraction:g}", fraction), ("top #values", value_share)):
            keep = top_fraction(scores, share, allowed)
            rows[f"{name}, {label}"] = mask_quality(unflatten(keep, lengths), truth).as_dict()
    return rows


def helpful_shares(forget: Any, helpful: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per estimator: the shares of value tokens and of other tokens that help the forget domain.

    A token helps when its training lowers the forget dev loss (the scores given are −dE/dw).
    """
    values = torch.tensor([v for row in forget.value_masks for v in row])
    others = selectable(forget) & ~values
    return {
        name: {
            "values": float((scores[values] > 0).double().mean()),
            "other tokens": float((scores[others] > 0).double().mean()),
        }
        for name, scores in helpful.items()
    }


def run(cfg: Config) -> dict[str, Any]:
    """Attribute, retrain for the LDS, score against the value tokens; the record."""
    setup = load_setup(ModelConfig(world_preset=cfg.world_preset, device=cfg.device), DataConfig())
    setup.loaded.hf_model.float()
    tokenizer, max_len = setup.loaded.tokenizer, DataConfig().max_len
    forget_docs = spread(setup.forget_docs, cfg.n_forget_docs)
    retain_docs = spread(setup.retain_docs, cfg.n_retain_docs)
    forget = tokenize_documents(tokenizer, forget_docs, max_len)
    retain = tokenize_documents(tokenizer, retain_docs, max_len)
    items = {
        "forget_dev": [i for splits in setup.items.values() for i in splits[DEV]],
        "retain": [i for splits in setup.items.values() for i in splits["retain"]],
    }
    targets = {name: answer_rows(tokenizer, rows, max_len) for name, rows in items.items()}

    start = time.perf_counter()
    result = metagradients(setup.loaded.hf_model, forget, retain, targets, cfg.magic)
    magic_seconds = time.perf_counter() - start
    coefficients = first_order_coefficients(forget, retain, cfg.magic)
    start = time.perf_counter()
    first_order = first_order_estimates(setup, forget_docs + retain_docs, items, coefficients)
    first_order_seconds = time.perf_counter() - start
    estimates = {"magic": result.scores, "first_order": first_order}

    scored = coefficients > 0  # tokens the run trained on (BOS and unvisited rows excluded)
    base = result.losses
    n_forget = result.n_forget_tokens
    retain_dev = result.retain_scores("forget_dev")
    helpful = {name: -scores["forget_dev"][:n_forget] for name, scores in estimates.items()}
    assert setup.world is not None
    return {
        "world": portable_path(setup.world.root),
        "n_forget_docs": len(forget),
        "n_retain_docs": len(retain),
        "n_tokens": len(scored),
        "n_scored_tokens": int(scored.sum()),
        "n_target_items": {name: len(rows) for name, rows in items.items()},
        "losses_before": result.initial_losses,
        "losses_after": base,
        "magic": {**result.info, "seconds": magic_seconds},
        "first_order_seconds": first_order_seconds,
        "detractor_share": {
            "retain": float((retain_dev[scored[n_forget:]] > 0).double().mean()),
            "forget": float((-helpful["magic"][scored[:n_forget]] > 0).double().mean()),
        },
        "lds": lds(setup, cfg, (forget, retain, targets), estimates, base, scored),
        "ground_truth": ground_truth(forget, helpful, cfg.fraction),
        "helpful_shares": helpful_shares(forget, helpful),
    }


def _provenance(cfg: Config) -> dict[str, Any]:
    sha = git_sha()
    return {
        "command": ("python -m benchmarks.magic_attribution " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": sha.removesuffix("+dirty"),
        "dirty": sha.endswith("+dirty"),
        "machine": machine(),
        "config": portable_paths(asdict(cfg)),
    }


def markdown(record: dict[str, Any]) -> str:
    """magic_attribution.md from magic_attribution.json."""
    magic, lds_ = record["magic"], record["lds"]
    lines = [
        f"# MAGIC attribution on the {record['config']['world_preset']} toy world",
        "",
        f"Command: `{record['command']}` at {record['git_sha'][:7]}"
        f"{' (dirty tree)' if record['dirty'] else ''}; machine: "
        f"{record['machine']['platform']}, {record['machine']['cpu_threads']} CPU threads. "
        f"{record['n_forget_docs']} forget (attack) + {record['n_retain_docs']} retain candidate "
        f"documents, {record['n_scored_tokens']} trained tokens; {magic['num_steps']} SGD steps "
        f"(momentum); forget dev loss {record['losses_before']['forget_dev']:.4f} → "
        f"{record['losses_after']['forget_dev']:.4f}, retain loss "
        f"{record['losses_before']['retain']:.4f} → {record['losses_after']['retain']:.4f}. "
        f"Metagradient: {magic['seconds']:.0f} s ({magic['seconds_per_step']:.2f} s a step, "
        f"{magic['states_kept']} states of {magic['bytes_per_state'] / 2**20:.1f} MiB kept); "
        f"a retraining {lds_['retrain_seconds']:.1f} s.",
        "",
        f"## LDS: {lds_['n_subsets']} subsets of {lds_['n_dropped']} tokens dropped",
        "",
        "| estimate | target | Spearman (LDS) | Pearson | slope measured/predicted |",
        "|---|---|---|---|---|",
    ]
    for name in ("magic", "first_order"):
        for target, row in lds_[name].items():
            lines.append(
                f"| {name} | {target} | {row['spearman']:.3f} | {row['pearson']:.3f} | "
                f"{row['slope']:.3f} |"
            )
    lines += [
        "",
        "## Most helpful forget tokens (training lowers the dev loss) against the value tokens",
        "",
        "| tokens | fraction | precision | recall | F1 |",
        "|---|---|---|---|---|",
    ]
    for name, row in record["ground_truth"].items():
        lines.append(
            f"| {name} | {row['fraction']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['f1']:.3f} |"
        )
    share = record["detractor_share"]
    lines += [
        "",
        f"Detractors (dE_dev/dw > 0: training raises the forget dev loss): {share['retain']:.1%} "
        f"of the trained retain tokens, {share['forget']:.1%} of the trained forget tokens. "
        "Helpful (training lowers it): "
        + "; ".join(
            f"{name} {s['values']:.1%} of the value tokens, {s['other tokens']:.1%} of the others"
            for name, s in record["helpful_shares"].items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict[str, Any]:
    """Run the benchmark and write its result files."""
    results = Path(cfg.results).expanduser()
    results.mkdir(parents=True, exist_ok=True)
    record = {**_provenance(cfg), **run(cfg)}
    (results / "magic_attribution.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "magic_attribution.md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
