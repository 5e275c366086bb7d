"""Choose each method's learning rate on the **dev** split: the sweep behind the committed defaults.

For every method, the recipe runs at three learning rates (`lr_grid`: its previous default, a
third of it and three times it; unlearning seed 0) and each unlearned model is attacked by the
attack suite shortened to `--num_steps` (default 100) steps, every evaluation scoring the held-out
**dev** items (entities disjoint from the test split's) and retain. The unfiltered model and the
filtered twin are attacked by the same shortened suite. Test items are never scored here
(`unlearn.eval` refuses them outside final reporting).

The rule (`choose`), read off DESIGN.md's targets: a setting qualifies when its pre-attack dev
forget accuracy is at most 35% and its retain accuracy at least 90% of the unfiltered model's;
qualifying settings come first, then the lowest excess max over the filtered twin (worst case over
the suite, points), then the lowest excess mean, then the previous default. The chosen rates are
the recipes' committed defaults; `tests/benchmarks/test_tune_dev.py` fails when a default and this
file disagree.

Writes tune_dev.json (every setting's dev metrics and worst-case curve, the choice, config,
machine, git SHA) and tune_dev.md into --results. Runs go to --out (default
`$UNLEARN_HOME/tune_dev/<preset>`), keyed like the leaderboard's (`unlearn.keys`): a killed sweep
resumes.

`--grid name=v1,v2 ...` sweeps further settings of the methods (flat flag names, e.g. NPO's
`beta`) as a cross product with the learning rates; the chosen values then become the committed
defaults too, and the test checks them the same way.

Commands:
    python -m benchmarks.tune_dev                       # about 40 minutes on 2 CPU cores
    python -m benchmarks.tune_dev --methods lens_unlearn
    python -m benchmarks.tune_dev --methods npo --grid beta=0.1,0.5,2 --results /tmp/npo
    python -m benchmarks.tune_dev --world_preset tiny --num_steps 2 \
        --unlearn_args "--num_steps 2 --batch_size 4" --results /tmp/tune   # smoke test
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simple_parsing import parse

from recipes.unlearn import config_class, run_keyed
from unlearn.config import flat_names, flat_values
from unlearn.experiment import DataConfig, ModelConfig, load_setup
from unlearn.keys import content_key
from unlearn.methods import REGISTRY, benchmark_methods
from unlearn.provenance import git_sha, machine, portable_paths
from unlearn.tamper import suite
from unlearn.tamper_report import attack_report, control_records
from unlearn.tamper_stats import Curves, point_metrics
from unlearn.toyworld.config import WorldPreset
from unlearn.toyworld.world import unlearn_home

DEV = "forget_dev"
MAX_FORGET = 0.35
"""A qualifying setting's highest pre-attack dev forget accuracy (DESIGN.md)."""
MIN_RETAIN_SHARE = 0.90
"""A qualifying setting's lowest retain accuracy, as a share of the unfiltered model's."""
PREVIOUS_LR = {
    "lens_unlearn": 3e-4,
    "circuit_breakers": 3e-3,
    "checkpoint_transfer": 1e-3,
    "sequential": 2e-3,
    "rewritten_transfer": 2e-3,
    "probe_unlearn": 5e-4,
}
"""The defaults before this sweep (chosen on held-out numbers that are now the test split's)."""


def previous_lr(method: str) -> float:
    """The default the sweep centres on: `PREVIOUS_LR`, or a newer method's registered default."""
    return PREVIOUS_LR.get(method) or default_lr(method)


def lr_grid(method: str) -> tuple[float, float, float]:
    """Learning rates swept: a third of the previous default, it, and three times it."""
    lr = previous_lr(method)
    return (float(f"{lr / 3:.3g}"), lr, float(f"{lr * 3:.3g}"))


@dataclass
class Config:
    """Dev-split sweep of every method's learning rate."""

    methods: list[str] = field(default_factory=benchmark_methods)
    """Methods to sweep (`unlearn.methods.REGISTRY`; default: those whose committed defaults came
    from this sweep and that need no further input, `unlearn.methods.benchmark_methods`; name an
    untuned method to tune it, with its inputs in --unlearn_args)."""
    suite: str = "default"
    """Attack suite (`unlearn.tamper.ATTACK_SUITES`), shortened to `num_steps`."""
    num_steps: int = 100
    """Attack steps of every attack of the suite."""
    world_preset: WorldPreset = "default"
    """Toy-world preset."""
    unlearn_args: str = ""
    """Extra flags for every recipe, as one string."""
    grid: list[str] = field(default_factory=list)
    """Further settings to sweep with the learning rates, each "name=v1,v2,..." (a flag of the
    methods' recipes; the cross product of all is run)."""
    lrs: list[float] = field(default_factory=list)
    """Learning rates to sweep instead of each method's `lr_grid` (e.g. a refinement between two
    rates of an earlier sweep); empty: `lr_grid`."""
    out: str | None = None
    """Where the runs go (default: $UNLEARN_HOME/tune_dev/<preset>)."""
    results: str = "benchmarks/results"
    """Where tune_dev.{json,md} go."""
    device: str = ModelConfig().device
    """Device."""

    def __post_init__(self) -> None:
        """Check the methods and suite before anything runs.

        Raises:
            ValueError: Unknown methods or suite.
        """
        unknown = set(self.methods) - set(REGISTRY)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(REGISTRY)}")
        suite(self.suite)
        for method in self.methods:
            grid_values(self.grid, method)
        if any(not (lr > 0) for lr in self.lrs):
            raise ValueError(f"--lrs must be positive, got {self.lrs}")


