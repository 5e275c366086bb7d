"""Compute accounting of the leaderboard: each row's FLOPs against pretraining the filtered twin.

A defence is worth its compute only if it is cheaper than what it imitates: a model pretrained
without the forget domain. For every row of a leaderboard (its method and the flags it ran with,
read from leaderboard.json), the recipe runs once (seed 0, `--count_flops true --eval_every 0`,
`unlearn.compute`) with cold caches (a fresh `$UNLEARN_HOME` that links only the toy worlds, so
MAGIC scores and token masks are computed and counted); its preparation is counted whole and its
training over the first `--sample_steps` steps of every phase, scaled to the row's steps (every
step has the same batch shapes up to padding). The filtered twin's pretraining is one measured
step times its schedule (`unlearn.compute.pretraining_flops`). FLOPs are matrix-multiply and
attention FLOPs, forward and backward, frozen models' forwards included, evaluations excluded.

Writes compute.{json,md} and compute_vs_excess.png (the leaderboard's worst-case excess over the
filtered twin, with its interval, against compute) into --results, and rewrites the leaderboard's
files there with a compute column (`compute` in leaderboard.json). Rerun it after
`benchmarks.leaderboard_combine`, which does not carry the column over.

    python -m benchmarks.compute                       # every row of the committed leaderboard
    python -m benchmarks.compute --rows npo detractor  # only these rows (others kept as counted)
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from simple_parsing import parse  # noqa: E402

from benchmarks.leaderboard import (  # noqa: E402
    FILTERED,
    UNFILTERED,
    seed_flags,
    write_results,
)
from recipes import unlearn as generic  # noqa: E402
from unlearn.compute import pretraining_flops  # noqa: E402
from unlearn.methods import REGISTRY, registration  # noqa: E402
from unlearn.models import load_model  # noqa: E402
from unlearn.provenance import git_sha, machine, portable_paths  # noqa: E402
from unlearn.toyworld import build_world, get_preset  # noqa: E402
from unlearn.toyworld.world import unlearn_home  # noqa: E402


@dataclass
class Config:
    """FLOPs of every leaderboard row against the filtered twin's pretraining."""

    leaderboard: str = "benchmarks/results/leaderboard.json"
    """The leaderboard whose rows are measured (their methods and flags) and extended."""
    rows: list[str] = field(default_factory=list)
    """Only these row labels (empty: every method row); rows measured earlier are kept."""
    upstream: list[str] = field(default_factory=list)
    """"row=other" pairs: `row` starts from `other`'s models (UNDO's teacher), so its compute
    includes other's (e.g. undo_cb=circuit_breakers)."""
    sample_steps: int = 20
    """Training steps counted per phase; the count is scaled to the row's steps."""
    results: str = "benchmarks/results"
    """Where compute.{json,md}, compute_vs_excess.png and the extended leaderboard go."""
    device: str = "cpu"
    """Device of the runs."""

    def __post_init__(self) -> None:
        if any("=" not in pair for pair in self.upstream):
            raise ValueError(f"--upstream takes row=other pairs, got {self.upstream}")
        if self.sample_steps < 1:
            raise ValueError(f"--sample_steps must be >= 1, got {self.sample_steps}")


