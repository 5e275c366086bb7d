"""Retain-term ablation: does a method resist tampering only because it wrecked the model?

Runs an unlearning recipe as configured and again with its retain coefficient at 0 ("unrestrained
unlearning"), attacks both with the same tamper preset, next to the filtered twin and the
unfiltered model under that attack, and writes one figure and one table. A model whose retain
accuracy is near chance is marked collapsed and never counted as tamper-resistant.

Writes to --out: with_retain/ and retain_0/ (the unlearning runs, each with its attack in
tamper/), ablation.png (recovery curves), ablation.md and ablation.json (the table),
run_info.json. Rerunning resumes or reuses finished runs made under the same settings, inputs and
code version (`unlearn.keys`), and redoes any other.

Commands:
    python -m recipes.retain_ablation --method lens_unlearn
    python -m recipes.retain_ablation --method circuit_breakers --preset lora --out runs/abl_cb
    python -m recipes.retain_ablation --method lens_unlearn --out /tmp/abl \
        --unlearn_args "--world_preset tiny --num_steps 2 --batch_size 4" --num_steps 2
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from recipes.unlearn import run_keyed
from unlearn.experiment import DataConfig, ModelConfig, load_setup
from unlearn.methods import registration
from unlearn.plots import plot_recovery
from unlearn.provenance import write_run_info
from unlearn.runs import run_recipe
from unlearn.tamper import ATTACK_PRESETS, AttackSettings
from unlearn.tamper_report import (
    CHANCE,
    FILTERED,
    UNFILTERED,
    attack_report,
    resolve_model,
    summarize,
)

ATTACK_STEPS = (25, 100, 300)
"""Attack steps the tables report held-out forget accuracy at."""


@dataclass
class Config:
    """Retain-term ablation of one unlearning recipe."""

    method: str = "lens_unlearn"
    """The unlearning method to ablate (any of `unlearn.methods.REGISTRY`)."""
    out: str = "runs/retain_ablation"
    """Output directory."""
    unlearn_args: str = ""
    """Extra flags for the unlearning recipe, as one string (e.g. "--num_steps 100")."""
    preset: Literal["full", "lora", "repair_then_attack", "benign"] = "full"
    """Tamper preset (unlearn.tamper.ATTACK_PRESETS)."""
    num_steps: int | None = None
    """Override the preset's attack steps."""
    device: str = ModelConfig().device
    """Device of the attacks."""

    def __post_init__(self) -> None:
        registration(self.method)  # raises ValueError naming the registered methods


def unlearn_and_attack(
    recipe_name: str,
    args: list[str],
    out: Path,
    settings: AttackSettings,
    device: str,
    retain_coef: float | None = None,
) -> dict[str, Any]:
    """Run an unlearning recipe (`run_keyed`), then attack its model (keyed, out/tamper).

    Args:
        recipe_name: A registered method (`unlearn.methods.REGISTRY`).
        args: Flags for the recipe's Config.
        out: The run's directory; the recipe writes out/run, the attack out/tamper.
        settings: The attack.
        device: Device of the attack.
        retain_coef: Override the method's retain coefficient (0 for the ablation).

    Returns:
        {"unlearn": results.json's numbers, "unlearn_seconds", "attack_seconds", "tamper": the
        attack report (controls without the benign fine-tune)}.
    """
    run, unlearn_seconds = run_keyed(recipe_name, args, out, retain_coef)
    results = json.loads((run / "results.json").read_text())
    model_cfg, weights = resolve_model(str(run), ModelConfig(device=device))
    setup = load_setup(model_cfg, DataConfig(), weights=weights)
    start = time.perf_counter()
    report = attack_report(
        setup, settings, out / "tamper", label=recipe_name, benign=False, weights=weights
    )
    return {
        "unlearn": results,
        "unlearn_seconds": unlearn_seconds,
        "attack_seconds": time.perf_counter() - start,
        "tamper": report,
    }


def forget_at(records: list[dict[str, Any]], step: int) -> float | None:
    """Held-out forget accuracy at an evaluated attack step (None if not evaluated)."""
    return next((r["forget_acc"] for r in records if r["step"] == step), None)


def row(label: str, records: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """One table row: accuracies before/at steps/peak, steps past the filtered twin, collapse."""
    return {
        "model": label,
        "forget_acc": records[0]["forget_acc"],
        "retain_acc": records[0]["retain_acc"],
        **{f"forget_at_{s}": forget_at(records, s) for s in ATTACK_STEPS},
        "forget_peak": summary["forget_acc_peak"],
        "excess_max": summary.get("excess_max"),
        "steps_to_exceed_filtered": summary.get("steps_to_exceed_filtered"),
        "collapsed": summary.get("collapsed", False),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table, accuracies in %.

    "excess max" is the largest held-out forget accuracy above the filtered twin's (attacked the
    same way) at any evaluated step, in points.
    """
    head = (
        "| model | forget | retain | "
        + " | ".join(f"forget @{s}" for s in ATTACK_STEPS)
        + " | peak | excess max | steps to filtered + 10 | collapsed |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    for r in rows:
        step = r["steps_to_exceed_filtered"]
        lines.append(
            f"| {r['model']} | {pct(r['forget_acc'])} | {pct(r['retain_acc'])} | "
            + " | ".join(pct(r[f"forget_at_{s}"]) for s in ATTACK_STEPS)
            + f" | {pct(r['forget_peak'])} | {pct(r['excess_max'])} | "
            + f"{'held' if step is None else step} | "
            + f"{'yes' if r['collapsed'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict[str, Any]:
    """Run the method with and without its retain term, attack both; return the table rows."""
    out = Path(cfg.out).expanduser()
    write_run_info(out, asdict(cfg))
    settings = ATTACK_PRESETS[cfg.preset]
    if cfg.num_steps is not None:
        settings = replace(settings, num_steps=cfg.num_steps)
    args = shlex.split(cfg.unlearn_args)

    runs = {
        label: unlearn_and_attack(
            cfg.method, args, out / subdir, settings, cfg.device, retain_coef=coef
        )
        for label, subdir, coef in (
            (cfg.method, "with_retain", None),
            (f"{cfg.method}, retain 0", "retain_0", 0.0),
        )
    }
    controls = next(iter(runs.values()))["tamper"]["controls"]
    ceiling, floor = controls[UNFILTERED], controls[FILTERED]
    original_retain = ceiling[0]["retain_acc"]
    curves = {label: run["tamper"]["records"] for label, run in runs.items()} | controls
    rows = [
        row(label, records, summarize(records, ceiling, floor, original_retain, CHANCE))
        for label, records in curves.items()
    ]
    table = markdown_table(rows)
    (out / "ablation.md").write_text(
        f"# Retain-term ablation: {cfg.method}\n\nAttack: {settings.describe()}\n\n{table}"
    )
    (out / "ablation.json").write_text(
        json.dumps({"settings": asdict(settings), "rows": rows}, indent=2) + "\n"
    )
    plot_recovery(
        curves,
        out / "ablation.png",
        title=f"Retain-term ablation of {cfg.method}: {settings.describe()}",
        chance=CHANCE,
        original_level=ceiling[0]["forget_acc"],
    )
    print(f"\n{table}\nwrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    return {"rows": rows}


if __name__ == "__main__":
    run_recipe(main, Config)
