"""Leaderboard: every unlearning recipe over seeds, attacked by a suite, vs the filtered twin.

For each method and unlearning seed, the recipe runs with its committed defaults (`--seed s`); the
unlearned model is attacked by every attack of the suite (`unlearn.tamper.ATTACK_SUITES`, default:
full fine-tunes at lr 1e-4, 3e-4 and 1e-3 and a LoRA attack, 300 steps on attack-split text, attack
seed s); the unfiltered model and the filtered twin are attacked by the same suite with attack seeds
0..seeds-1. Every evaluation scores the held-out **test** items (both templates) and retain, per
item. The metrics (`unlearn.tamper_stats`) are the pre-attack test forget and retain accuracy, the
excess of the worst case over the suite above the filtered twin's (max and mean over steps), the
steps until it exceeds 10 points, retain under attack and a collapsed flag, each with a 95%
bootstrap interval over items and seeds.

Writes leaderboard.json (metrics, config, machine, git SHA and every attack's per-step records with
per-item credit), leaderboard.md and leaderboard.png into --results. Runs go to --out (default
`$UNLEARN_HOME/leaderboard/<preset>`), each keyed by its settings, inputs and the code version
(`unlearn.keys`): a rerun reuses what matches and redoes what does not, so a killed leaderboard
picks up where it stopped.

Commands:
    python -m benchmarks.leaderboard                          # about 2 hours on 2 CPU cores
    python -m benchmarks.leaderboard --methods lens_unlearn circuit_breakers --seeds 1
    python -m benchmarks.leaderboard --world_preset tiny --seeds 2 --num_steps 2 \
        --unlearn_args "--num_steps 2 --batch_size 4" --results /tmp/lb   # smoke test
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simple_parsing import parse

from recipes.unlearn import run_keyed
from unlearn.config import from_dict
from unlearn.experiment import DataConfig, ModelConfig, Setup, load_setup
from unlearn.keys import content_key
from unlearn.methods import REGISTRY, benchmark_methods
from unlearn.plots import plot_recovery
from unlearn.provenance import git_sha, machine, portable_paths
from unlearn.tamper import AttackSettings, suite
from unlearn.tamper_report import attack_report, control_records
from unlearn.tamper_stats import CHANCE, Curves, bootstrap_metrics
from unlearn.toyworld.config import WorldPreset
from unlearn.toyworld.world import ToyWorld, unlearn_home

UNFILTERED, FILTERED = "unfiltered", "filtered twin"
"""Row labels of the controls."""


@dataclass
class Config:
    """Leaderboard of the unlearning recipes under an attack suite, over seeds."""

    methods: list[str] = field(default_factory=benchmark_methods)
    """Methods to run (`unlearn.methods.REGISTRY`; default: every one whose defaults were chosen
    on dev and that needs no further input, `unlearn.methods.benchmark_methods`)."""
    seeds: int = 3
    """Unlearning seeds per method (and attack seeds per control)."""
    suite: str = "default"
    """Attack suite (`unlearn.tamper.ATTACK_SUITES`)."""
    num_steps: int | None = None
    """Override the suite's attack steps."""
    world_preset: WorldPreset = "default"
    """Toy-world preset."""
    unlearn_args: str = ""
    """Extra flags for every recipe, as one string; "{seed}" stands for the unlearning seed (a
    teacher per seed: `--teacher <runs>/circuit_breakers/seed{seed}/run/model`)."""
    label: str | None = None
    """Row label (and run folder) of a variant of one method, e.g. `--methods detractor
    --unlearn_args '--train_on detractors' --label detractor_detractors`; None: its name."""
    out: str | None = None
    """Where the runs go (default: $UNLEARN_HOME/leaderboard/<preset>)."""
    results: str = "benchmarks/results"
    """Where leaderboard.{json,md,png} go."""
    device: str = ModelConfig().device
    """Device."""
    n_boot: int = 1000
    """Bootstrap replicates of the intervals."""

    def __post_init__(self) -> None:
        """Check the settings before anything runs.

        Raises:
            ValueError: Unknown methods or suite, or fewer than one seed.
        """
        unknown = set(self.methods) - set(REGISTRY)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(REGISTRY)}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if self.label is not None and len(self.methods) != 1:
            raise ValueError(f"--label names the row of one method; got --methods {self.methods}")
        if self.label in (UNFILTERED, FILTERED):
            raise ValueError(f"--label {self.label!r} is a control's row label; choose another")
        suite(self.suite)


