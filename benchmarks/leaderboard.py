"""Method leaderboard: every unlearning recipe on the toy world, then the standard tamper attack.

Each recipe runs with its committed defaults; its model is attacked with the "full" preset (full
fine-tune on the attack split, lr 3e-4 constant, 300 steps of 16 x 128 tokens); the unfiltered model
and the filtered twin are attacked the same way and appear as rows. Columns: held-out forget and
retain accuracy after unlearning, held-out forget accuracy after 25, 100 and 300 attack steps,
the peak, the steps until held-out forget accuracy first exceeds the filtered twin's by 10 points
("held" if never), whether the model is collapsed, and wall times. Writes leaderboard.json,
leaderboard.md and leaderboard.png (all recovery curves) into --results, with the command and the
machine.
Runs go to --out; a rerun reuses finished unlearning runs and attacks.

Commands:
    python -m benchmarks.leaderboard                       # ~25 min on 2 CPU cores
    python -m benchmarks.leaderboard --methods lens_unlearn circuit_breakers
    python -m benchmarks.leaderboard --world_preset tiny --unlearn_args "--num_steps 2" \
        --num_steps 2 --out /tmp/lb --results /tmp/lb     # smoke test
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from simple_parsing import parse

from recipes.retain_ablation import (
    UNLEARNING_RECIPES,
    markdown_table,
    row,
    unlearn_and_attack,
)
from unlearn.experiment import ModelConfig
from unlearn.plots import plot_recovery
from unlearn.provenance import git_sha, machine
from unlearn.tamper import ATTACK_PRESETS
from unlearn.tamper_report import CHANCE, FILTERED, UNFILTERED, summarize


@dataclass
class Config:
    """Leaderboard of the unlearning recipes under the standard tamper attack."""

    methods: list[str] = field(default_factory=lambda: list(UNLEARNING_RECIPES))
    """Recipes to run (modules of `recipes`)."""
    world_preset: Literal["default", "tiny"] = "default"
    """Toy-world preset."""
    unlearn_args: str = ""
    """Extra flags for every recipe, as one string."""
    preset: Literal["full", "lora", "repair_then_attack", "benign"] = "full"
    """Tamper preset."""
    num_steps: int | None = None
    """Override the attack's steps."""
    out: str = "runs/leaderboard"
    """Where the runs go."""
    results: str = "benchmarks/results"
    """Where leaderboard.{json,md,png} go."""
    device: str = ModelConfig().device
    """Device."""


def main(cfg: Config) -> dict[str, Any]:
    """Unlearn with every recipe, attack, and write the leaderboard."""
    unknown = set(cfg.methods) - set(UNLEARNING_RECIPES)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {UNLEARNING_RECIPES}")
    settings = ATTACK_PRESETS[cfg.preset]
    if cfg.num_steps is not None:
        settings = replace(settings, num_steps=cfg.num_steps)
    args = ["--world_preset", cfg.world_preset, *shlex.split(cfg.unlearn_args)]
    out, results_dir = Path(cfg.out).expanduser(), Path(cfg.results).expanduser()

    start = time.perf_counter()
    runs = {
        name: unlearn_and_attack(name, args, out / name, settings, cfg.device)
        for name in cfg.methods
    }
    controls = next(iter(runs.values()))["tamper"]["controls"]
    ceiling, floor = controls[UNFILTERED], controls[FILTERED]
    original_retain = ceiling[0]["retain_acc"]
    curves = {"unfiltered": ceiling, "filtered twin": floor} | {
        name: run["tamper"]["records"] for name, run in runs.items()
    }
    rows = []
    for label, records in curves.items():
        entry = row(label, records, summarize(records, ceiling, floor, original_retain, CHANCE))
        run = runs.get(label)
        entry["unlearn_seconds"] = run["unlearn_seconds"] if run else None
        entry["attack_seconds"] = run["attack_seconds"] if run else None
        rows.append(entry)

    command = "python -m benchmarks.leaderboard " + shlex.join(sys.argv[1:])
    payload = {
        "command": command.strip(),
        "machine": machine(),
        "git_sha": git_sha(),
        "config": asdict(cfg),
        "attack": asdict(settings),
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "leaderboard.json").write_text(json.dumps(payload, indent=2) + "\n")
    times = "".join(
        f"| {r['model']} | {r['unlearn_seconds']:.0f} | {r['attack_seconds']:.0f} |\n"
        for r in rows
        if r["unlearn_seconds"] is not None
    )
    (results_dir / "leaderboard.md").write_text(
        f"# Method leaderboard ({cfg.world_preset} toy world)\n\n"
        f"Command: `{payload['command']}` at {payload['git_sha'][:7]}; machine: "
        f"{payload['machine']['platform']}, {payload['machine']['cpu_threads']} CPU threads, "
        f"torch {payload['machine']['torch']}.\n\n"
        f"Attack: {settings.describe()}. Accuracies in % on the held-out forget split (entities "
        'never in the attack data) and on retain; "forget @N" is after N attack steps; chance '
        "is 25%.\n\n"
        + markdown_table(rows)
        + "\n| method | unlearning wall s | attack wall s |\n|---|---|---|\n"
        + times
    )
    plot_recovery(
        curves,
        results_dir / "leaderboard.png",
        title=f"Leaderboard, {cfg.world_preset} toy world: {settings.describe()}",
        chance=CHANCE,
        original_level=ceiling[0]["forget_acc"],
    )
    print(f"\n{markdown_table(rows)}\nwrote {results_dir / 'leaderboard.md'}")
    return payload


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