def default_lr(name: str) -> float:
    """The method's committed default learning rate."""
    return float(config_class(name)().training.optim.lr)


def grid_values(grid: list[str], method: str) -> dict[str, list[str]]:
    """`--grid` entries as setting -> values, checked against the method's recipe flags.

    Raises:
        ValueError: A malformed entry, a repeated or unknown setting, or `lr` (always swept).
    """
    values: dict[str, list[str]] = {}
    known = flat_names(config_class(method)())
    for entry in grid:
        name, sep, listed = entry.partition("=")
        choices = [v for v in listed.split(",") if v]
        if not sep or not name or not choices:
            raise ValueError(f"--grid entry {entry!r} must look like name=v1,v2")
        if name == "lr" or name in values or name not in known:
            raise ValueError(
                f"--grid setting {name!r} must be a flag of {method}'s recipe other than lr, "
                f"given once; its flags: {', '.join(sorted(known - {'lr'}))}"
            )
        values[name] = choices
    return values


def candidates_of(
    method: str, grid: list[str], lrs: list[float] | tuple[float, ...] = ()
) -> list[tuple[str, float, dict[str, str]]]:
    """(label, lr, further settings) of every setting swept for `method`.

    At `lrs`, or at its `lr_grid` when none are given.
    """
    values = grid_values(grid, method)
    combos = [
        dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())
    ]
    return [
        (",".join([f"{lr:g}", *(f"{k}={v}" for k, v in extra.items())]), lr, extra)
        for lr in (lrs or lr_grid(method))
        for extra in combos
    ]


def _default_label(method: str, grid: list[str]) -> str | None:
    """The candidate holding the committed defaults (lr and every gridded setting), if swept."""
    registered = flat_values(config_class(method)())
    for label, lr, extra in candidates_of(method, grid):
        same = all(same_setting(registered[name], value) for name, value in extra.items())
        if lr == previous_lr(method) and same:
            return label
    return None


def same_setting(value: Any, text: str) -> bool:
    """Whether a setting's value is the one a flag value `text` gives."""
    if isinstance(value, bool | str) or value is None:
        return str(value).lower() == text.lower()
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value) == text


def qualifies(metrics: dict[str, Any], unfiltered_retain: float) -> bool:
    """Pre-attack dev forget <= 35% and retain >= 90% of the unfiltered model's."""
    return (
        metrics["forget_pre"] <= MAX_FORGET
        and metrics["retain_pre"] >= MIN_RETAIN_SHARE * unfiltered_retain
    )


def choose(
    candidates: dict[str, dict[str, Any]], unfiltered_retain: float, default: str | None = None
) -> str:
    """The chosen setting: qualifying first, then the lowest excess max, then excess mean.

    On a tie, `default` wins (a committed default changes only on evidence).
    """
    return min(
        candidates,
        key=lambda name: (
            not qualifies(candidates[name], unfiltered_retain),
            round(candidates[name]["excess_max"], 6),
            round(candidates[name]["excess_mean"], 6),
            name != default,
        ),
    )


def _attacks(cfg: Config, setup_args: dict[str, Any], model_dir: Path, out: Path, label: str):
    per_attack = []
    for name, settings in suite(cfg.suite, cfg.num_steps).items():
        setup = load_setup(**setup_args, weights=str(model_dir))
        report = attack_report(
            setup,
            settings,
            out / "attacks" / name,
            label=f"{label}, {name}",
            controls=False,
            weights=str(model_dir),
            forget_split=DEV,
        )
        per_attack.append(report["records"])
    return per_attack