def row_recipes(payload: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """Each method row's (method, recipe flags), as the leaderboard ran it.

    From the config of one leaderboard run, or from the commands of a combined one's sources
    (`--methods`, `--unlearn_args`, `--label`).

    Raises:
        ValueError: A row whose method cannot be told from them.
    """
    if "sources" in payload:
        runs = []
        for source in payload["sources"]:
            argv = shlex.split(source["command"])
            runs.append(
                (
                    _list_flag(argv, "--methods"),
                    _flag(argv, "--unlearn_args"),
                    _flag(argv, "--label"),
                )
            )
    else:
        cfg = payload["config"]
        runs = [(cfg["methods"], cfg["unlearn_args"], cfg.get("label"))]
    recipes: dict[str, tuple[str, list[str]]] = {}
    for methods, unlearn_args, label in runs:
        flags = shlex.split(unlearn_args or "")
        if label is not None:
            recipes[label] = (methods[0], flags)
        else:
            recipes.update({name: (name, flags) for name in methods})
    for label in payload["rows"]:
        if label in (UNFILTERED, FILTERED) or label in recipes:
            continue
        if label not in REGISTRY:
            raise ValueError(f"row {label!r}: no run of the leaderboard names its method")
        recipes[label] = (label, [])  # a default leaderboard run: every tuned method
    return {label: recipes[label] for label in payload["rows"] if label in recipes}


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _list_flag(argv: list[str], name: str) -> list[str]:
    if name not in argv:
        return []
    values = []
    for value in argv[argv.index(name) + 1 :]:
        if value.startswith("--"):
            break
        values.append(value)
    return values


def row_steps(method: str, flags: list[str]) -> int:
    """The training steps per phase a row ran (its --num_steps flag, or the method's default)."""
    given = _flag(flags, "--num_steps")
    return int(given) if given is not None else registration(method).training().num_steps


@contextmanager
def cold_caches() -> Any:
    """A fresh $UNLEARN_HOME that links the built toy worlds and holds no other cache."""
    worlds = unlearn_home() / "toyworld"
    previous = os.environ.get("UNLEARN_HOME")
    with tempfile.TemporaryDirectory(prefix="unlearn_compute_") as home:
        (Path(home) / "toyworld").symlink_to(worlds.resolve(), target_is_directory=True)
        os.environ["UNLEARN_HOME"] = home
        try:
            yield Path(home)
        finally:
            if previous is None:
                os.environ.pop("UNLEARN_HOME", None)
            else:
                os.environ["UNLEARN_HOME"] = previous


def measure_row(
    method: str, flags: list[str], preset: str, sample_steps: int, device: str
) -> dict[str, Any]:
    """One run of the row at seed 0 with FLOPs counted; training scaled to the row's steps."""
    steps = row_steps(method, flags)
    counted = min(steps, sample_steps)
    rest = [
        f for i, f in enumerate(flags) if f != "--num_steps" and flags[i - 1 : i] != ["--num_steps"]
    ]
    rest = seed_flags(rest, 0)
    with cold_caches() as home:
        out = home / "run"
        args = ["--method", method, "--world_preset", preset, "--out", str(out), *rest]
        args += ["--num_steps", str(counted), "--eval_every", "0", "--count_flops", "true"]
        args += ["--seed", "0", "--device", device]
        start = time.perf_counter()
        generic.main(args)
        seconds = time.perf_counter() - start
        results = json.loads((out / "results.json").read_text())
    train = results["flops_train"] * steps / counted
    return {
        "method": method,
        "flags": shlex.join(flags),
        "steps": steps,
        "counted_steps": counted,
        "phases": results["num_phases"],
        "flops_prepare": results["flops_prepare"],
        "flops_train": train,
        "flops_own": results["flops_prepare"] + train,
        "flops": results["flops_prepare"] + train,
        "seconds": seconds,
    }


def main(cfg: Config) -> dict[str, Any]:
    """Measure the rows and the filtered twin's pretraining; write the files."""
    board_path = Path(cfg.leaderboard)
    board = json.loads(board_path.read_text())
    preset = board["config"]["world_preset"]
    world = build_world(get_preset(preset), preset=preset)
    twin = load_model(str(world.model_dir("filtered")), device=cfg.device).hf_model
    pretrain = pretraining_flops(twin, world.config)
    results = Path(cfg.results)
    previous_path = results / "compute.json"
    previous = json.loads(previous_path.read_text())["rows"] if previous_path.exists() else {}
    recipes = row_recipes(board)
    unknown = set(cfg.rows) - set(recipes)
    if unknown:
        raise ValueError(f"--rows {sorted(unknown)} are not method rows of {board_path}")
    rows = {}
    for label, (method, flags) in recipes.items():
        if cfg.rows and label not in cfg.rows and label in previous:
            rows[label] = previous[label]
            continue
        print(f"\n== {label}: {method} {shlex.join(flags)}")
        rows[label] = measure_row(method, flags, preset, cfg.sample_steps, cfg.device)
        rows[label]["git_sha"] = git_sha()
    for pair in cfg.upstream:
        label, other = pair.split("=", 1)
        if label not in rows or other not in rows:
            raise ValueError(f"--upstream {pair}: both must be method rows of {board_path}")
        rows[label]["upstream"] = other
        rows[label]["flops"] = rows[label]["flops_own"] + rows[other]["flops"]
    for row in rows.values():
        row["pretraining_fraction"] = row["flops"] / pretrain
    cfg_world = world.config
    payload = {
        "command": ("python -m benchmarks.compute " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": git_sha(),
        "machine": machine(),
        "config": portable_paths(asdict(cfg)),
        "world_preset": preset,
        "pretraining": {
            "flops": pretrain,
            "steps": cfg_world.num_steps,
            "tokens": cfg_world.num_steps * cfg_world.batch_size * cfg_world.n_ctx,
        },
        "leaderboard_sha": board.get("git_sha"),
        "rows": rows,
    }
    results.mkdir(parents=True, exist_ok=True)
    previous_path.write_text(json.dumps(payload, indent=1) + "\n")
    (results / "compute.md").write_text(compute_markdown(payload, board))
    plot_compute_vs_excess(payload, board, results / "compute_vs_excess.png")
    board["compute"] = {label: row["pretraining_fraction"] for label, row in rows.items()}
    board["compute"][FILTERED] = 1.0
    write_results(board, results)
    print((results / "compute.md").read_text())
    return payload


def compute_markdown(payload: dict[str, Any], board: dict[str, Any]) -> str:
    """compute.md: provenance and one line per row (FLOPs, share of pretraining, excess)."""
    pre = payload["pretraining"]
    lines = [
        f"# Compute of the leaderboard's rows ({payload['world_preset']} toy world)\n",
        f"Command: `{payload['command']}` at {payload['git_sha'][:7]}; machine: "
        f"{payload['machine']['platform']}, torch {payload['machine']['torch']}. Rows of the "
        f"leaderboard at {str(payload['leaderboard_sha'])[:7]}.\n",
        "FLOPs: matrix-multiply and attention FLOPs (`torch.utils.flop_counter`), forward and "
        "backward, frozen models' forwards included, evaluations excluded (a row that starts "
        "from another row's models, such as UNDO's teacher, includes that row's FLOPs); one run "
        "per row at "
        "seed 0 with cold caches, preparation counted whole and training counted over the first "
        "steps of each phase (`counted`) and scaled to the row's steps. Pretraining the filtered "
        f"twin: {pre['steps']} steps, {pre['tokens']:,} tokens, {pre['flops']:.3e} FLOPs. "
        "**x pretraining**: the row's FLOPs over the filtered twin's pretraining FLOPs; "
        "**token-equivalents**: the pretraining tokens the same FLOPs buy.\n",
        "| row | flags | steps (counted) | preparation FLOPs | training FLOPs | x pretraining | "
        "token-equivalents | excess max | retain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in payload["rows"].items():
        metrics = board["rows"][label]
        low, high = metrics["excess_max_ci"]
        lines.append(
            f"| {label} | `{row['flags'] or '(defaults)'}` | {row['steps']} x {row['phases']} "
            f"({row['counted_steps']}) | {row['flops_prepare']:.2e} | {row['flops_train']:.2e} | "
            f"{row['pretraining_fraction']:.3f} | "
            f"{row['pretraining_fraction'] * pre['tokens']:,.0f} | "
            f"{100 * metrics['excess_max']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | "
            f"{100 * metrics['retain_pre']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_compute_vs_excess(payload: dict[str, Any], board: dict[str, Any], path: Path) -> None:
    """Worst-case excess over the filtered twin (95% interval) against compute, one point a row."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, row in payload["rows"].items():
        metrics = board["rows"][label]
        low, high = metrics["excess_max_ci"]
        x, y = row["pretraining_fraction"], 100 * metrics["excess_max"]
        ax.errorbar(x, y, yerr=[[y - 100 * low], [100 * high - y]], fmt="o", capsize=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", label="pretraining the filtered twin")
    ax.axhline(5.0, color="grey", linestyle=":", label="goal: excess <= 5 points")
    ax.set_xscale("log")
    ax.set_xlabel("compute (x the filtered twin's pretraining FLOPs)")
    ax.set_ylabel("worst-case excess over the filtered twin (points)")
    ax.set_title(f"Excess under attack against compute ({payload['world_preset']} toy world)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
