"""Token selection on the toy world: every selector's mask against the ground-truth value tokens.

Default mode: every selector of `unlearn.selection.SELECTORS`, with its default settings, masks the
attack-split forget documents that unlearning trains on (tokenized as training rows), and each
mask is scored token by token against those documents' value tokens (their "facts" spans): the
fraction of tokens selected, precision, recall and F1, next to two reference rows, "values" (the
ground truth itself) and "all tokens" (no mask). Masks come from the selection cache
(`unlearn.selection.cache`), so a rerun with unchanged inputs and code only re-scores them; the
seconds a selection took are those recorded when it was computed. Writes token_selection.json
(rows, settings, what each selector chose, command, machine, git SHA) and token_selection.md.

`--tune`: the sweep behind the selectors' defaults, run on **dev** documents only: the
pretraining documents of the forget dev entities (held-out pathogens of the dev half; never a test
entity, never an attack-split document), with the retain corpus as the other class and the forget
dev items as attribution's target (those items are about the same entities, so attribution's dev
F1 is optimistic; only its fraction is tuned). Each selector's settings grid (`GRIDS`) is scored
by F1 against the dev documents' value tokens, and the best setting (ties: the first in grid
order) is the default committed in its settings class; `tests/benchmarks/test_token_selection.py`
fails when a default and token_selection_dev.json disagree. Layers are recorded as the defaults
write them: 0 and 1 from the front, deeper blocks from the end (-2, -1), so that a default is a
block of the 2-block tiny world too.

Commands:
    python -m benchmarks.token_selection                  # a few minutes on 2 CPU cores
    python -m benchmarks.token_selection --tune           # the dev sweep, about 15 minutes
    python -m benchmarks.token_selection --world_preset tiny --results /tmp/ts   # smoke test
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from simple_parsing import parse

from unlearn.config import DataConfig, ModelConfig
from unlearn.experiment import Setup, load_setup, model_identity, selection_inputs
from unlearn.models import model_key
from unlearn.provenance import git_sha, machine, portable_path, portable_paths
from unlearn.selection import (
    SELECTORS,
    ActivationSettings,
    AttributionSettings,
    ProbeSettings,
    SaeSettings,
    SelectionInputs,
    cached_selection,
    mask_quality,
)
from unlearn.selection.activations import cosine_scores
from unlearn.selection.attribution import attribution_scores
from unlearn.selection.base import selectable, top_fraction, unflatten
from unlearn.selection.linear_probe import probe_scores
from unlearn.selection.sae import sae_counts, sae_firing
from unlearn.toyworld.config import WorldPreset
from unlearn.toyworld.world import DEV

FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
"""Shares of tokens the top-fraction selectors are tuned over."""
GRIDS: dict[str, dict[str, Sequence[Any]]] = {
    "activations": {"layer": (0, 1, -2, -1), "center": (True, False), "fraction": FRACTIONS},
    "probe": {"layer": (0, 1, -2, -1), "fraction": FRACTIONS},
    "sae": {"layer": (0, 1, -2, -1), "n_latents": (8, 16, 32, 64, 128), "min_active": (1, 2, 3)},
    "attribution": {"fraction": FRACTIONS},
}
"""The settings each selector is tuned over (the keyword selector has nothing to tune)."""


@dataclass
class Config:
    """Token selection benchmark (or, with --tune, the dev sweep of the selectors' defaults)."""

    tune: bool = False
    """Run the dev sweep instead (writes token_selection_dev.{json,md})."""
    world_preset: WorldPreset = "default"
    """Toy-world preset."""
    selectors: list[str] = dataclasses.field(default_factory=lambda: list(SELECTORS))
    """Selectors to run."""
    results: str = "benchmarks/results"
    """Where the result files go."""
    device: str = ModelConfig().device
    """Device."""

    def __post_init__(self) -> None:
        unknown = set(self.selectors) - set(SELECTORS)
        if unknown:
            raise ValueError(f"unknown selectors {sorted(unknown)}; choose from {list(SELECTORS)}")


def _inputs(setup: Setup, forget_docs: list[dict[str, Any]] | None = None) -> SelectionInputs:
    """The selection inputs of a toy-world setup (its attack documents unless others are given)."""
    assert setup.world is not None
    # The key a training run's selection has (`model_identity`), so both share cached masks.
    run_inputs = {"inputs": {"model": model_key(str(setup.world.model_dir()))}}
    key = model_identity(run_inputs, ModelConfig())
    model = setup.loaded.hf_model.float()
    inputs = selection_inputs(setup, DataConfig(), key, model=model)
    if forget_docs is not None:
        inputs = dataclasses.replace(inputs, forget_docs=forget_docs)
    return inputs


def _row(quality: Any, seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    return {**quality.as_dict(), "seconds": seconds, **extra}


def benchmark_rows(inputs: SelectionInputs, selectors: Sequence[str]) -> dict[str, dict]:
    """Every selector's default mask scored against the value tokens, plus the reference rows."""
    truth = inputs.forget.value_masks
    rows = {
        "values": _row(mask_quality(truth, truth)),
        "all tokens": _row(mask_quality([[True] * len(r) for r in truth], truth)),
    }
    for name in selectors:
        chosen = SELECTORS[name]
        mask, cached = cached_selection(chosen, chosen.settings(), inputs)
        quality = mask_quality(mask.rows, truth)
        rows[name] = _row(
            quality,
            mask.meta["seconds"],
            settings=mask.meta["settings"],
            info=mask.meta["info"],
            cached=cached,
        )
        print(f"{name:<12} {quality.fraction:6.3f} {quality.precision:6.3f} {quality.recall:6.3f}")
    return rows


def _f1(keep: torch.Tensor, inputs: SelectionInputs) -> float:
    lengths = [len(row) for row in inputs.forget.ids]
    return mask_quality(unflatten(keep, lengths), inputs.forget.value_masks).f1


def _by_fraction(scores: torch.Tensor, inputs: SelectionInputs) -> dict[float, float]:
    allowed = selectable(inputs.forget)
    return {f: _f1(top_fraction(scores, f, allowed), inputs) for f in FRACTIONS}


def _sweep_sae(layer: int, inputs: SelectionInputs) -> list[tuple[dict, float]]:
    forget, retain, info = sae_firing(SaeSettings(layer=layer), inputs)
    allowed = selectable(inputs.forget)
    scored = []
    min_rate = SaeSettings().min_rate
    for n_latents in GRIDS["sae"]["n_latents"]:
        counts, _ = sae_counts(
            forget, retain, allowed, info["n_latents_total"], n_latents, min_rate
        )
        for min_active in GRIDS["sae"]["min_active"]:
            setting = {"layer": layer, "n_latents": n_latents, "min_active": min_active}
            scored.append((setting, _f1((counts >= min_active) & allowed, inputs)))
    return scored


def sweep(name: str, inputs: SelectionInputs) -> list[tuple[dict, float]]:
    """(setting, dev F1) for every setting of a selector's grid, in grid order."""
    grid = GRIDS[name]
    scored: list[tuple[dict, float]] = []
    if name == "attribution":
        scores, _ = attribution_scores(AttributionSettings(), inputs)
        return [({"fraction": f}, f1) for f, f1 in _by_fraction(scores, inputs).items()]
    for layer in grid["layer"]:
        if name == "sae":
            scored += _sweep_sae(layer, inputs)
            continue
        for center in grid.get("center", (None,)):
            if name == "activations":
                scores, _ = cosine_scores(ActivationSettings(layer=layer, center=center), inputs)
                base = {"layer": layer, "center": center}
            else:
                scores, _ = probe_scores(ProbeSettings(layer=layer), inputs)
                base = {"layer": layer}
            by_fraction = _by_fraction(scores, inputs)
            scored += [({**base, "fraction": f}, f1) for f, f1 in by_fraction.items()]
    return scored


def dev_documents(setup: Setup) -> list[dict[str, Any]]:
    """Pretraining documents of the forget dev entities (no test entity, no attack document)."""
    assert setup.world is not None
    dev = set(setup.world.heldout_entities()[DEV])
    return [doc for doc in setup.world.corpus("pretrain_forget") if doc["entity"] in dev]


def tune(cfg: Config, setup: Setup) -> dict[str, Any]:
    """The dev sweep: every setting's dev F1 and the chosen one, per selector."""
    docs = dev_documents(setup)
    inputs = _inputs(setup, docs)
    results = {}
    for name in cfg.selectors:
        if name not in GRIDS:
            continue
        start = time.perf_counter()
        scored = sweep(name, inputs)
        best = max(range(len(scored)), key=lambda i: (scored[i][1], -i))
        results[name] = {
            "grid": [{"setting": s, "f1": f1} for s, f1 in scored],
            "chosen": scored[best][0],
            "f1": scored[best][1],
            "seconds": time.perf_counter() - start,
        }
        print(f"{name}: {scored[best][0]} (dev F1 {scored[best][1]:.3f})")
    return {"n_dev_documents": len(docs), "selectors": results}


def _provenance(cfg: Config, setup: Setup) -> dict[str, Any]:
    sha = git_sha()
    assert setup.world is not None
    return {
        "command": ("python -m benchmarks.token_selection " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": sha.removesuffix("+dirty"),
        "dirty": sha.endswith("+dirty"),
        "machine": machine(),
        "world": portable_path(setup.world.root),
        "config": portable_paths(asdict(cfg)),
    }


def markdown(record: dict[str, Any]) -> str:
    """token_selection.md from token_selection.json."""
    lines = [
        f"# Token selection on the {record['config']['world_preset']} toy world",
        "",
        f"Command: `{record['command']}` at {record['git_sha'][:7]}"
        f"{' (dirty tree)' if record['dirty'] else ''}; machine: "
        f"{record['machine']['platform']}, {record['machine']['cpu_threads']} CPU threads. "
        f"{record['n_documents']} attack-split forget documents ({record['n_tokens']} tokens, BOS "
        "included); each selector with its default settings, scored token by token against the "
        "documents' value tokens (the ground truth). Seconds: the selection's compute time when it "
        "was made (the cache reuses it).",
        "",
        "| selector | fraction selected | precision | recall | F1 | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in record["rows"].items():
        seconds = "–" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(
            f"| {name} | {row['fraction']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['f1']:.3f} | {seconds} |"
        )
    lines += ["", "Default settings:", ""]
    lines += [
        f"- {name}: `{row['settings']}`"
        for name, row in record["rows"].items()
        if "settings" in row
    ]
    return "\n".join(lines) + "\n"


def dev_markdown(record: dict[str, Any]) -> str:
    """token_selection_dev.md from token_selection_dev.json."""
    lines = [
        f"# Token selectors tuned on dev documents ({record['config']['world_preset']} toy world)",
        "",
        f"Command: `{record['command']}` at {record['git_sha'][:7]}"
        f"{' (dirty tree)' if record['dirty'] else ''}. {record['n_dev_documents']} pretraining "
        "documents of the forget dev entities; F1 against their value tokens; the best setting "
        "of each grid is the committed default.",
        "",
        "| selector | chosen | dev F1 | settings tried |",
        "|---|---|---|---|",
    ]
    for name, result in record["selectors"].items():
        lines.append(
            f"| {name} | `{result['chosen']}` | {result['f1']:.3f} | {len(result['grid'])} |"
        )
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict[str, Any]:
    """Run the benchmark (or the dev sweep) and write its result files."""
    setup = load_setup(ModelConfig(world_preset=cfg.world_preset, device=cfg.device), DataConfig())
    results = Path(cfg.results).expanduser()
    results.mkdir(parents=True, exist_ok=True)
    if cfg.tune:
        record = {**_provenance(cfg, setup), **tune(cfg, setup)}
        (results / "token_selection_dev.json").write_text(json.dumps(record, indent=2) + "\n")
        (results / "token_selection_dev.md").write_text(dev_markdown(record))
        return record
    inputs = _inputs(setup)
    rows = benchmark_rows(inputs, cfg.selectors)
    record = {
        **_provenance(cfg, setup),
        "n_documents": len(inputs.forget),
        "n_tokens": rows["values"]["n_tokens"],
        "rows": rows,
    }
    (results / "token_selection.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "token_selection.md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