def main(cfg: Config) -> dict[str, Any]:
    """Sweep, choose and write tune_dev.{json,md}."""
    start = time.perf_counter()
    out = Path(cfg.out or unlearn_home() / "tune_dev" / cfg.world_preset).expanduser()
    setup_args = {
        "model_cfg": ModelConfig(world_preset=cfg.world_preset, device=cfg.device),
        "data_cfg": DataConfig(),
    }
    setup = load_setup(**setup_args)
    world = setup.world
    assert world is not None
    controls = {
        name: Curves.from_records(
            [
                [
                    control_records(world, name, setup, settings, cfg.device, DEV)
                    for settings in suite(cfg.suite, cfg.num_steps).values()
                ]
            ]
        )
        for name in ("unfiltered", "filtered")
    }
    unfiltered_retain = float(controls["unfiltered"].retain_credit.mean())
    args = ["--world_preset", cfg.world_preset, *shlex.split(cfg.unlearn_args), "--seed", "0"]
    methods: dict[str, Any] = {}
    for method in cfg.methods:
        base = previous_lr(method)
        candidates: dict[str, dict[str, Any]] = {}
        for label, lr, extra in candidates_of(method, cfg.grid, cfg.lrs):
            run_dir = out / method / f"lr{label}"
            flags = [item for name, value in extra.items() for item in (f"--{name}", value)]
            run, _ = run_keyed(
                method,
                [*args, "--lr", str(lr), *flags],
                run_dir,
                inputs={"world": content_key(world.root / "config.json")},
            )
            curves = Curves.from_records(
                [_attacks(cfg, setup_args, run / "model", run_dir, f"{method} lr {label}")]
            )
            metrics = point_metrics(curves, controls["filtered"], unfiltered_retain)
            candidates[label] = {"lr": lr, **({"grid": extra} if extra else {}), **metrics}
        chosen = choose(candidates, unfiltered_retain, default=_default_label(method, cfg.grid))
        methods[method] = {"previous_lr": base, "chosen": chosen, "settings": candidates}
        print(f"{method}: chose lr {chosen} (previous default {base:g})")
    sha = git_sha()
    payload = {
        "command": ("python -m benchmarks.tune_dev " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": sha.removesuffix("+dirty"),
        "dirty": sha.endswith("+dirty"),
        "machine": machine(),
        "config": portable_paths(asdict(cfg)),
        "steps": controls["filtered"].steps,
        "n_dev_items": int(controls["filtered"].forget.shape[-1]),
        "unfiltered": point_metrics(
            controls["unfiltered"], controls["filtered"], unfiltered_retain
        ),
        "filtered": point_metrics(controls["filtered"], controls["filtered"], unfiltered_retain),
        "methods": methods,
        "seconds": time.perf_counter() - start,
    }
    results = Path(cfg.results).expanduser()
    results.mkdir(parents=True, exist_ok=True)
    (results / "tune_dev.json").write_text(json.dumps(payload, indent=1) + "\n")
    (results / "tune_dev.md").write_text(tune_markdown(payload))
    print(f"wrote {results / 'tune_dev.md'}")
    return payload


def tune_markdown(payload: dict[str, Any]) -> str:
    """tune_dev.md: provenance, the rule and every setting's dev metrics."""
    cfg, mach = payload["config"], payload["machine"]
    lines = [
        f"# Learning rates chosen on the dev split ({cfg['world_preset']} toy world)\n",
        f"Command: `{payload['command']}` at {payload['git_sha'][:7]}"
        f"{' (dirty tree)' if payload['dirty'] else ' (clean tree)'}; machine: "
        f"{mach['platform']}, {mach['cpu_threads']} CPU threads, torch {mach['torch']}.\n",
        f"Unlearning seed 0; attack suite `{cfg['suite']}` shortened to {cfg['num_steps']} steps; "
        f"accuracies in % on {payload['n_dev_items']} held-out **dev** items and on retain. "
        "Excess: worst case over the suite minus the filtered twin's, points, max and mean over "
        f"steps {payload['steps']}. Rule: pre-attack dev forget <= {100 * MAX_FORGET:.0f}% and "
        f"retain >= {100 * MIN_RETAIN_SHARE:.0f}% of the unfiltered model's first, then the "
        "lowest excess max, then excess mean. Chosen settings in bold.\n",
        "| method | lr | forget (dev) | retain | excess max | excess mean | qualifies |",
        "|---|---|---|---|---|---|---|",
    ]
    unfiltered_retain = payload["unfiltered"]["retain_pre"]
    for label in ("unfiltered", "filtered"):
        m = payload[label]
        lines.append(
            f"| {label} | – | {100 * m['forget_pre']:.1f} | {100 * m['retain_pre']:.1f} | "
            f"{100 * m['excess_max']:.1f} | {100 * m['excess_mean']:.1f} | – |"
        )
    for method, sweep in payload["methods"].items():
        for name, m in sweep["settings"].items():
            bold = "**" if name == sweep["chosen"] else ""
            lines.append(
                f"| {method} | {bold}{name}{bold} | {100 * m['forget_pre']:.1f} | "
                f"{100 * m['retain_pre']:.1f} | {100 * m['excess_max']:.1f} | "
                f"{100 * m['excess_mean']:.1f} | "
                f"{'yes' if qualifies(m, unfiltered_retain) else 'no'} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
