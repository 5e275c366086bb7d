"""Mask ablation: one unlearning method trained with each forget token mask, then attacked.

For one method (sequential by default), the recipe runs once per `--token_mask` value: "all"
(every forget token, no selection), the ground truth ("values": the value tokens of the
documents' facts) and every selector of `unlearn.selection.SELECTORS` with its default settings
(computed on the original model and cached), each over `--seeds` unlearning seeds. Every
unlearned model is attacked by the suite, and the rows are measured against the filtered twin
attacked the same way, all with the leaderboard's machinery (`benchmarks.leaderboard`:
`control_runs`, `method_runs`; `unlearn.tamper_stats.bootstrap_metrics`): pre-attack forget
accuracy on the held-out **test** items and retain accuracy, and the excess of the suite's worst
case over the filtered twin (max and mean over steps), each with a 95% bootstrap interval over
items and seeds; plus the share of forget tokens each mask selects.

Writes mask_ablation.json (rows, masks, per-step records, config, machine, git SHA, command) and
mask_ablation.md into --results. Runs go to --out (default
`$UNLEARN_HOME/mask_ablation/<preset>/<method>/<mask>`), keyed like the leaderboard's, so a killed
ablation resumes.

Commands:
    python -m benchmarks.mask_ablation                         # default world, hours
    python -m benchmarks.mask_ablation --method lens_unlearn --masks none values keywords
    python -m benchmarks.mask_ablation --world_preset tiny --seeds 1 --num_steps 2 \
        --unlearn_args "--num_steps 2 --batch_size 4" --results /tmp/ma   # smoke test
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

from benchmarks import leaderboard
from unlearn.config import ALL_TOKENS, VALUES
from unlearn.experiment import DataConfig, ModelConfig, load_setup, token_mask_key
from unlearn.keys import content_key
from unlearn.methods import REGISTRY
from unlearn.provenance import git_sha, machine, portable_paths
from unlearn.selection import SELECTORS, token_mask_source
from unlearn.tamper import suite
from unlearn.tamper_stats import Curves, bootstrap_metrics
from unlearn.toyworld.config import WorldPreset
from unlearn.toyworld.world import unlearn_home


@dataclass
class Config:
    """One method unlearned with every token mask, attacked, against the filtered twin."""

    method: str = "sequential"
    """The unlearning method (`unlearn.methods.REGISTRY`)."""
    masks: list[str] = field(default_factory=lambda: [ALL_TOKENS, VALUES, *SELECTORS])
    """`--token_mask` values: "all" (every token), "values", selector names (or mask files)."""
    seeds: int = 3
    """Unlearning seeds per mask (and attack seeds per control)."""
    suite: str = "default"
    """Attack suite (`unlearn.tamper.ATTACK_SUITES`)."""
    num_steps: int | None = None
    """Override the suite's attack steps."""
    world_preset: WorldPreset = "default"
    """Toy-world preset."""
    unlearn_args: str = ""
    """Extra flags for every unlearning run, as one string."""
    out: str | None = None
    """Where the runs go (default: $UNLEARN_HOME/mask_ablation/<preset>)."""
    results: str = "benchmarks/results"
    """Where mask_ablation.{json,md} go."""
    device: str = ModelConfig().device
    """Device."""
    n_boot: int = 1000
    """Bootstrap replicates of the intervals."""

    def __post_init__(self) -> None:
        """Check the settings before anything runs.

        Raises:
            ValueError: An unknown method, suite or mask, no masks, repeated masks, or
                `--token_mask` in --unlearn_args (the masks come from --masks).
        """
        if self.method not in REGISTRY:
            raise ValueError(f"unknown method {self.method!r}; choose from {list(REGISTRY)}")
        if not self.masks or len(set(self.masks)) != len(self.masks):
            raise ValueError(f"--masks must name distinct masks, got {self.masks}")
        for mask in self.masks:
            token_mask_source(mask)  # raises ValueError naming what a mask may be
        if "--token_mask" in self.unlearn_args:
            raise ValueError(
                "--masks chooses the token masks: drop --token_mask from --unlearn_args"
            )
        suite(self.suite)

    def board(self) -> leaderboard.Config:
        """The leaderboard settings the runs and attacks use."""
        return leaderboard.Config(
            methods=[self.method],
            seeds=self.seeds,
            suite=self.suite,
            num_steps=self.num_steps,
            world_preset=self.world_preset,
            unlearn_args=self.unlearn_args,
            out=self.out,
            results=self.results,
            device=self.device,
            n_boot=self.n_boot,
        )


def mask_args(mask: str) -> list[str]:
    """The recipe flags of one mask."""
    return ["--token_mask", mask]