def _trim(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the committed file keeps of tamper records: retain credit only before the attack."""
    keep = ("step", "forget_acc", "retain_acc", "forget_credit")
    return [
        {k: r[k] for k in keep} | ({"retain_credit": r["retain_credit"]} if i == 0 else {})
        for i, r in enumerate(records)
    ]


def recorded_seconds(
    method_dir: Path, seeds: int, measured: dict[str, float], fresh: bool
) -> dict[str, float]:
    """Wall seconds of a method's runs: measured now, or as recorded when its runs were made.

    Runs reused from an earlier invocation take no time now; their times are kept in
    `method_dir/wall_seconds.json` next to the keyed runs, valid while the runs' keys are the same.
    """
    keys = [
        json.loads((method_dir / f"seed{s}" / "key.json").read_text())["key"] for s in range(seeds)
    ]
    path = method_dir / "wall_seconds.json"
    if fresh:
        path.write_text(json.dumps({"keys": keys, **measured}, indent=2) + "\n")
        return measured
    if path.exists() and json.loads(path.read_text())["keys"] == keys:
        recorded = json.loads(path.read_text())
        return {"unlearn": recorded["unlearn"], "attack": recorded["attack"]}
    return measured


def attack_seed(
    label: str, model_dir: Path, seed: int, cfg: Config, seed_dir: Path
) -> list[list[dict[str, Any]]]:
    """Every attack of the suite on the model in `model_dir`, attack seed `seed`."""
    per_attack = []
    for name, settings in suite(cfg.suite, cfg.num_steps, seed=seed).items():
        model_cfg = ModelConfig(world_preset=cfg.world_preset, device=cfg.device)
        setup = load_setup(model_cfg, DataConfig(), weights=str(model_dir))
        report = attack_report(
            setup,
            settings,
            seed_dir / "attacks" / name,
            label=f"{label} seed {seed}, {name}",
            controls=False,
            weights=str(model_dir),
        )
        per_attack.append(report["records"])
    return per_attack


def control_runs(cfg: Config, world: ToyWorld, setup: Setup) -> dict[str, list]:
    """The suite's attack records on the unfiltered model and the filtered twin, per attack seed.

    They are cached with the world (`unlearn.tamper_report.control_records`).
    """
    return {
        label: [
            [
                control_records(world, control, setup, settings, cfg.device)
                for settings in suite(cfg.suite, cfg.num_steps, seed=seed).values()
            ]
            for seed in range(cfg.seeds)
        ]
        for control, label in (("unfiltered", UNFILTERED), ("filtered", FILTERED))
    }


def seed_flags(args: list[str], seed: int) -> list[str]:
    """The recipe flags of one seed: every "{seed}" replaced by it.

    E.g. UNDO's teacher, the unlearned model of the same seed:
    `--teacher <runs>/circuit_breakers/seed{seed}/run/model`.
    """
    return [arg.replace("{seed}", str(seed)) for arg in args]


def method_runs(
    name: str,
    args: list[str],
    method_dir: Path,
    cfg: Config,
    world_key: str,
    label: str = "",
    inputs: dict[str, str] | None = None,
) -> tuple[list, dict[str, float]]:
    """Unlearn with method `name` (recipe flags `args`) at every seed and attack each model.

    Each seed's run and attacks are keyed under `method_dir/seed<s>` (reused when they match),
    by the recipe's config, the world, further `inputs` (content keys of files the flags name)
    and the code version.

    Returns:
        The attack records per seed, and the wall seconds of unlearning and attacking
        (`recorded_seconds`).
    """
    records, seconds, fresh = [], {"unlearn": 0.0, "attack": 0.0}, []
    for seed in range(cfg.seeds):
        seed_dir = method_dir / f"seed{seed}"
        seed_args = [*seed_flags(args, seed), "--seed", str(seed)]
        keys = {"world": world_key, **(inputs or {})}
        run, unlearn_seconds = run_keyed(name, seed_args, seed_dir, inputs=keys)
        attack_start = time.perf_counter()
        records.append(attack_seed(label or name, run / "model", seed, cfg, seed_dir))
        seconds["unlearn"] += unlearn_seconds
        seconds["attack"] += time.perf_counter() - attack_start
        fresh.append(unlearn_seconds > 0)
    return records, recorded_seconds(method_dir, cfg.seeds, seconds, all(fresh))


def main(cfg: Config) -> dict[str, Any]:
    """Run (or reuse) every unlearning run and attack, and write the leaderboard."""
    start = time.perf_counter()
    args = ["--world_preset", cfg.world_preset, *shlex.split(cfg.unlearn_args)]
    out = Path(cfg.out or unlearn_home() / "leaderboard" / cfg.world_preset).expanduser()
    setup = load_setup(ModelConfig(world_preset=cfg.world_preset, device=cfg.device), DataConfig())
    world = setup.world
    assert world is not None
    world_key = content_key(world.root / "config.json")

    records = control_runs(cfg, world, setup)
    seconds: dict[str, dict[str, float]] = {}
    for name in cfg.methods:
        label = cfg.label or name
        records[label], seconds[label] = method_runs(
            name, args, out / label, cfg, world_key, label=label
        )

    curves = {label: Curves.from_records(runs) for label, runs in records.items()}
    rows = bootstrap_metrics(curves, FILTERED, UNFILTERED, n_boot=cfg.n_boot)
    sha = git_sha()
    payload = {
        "format": 2,
        "command": ("python -m benchmarks.leaderboard " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": sha.removesuffix("+dirty"),
        "dirty": sha.endswith("+dirty"),
        "machine": machine(),
        "config": portable_paths(asdict(cfg)),
        "suite": {k: asdict(v) for k, v in suite(cfg.suite, cfg.num_steps).items()},
        "steps": curves[FILTERED].steps,
        "n_test_items": int(curves[FILTERED].forget.shape[-1]),
        "rows": rows,
        "wall_seconds": seconds,
        "seconds": time.perf_counter() - start,
        "records": {
            label: [[_trim(r) for r in per_seed] for per_seed in runs]
            for label, runs in records.items()
        },
    }
    write_results(payload, Path(cfg.results))
    return payload


def write_results(payload: dict[str, Any], results: Path) -> None:
    """Write leaderboard.json, leaderboard.md and leaderboard.png of `payload` into `results`."""
    results = results.expanduser()
    results.mkdir(parents=True, exist_ok=True)
    cfg = payload["config"]
    (results / "leaderboard.json").write_text(json.dumps(payload, indent=1) + "\n")
    (results / "leaderboard.md").write_text(leaderboard_markdown(payload))
    curves = {label: Curves.from_records(runs) for label, runs in payload["records"].items()}
    plot_recovery(
        {
            label: [
                {"step": s, "forget_acc": f, "retain_acc": r}
                for s, f, r in zip(
                    payload["steps"],
                    metrics["worst_case"],
                    curves[label].retain_acc.min(1).mean(0).tolist(),
                    strict=True,
                )
            ]
            for label, metrics in payload["rows"].items()
        },
        results / "leaderboard.png",
        title=f"Worst case over the {cfg['suite']} suite, {cfg['world_preset']} toy world, "
        f"mean of {cfg['seeds']} seeds (retain: worst attack)",
        chance=CHANCE,
    )
    print(f"\n{leaderboard_table(payload)}\nwrote {results / 'leaderboard.md'}")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _ci(metrics: dict[str, Any], name: str, fmt: Any = _pct) -> str:
    low, high = metrics[f"{name}_ci"]
    return f"{fmt(metrics[name])} [{fmt(low)}, {fmt(high)}]"


def _step(value: int | None) -> str:
    return "held" if value is None else str(value)


def leaderboard_table(payload: dict[str, Any]) -> str:
    """The leaderboard's rows as a Markdown table (accuracies and excess in points).

    With `compute` in the payload (`benchmarks.compute`), a last column gives each row's FLOPs
    as a multiple of pretraining the filtered twin.
    """
    compute = payload.get("compute")
    lines = [
        "| model | forget (test) | retain | excess max | excess mean | steps to filtered + 10 | "
        "retain under attack | collapsed |" + (" compute (x pretraining) |" if compute else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if compute else ""),
    ]
    for label, m in payload["rows"].items():
        lines.append(
            f"| {label} | {_ci(m, 'forget_pre')} | {_ci(m, 'retain_pre')} | "
            f"{_ci(m, 'excess_max')} | {_ci(m, 'excess_mean')} | "
            f"{_step(m['steps_to_exceed'])} [{_step(m['steps_to_exceed_ci'][0])}, "
            f"{_step(m['steps_to_exceed_ci'][1])}] | {_pct(m['retain_under_attack'])} | "
            f"{'yes' if m['collapsed'] else 'no'} |"
            + (f" {_multiple(compute.get(label))} |" if compute else "")
        )
    return "\n".join(lines) + "\n"


def _multiple(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def leaderboard_markdown(payload: dict[str, Any]) -> str:
    """leaderboard.md: provenance, what the columns mean, the table and the wall times."""
    cfg, mach = payload["config"], payload["machine"]
    suite = {name: from_dict(AttackSettings, s) for name, s in payload["suite"].items()}
    attacks = ", ".join(
        f"{name} ({f'LoRA r{s.lora.lora_rank}' if s.lora.enabled else 'full'}, lr {s.optim.lr:g})"
        for name, s in suite.items()
    )
    steps = next(iter(payload["suite"].values()))["num_steps"]
    times = "".join(
        f"| {name} | {t['unlearn']:.0f} | {t['attack']:.0f} |\n"
        for name, t in payload["wall_seconds"].items()
    )
    return (
        f"# Method leaderboard ({cfg['world_preset']} toy world)\n\n"
        f"Command: `{payload['command']}` at {payload['git_sha'][:7]}"
        f"{' (dirty tree)' if payload['dirty'] else ' (clean tree)'}; machine: "
        f"{mach['platform']}, {mach['cpu_threads']} CPU threads, torch {mach['torch']}.\n\n"
        f"Attack suite `{cfg['suite']}`: {attacks}; {steps} steps each on attack-split text. "
        f"{cfg['seeds']} seeds per row (unlearning seeds; attack seeds for the controls). "
        f"Accuracies in % on {payload['n_test_items']} held-out **test** items (entities never "
        "in any training or tuning data, both templates) and on retain; chance is 25%. "
        "**Excess**: the worst case over the suite's attacks minus the filtered twin's (attacked "
        "by the same suite) at the same step, in points, max and mean over the evaluated steps. "
        "[low, high]: 95% bootstrap intervals over items and seeds. Retain under attack: the "
        "lowest retain accuracy of the worst attack over the steps.\n\n"
        + leaderboard_table(payload)
        + "\n| method | unlearning wall s (all seeds) | attack wall s (all seeds) |\n"
        "|---|---|---|\n" + times + sources_markdown(payload)
    )


def sources_markdown(payload: dict[str, Any]) -> str:
    """For a combined leaderboard (`benchmarks.leaderboard_combine`): where each row was run."""
    if "sources" not in payload:
        return ""
    lines = [
        "\nCombined from leaderboard runs made at different commits; the controls (unfiltered "
        "model, filtered twin) and their attacks are the first run's, and every method row's "
        "excess is over them. Control difference: the largest absolute difference, at any step "
        "of any attack and seed, between a run's control accuracies and the first run's.\n",
        "| run | commit | machine threads | rows | control difference (points) |",
        "|---|---|---|---|---|",
    ]
    for i, source in enumerate(payload["sources"], 1):
        lines.append(
            f"| {i}: `{source['command']}` | {source['git_sha'][:7]}"
            f"{' (dirty)' if source['dirty'] else ''} | {source['machine']['cpu_threads']} | "
            f"{', '.join(source['methods'])} | {100 * source['control_difference']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
