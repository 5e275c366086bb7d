r"""Combine leaderboard runs made at different commits into one leaderboard.

A full leaderboard run takes hours; when methods are added, their rows are run on their own
(`python -m benchmarks.leaderboard --methods <new> --results <dir>`) and joined to the committed
leaderboard here instead of rerunning every method. The first file's controls (the unfiltered model
and the filtered twin under the same attack suite) are kept and every row's metrics and intervals
are recomputed from the recorded per-item credit (`unlearn.tamper_stats.bootstrap_metrics`, whose
resampling does not depend on which rows are present, so a row keeps its numbers). Each further
file's own controls must agree with the first's within `--control_tolerance` at every step of every
attack and seed (they differ only by floating-point drift between thread counts), and everything
that defines a row must be the same: world preset, suite, steps, seeds and test items. Rows come in
registry order. Which commit each row ran at is written into leaderboard.json (`sources`,
`row_sources`) and leaderboard.md.

Command:
    python -m benchmarks.leaderboard_combine benchmarks/results/leaderboard.json \
        /tmp/baselines/leaderboard.json --results benchmarks/results
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from simple_parsing import field, parse

from benchmarks.leaderboard import FILTERED, UNFILTERED, write_results
from unlearn.config import from_dict
from unlearn.methods import REGISTRY
from unlearn.provenance import git_sha
from unlearn.tamper import AttackSettings
from unlearn.tamper_stats import Curves, bootstrap_metrics

MUST_AGREE = ("world_preset", "suite", "seeds", "num_steps")
"""Leaderboard settings every combined file must share (besides steps, suite and test items)."""


@dataclass
class Config:
    """Join leaderboard.json files into one leaderboard."""

    files: list[str] = field(positional=True, nargs="+")
    """leaderboard.json files; the first one's controls are kept."""
    results: str = "benchmarks/results"
    """Where the combined leaderboard.{json,md,png} go."""
    control_tolerance: float = 0.05
    """Largest allowed difference of a file's control accuracies from the first file's."""


def control_difference(first: dict[str, Any], other: dict[str, Any]) -> float:
    """Largest absolute difference of the control accuracies, over steps, attacks and seeds."""
    worst = 0.0
    for label in (UNFILTERED, FILTERED):
        a = np.array([[[r["forget_acc"] for r in att] for att in s] for s in first[label]])
        b = np.array([[[r["forget_acc"] for r in att] for att in s] for s in other[label]])
        if a.shape != b.shape:
            raise ValueError(f"{label} records have shape {b.shape}, the first file's {a.shape}")
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def _suite(payload: dict[str, Any]) -> dict[str, AttackSettings]:
    """The attacks of a payload's suite as settings (fields added since it ran take defaults)."""
    return {name: from_dict(AttackSettings, s) for name, s in payload["suite"].items()}


def combine(payloads: list[dict[str, Any]], tolerance: float, n_boot: int) -> dict[str, Any]:
    """One leaderboard payload from several (module docstring).

    Raises:
        ValueError: Files that differ in a setting that defines a row, controls further apart
            than `tolerance`, or a method row in more than one file.
    """
    first = payloads[0]
    records = {label: first["records"][label] for label in (UNFILTERED, FILTERED)}
    wall: dict[str, Any] = {}
    sources, row_sources = [], {}
    for i, payload in enumerate(payloads):
        if payload.get("format") != 2:
            raise ValueError(f"file {i + 1} is not a format-2 leaderboard.json; rerun it")
        for name in MUST_AGREE:
            if payload["config"][name] != first["config"][name]:
                raise ValueError(
                    f"file {i + 1} has {name}={payload['config'][name]!r}, the first file "
                    f"{first['config'][name]!r}; combine only runs of the same leaderboard"
                )
        if _suite(payload) != _suite(first) or payload["steps"] != first["steps"]:
            raise ValueError(f"file {i + 1} has another attack suite or evaluated steps")
        if payload["n_test_items"] != first["n_test_items"]:
            raise ValueError(f"file {i + 1} scores {payload['n_test_items']} test items")
        difference = control_difference(first["records"], payload["records"])
        if difference > tolerance:
            raise ValueError(
                f"file {i + 1}'s controls differ from the first file's by {difference:.3f} "
                f"(> --control_tolerance {tolerance}): they were not attacked the same way"
            )
        methods = [label for label in payload["records"] if label not in (UNFILTERED, FILTERED)]
        for label in methods:
            if label in row_sources:
                raise ValueError(f"row {label!r} is in more than one file; keep one of them")
            records[label] = payload["records"][label]
            wall[label] = payload["wall_seconds"][label]
            row_sources[label] = payload.get("row_sources", {}).get(label, payload["git_sha"])
        if "sources" in payload:  # an earlier combination: its runs are listed as they were
            if i > 0:
                raise ValueError(f"file {i + 1} is a combined leaderboard; give it first")
            sources.extend(payload["sources"])
            continue
        sources.append(
            {key: payload[key] for key in ("command", "git_sha", "dirty", "machine", "seconds")}
            | {"methods": methods, "control_difference": difference}
        )
    # Rows in registry order (the leaderboard's), whichever file they came from.
    ranked = sorted(row_sources, key=lambda m: list(REGISTRY).index(m) if m in REGISTRY else 1e9)
    records = {label: records[label] for label in (UNFILTERED, FILTERED, *ranked)}
    wall = {label: wall[label] for label in ranked}
    row_sources = {label: row_sources[label] for label in ranked}
    curves = {label: Curves.from_records(runs) for label, runs in records.items()}
    sha = git_sha()
    return {
        "format": 2,
        "command": ("python -m benchmarks.leaderboard_combine " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": sha.removesuffix("+dirty"),
        "dirty": sha.endswith("+dirty"),
        "machine": first["machine"],
        "config": first["config"] | {"methods": list(row_sources)},
        "suite": first["suite"],
        "steps": first["steps"],
        "n_test_items": first["n_test_items"],
        "rows": bootstrap_metrics(curves, FILTERED, UNFILTERED, n_boot=n_boot),
        "wall_seconds": wall,
        "seconds": sum(source["seconds"] for source in sources),
        "sources": sources,
        "row_sources": row_sources,
        "records": records,
    }


def main(cfg: Config) -> dict[str, Any]:
    """Read the files, combine them and write the leaderboard."""
    payloads = [json.loads(Path(f).expanduser().read_text()) for f in cfg.files]
    n_boot = payloads[0]["config"]["n_boot"]
    payload = combine(payloads, cfg.control_tolerance, n_boot)
    write_results(payload, Path(cfg.results))
    return payload


if __name__ == "__main__":
    main(parse(Config))