def selected_share(method_dir: Path) -> float:
    """The share of forget tokens the mask of seed 0's run selected (1 without a mask)."""
    info = json.loads((method_dir / "seed0" / "run" / "run_info.json").read_text())
    return info["config"].get("token_mask_fraction", 1.0)


def main(cfg: Config) -> dict[str, Any]:
    """Run (or reuse) every masked unlearning run and attack; write the ablation's results."""
    start = time.perf_counter()
    board = cfg.board()
    args = ["--world_preset", cfg.world_preset, *shlex.split(cfg.unlearn_args)]
    out = Path(cfg.out or unlearn_home() / "mask_ablation" / cfg.world_preset).expanduser()
    setup = load_setup(ModelConfig(world_preset=cfg.world_preset, device=cfg.device), DataConfig())
    assert setup.world is not None
    world_key = content_key(setup.world.root / "config.json")

    records = leaderboard.control_runs(board, setup.world, setup)
    seconds, shares = {}, {}
    for mask in cfg.masks:
        method_dir = out / cfg.method / mask.replace("/", "_")
        records[mask], seconds[mask] = leaderboard.method_runs(
            cfg.method,
            [*args, *mask_args(mask)],
            method_dir,
            board,
            world_key,
            label=f"{cfg.method} ({mask})",
            inputs=token_mask_key(mask, is_toy=True),
        )
        shares[mask] = selected_share(method_dir)
    curves = {label: Curves.from_records(runs) for label, runs in records.items()}
    rows = bootstrap_metrics(
        curves, leaderboard.FILTERED, leaderboard.UNFILTERED, n_boot=cfg.n_boot
    )
    sha = git_sha()
    payload = {
        "command": ("python -m benchmarks.mask_ablation " + shlex.join(sys.argv[1:])).strip(),
        "git_sha": sha.removesuffix("+dirty"),
        "dirty": sha.endswith("+dirty"),
        "machine": machine(),
        "config": portable_paths(asdict(cfg)),
        "suite": {k: asdict(v) for k, v in suite(cfg.suite, cfg.num_steps).items()},
        "steps": curves[leaderboard.FILTERED].steps,
        "n_test_items": int(curves[leaderboard.FILTERED].forget.shape[-1]),
        "rows": rows,
        "token_share": shares,
        "wall_seconds": seconds,
        "seconds": time.perf_counter() - start,
        "records": {
            label: [[leaderboard._trim(r) for r in per_seed] for per_seed in runs]
            for label, runs in records.items()
        },
    }
    results = Path(cfg.results).expanduser()
    results.mkdir(parents=True, exist_ok=True)
    (results / "mask_ablation.json").write_text(json.dumps(payload, indent=1) + "\n")
    (results / "mask_ablation.md").write_text(markdown(payload))
    print(f"\n{leaderboard.leaderboard_table(payload)}\nwrote {results / 'mask_ablation.md'}")
    return payload


def markdown(payload: dict[str, Any]) -> str:
    """mask_ablation.md: provenance, what the rows are, the leaderboard table and token shares."""
    cfg, mach = payload["config"], payload["machine"]
    shares = "".join(
        f"| {mask} | {100 * share:.1f} | {payload['wall_seconds'][mask]['unlearn']:.0f} |\n"
        for mask, share in payload["token_share"].items()
    )
    return (
        f"# Token-mask ablation: {cfg['method']} ({cfg['world_preset']} toy world)\n\n"
        f"Command: `{payload['command']}` at {payload['git_sha'][:7]}"
        f"{' (dirty tree)' if payload['dirty'] else ' (clean tree)'}; machine: "
        f"{mach['platform']}, {mach['cpu_threads']} CPU threads, torch {mach['torch']}.\n\n"
        f"Each row is {cfg['method']} trained with one forget token mask (`--token_mask`; "
        f"`{ALL_TOKENS}`: every token; `{VALUES}`: the ground-truth value tokens; otherwise a "
        f"selector with its default settings), {cfg['seeds']} seed(s) each, attacked by the "
        f"`{cfg['suite']}` suite like the leaderboard. Accuracies in % on "
        f"{payload['n_test_items']} held-out **test** items and on retain; excess: the suite's "
        "worst case minus the filtered twin's, in points; [low, high]: 95% bootstrap intervals "
        "over items and seeds.\n\n"
        + leaderboard.leaderboard_table(payload)
        + "\n| mask | forget tokens selected (%) | unlearning wall s (all seeds) |\n"
        "|---|---|---|\n" + shares
    )


if __name__ == "__main__":
    main(parse(Config, add_config_path_arg=True))
