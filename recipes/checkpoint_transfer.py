"""Checkpoint activation transfer: unlearn by pulling forget activations onto an early checkpoint's.

A preset of `python -m recipes.unlearn --method checkpoint_transfer`
(`unlearn.methods.checkpoint_transfer`): builds or reuses the toy world; sweeps the model's saved
training checkpoints on the tuning items and picks the latest one still within --margin of
chance (teacher_sweep/: table and PNG); fits a map per layer from the teacher's block outputs to
the model's on retain text (--map_kind: ridge "affine", or "svcca"; maps/ with held-out MSE);
unlearns with the masked MSE between the model's forget activations and the mapped teacher's
plus a retain term; evaluates; then attacks the unlearned model with the standard tamper attack
(the "full" preset) next to the unfiltered model and the filtered twin (tamper/: tamper_results.json
and tamper.png; --tamper false skips it) and prints a summary table. Outputs as every unlearning
recipe (run_info.json, metrics.jsonl, training.png, model/, results.json) in --out.

Commands:
    python -m recipes.checkpoint_transfer --out runs/checkpoint_transfer
    python -m recipes.checkpoint_transfer --out runs/ct_svcca --map_kind svcca --svcca_variance 0.99
    python -m recipes.checkpoint_transfer --out /tmp/smoke --world_preset tiny --num_steps 2 \
        --margin 1.0
    python -m recipes.checkpoint_transfer --out runs/di \
        --model EleutherAI/deep-ignorance-unfiltered \
        --teacher EleutherAI/deep-ignorance-pretraining-stage-unfiltered \
        --teacher_revisions global_step38144 global_step50064 global_step54832 \
        --forget_data forget.jsonl --retain_data retain.jsonl --eval_items items/
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import simple_parsing

from recipes.unlearn import config_class, run
from unlearn.experiment import load_setup
from unlearn.runs import run_recipe
from unlearn.tamper import ATTACK_PRESETS
from unlearn.tamper_report import attack_report, resolve_model

Config = config_class(
    "checkpoint_transfer",
    (
        (
            "tamper",
            bool,
            simple_parsing.field(
                default=True,
                help="Attack the unlearned model at the end (with the unfiltered and filtered "
                "controls).",
            ),
        ),
        ("tamper_steps", int, simple_parsing.field(default=300, help="Steps of that attack.")),
    ),
)

ATTACK_REPORT_STEPS = (25, 100, 300)
"""Attack steps the summary prints."""


def main(cfg: Any) -> dict[str, Any]:
    """Select a teacher, fit maps, unlearn, attack; return results.json's numbers and more."""
    results = run(cfg)
    if not cfg.tamper:
        return results
    out = Path(cfg.out).expanduser()
    model_cfg, weights = resolve_model(str(out), cfg.model)
    report = attack_report(
        load_setup(model_cfg, cfg.data, weights=weights),
        replace(ATTACK_PRESETS["full"], num_steps=cfg.tamper_steps),
        out / "tamper",
        label="checkpoint_transfer",
        benign=False,
        weights=weights,
        device=cfg.model.device,
    )
    curves = {"unlearned": report["records"], **report["controls"]}
    steps = [s for s in ATTACK_REPORT_STEPS if s <= cfg.tamper_steps]
    print(f"\ntamper attack ({out / 'tamper' / 'tamper.png'}): held-out forget after N steps")
    print(f"{'':<26}" + "".join(f"{f'N={s}':>8}" for s in [0, *steps]))
    for label, records in curves.items():
        at = {r["step"]: r["forget_acc"] for r in records}
        print(f"{label:<26}" + "".join(f"{at.get(s, float('nan')):>8.3f}" for s in [0, *steps]))
    first = report["summary"].get("steps_to_exceed_filtered")
    if "held" in report["summary"]:
        print(
            "held-out forget stayed within 10 points of the filtered twin"
            if first is None
            else f"held-out forget exceeded the filtered twin's by 10 points at step {first}"
        )
    return {**results, "tamper_forget_acc_peak": report["summary"]["forget_acc_peak"]}


if __name__ == "__main__":
    run_recipe(main, Config)
