"""Tamper attack: fine-tune a model on the forget domain and plot how fast held-out facts return.

Fine-tunes on the forget domain's attack split (entities disjoint from the held-out evaluation
items) and evaluates held-out forget and retain accuracy at step 0, early steps, every --eval_every
steps and the last step. On the toy world it also attacks, with the same settings, the unfiltered
model, the filtered twin (the reference) and runs a benign retain-only fine-tune of the model
(controls; the first two are cached in the world's directory). Writes to --out:

    tamper_results.json   settings, one record per evaluation (step, forget_acc, retain_acc,
                          loss, per-item credit), the controls' records, and a summary (peak,
                          excess over the filtered twin, steps until 10 points above it,
                          collapsed or not)
    tamper.png            recovery curves with the unfiltered level, chance and the controls
    run_info.json         config, git SHA, machine, command line

Commands:
    python -m recipes.tamper --model runs/checkpoint_transfer      # an unlearning run's output
    python -m recipes.tamper --model toyworld:filtered --preset lora --out runs/tamper_filtered
    python -m recipes.tamper --plot_only runs/a/tamper_results.json runs/b/tamper_results.json \
        --out runs/compare                                          # overlay several attacks
    python -m recipes.tamper --world_preset tiny --num_steps 2 --out /tmp/tamper_smoke
    python -m recipes.tamper --model my-org/unlearned --attack_data bio_forget.jsonl \
        --retain_data wiki.jsonl --eval_items items/ --lr 2e-5 --num_steps 1000
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

import simple_parsing

from unlearn.experiment import TOYWORLD, DataConfig, ModelConfig, check_inputs, load_setup
from unlearn.lm_eval_scoring import check_evaluator
from unlearn.provenance import write_run_info
from unlearn.runs import check_choices, parse_config, run_recipe
from unlearn.tamper import ATTACK_PRESETS, AttackSettings
from unlearn.tamper_report import PLOT_FILE, attack_report, plot_results, resolve_model
from unlearn.toyworld.config import WorldPreset

PresetName = Literal["full", "lora", "repair_then_attack", "benign"]
PRESET_HELP = (
    "Attack preset (unlearn.tamper.ATTACK_PRESETS), read before the other flags: the attack "
    "flags default to its settings."
)


@dataclass
class Config:
    """A tamper attack on the toy world (or any causal LM with attack data and items)."""

    model: str = "toyworld"
    """An unlearning recipe's output directory, a model directory, "toyworld[:filtered]" or a
    Hugging Face name."""
    out: str = "runs/tamper"
    """Output directory (rerun the same command to resume)."""
    attack: AttackSettings = field(default_factory=AttackSettings)
    """The attack (flags --num_steps, --lr, --lora_rank, --batch_size, ...)."""
    controls: bool = True
    """Also attack the unfiltered model and the filtered twin and run a benign fine-tune
    (toy world only)."""
    plot_only: list[str] | None = None
    """Only redraw --out/tamper.png from these tamper_results.json files (overlaid)."""
    world_preset: WorldPreset = "default"
    """Toy-world preset (when --model is a toy-world name)."""
    world_seed: int = 0
    """Toy-world seed."""
    device: str = field(default_factory=lambda: ModelConfig().device)
    """Device of the models."""
    attack_data: str | None = None
    """JSON-lines attack documents for a non-toy model."""
    retain_data: str | None = None
    """JSON-lines retain documents (benign control, repair) for a non-toy model."""
    eval_items: str | None = None
    """Directory of forget_heldout.jsonl and retain.jsonl items for a non-toy model."""


@functools.cache
def config_class(preset: str = "full") -> type[Config]:
    """`Config` plus `--preset`, with the attack flags defaulting to that preset's settings.

    Raises:
        ValueError: An unknown preset.
    """
    if preset not in ATTACK_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(ATTACK_PRESETS)}")
    settings = ATTACK_PRESETS[preset]

    def check(self: Any) -> None:
        if self.preset != preset:
            raise ValueError(
                f"--preset {self.preset} cannot change the defaults already set by {preset!r}; "
                "parse the flags with recipes.tamper.parse_args"
            )

    return make_dataclass(
        f"Config_{preset}",
        [
            ("attack", AttackSettings, field(default_factory=lambda: settings)),
            ("preset", PresetName, simple_parsing.field(default=preset, help=PRESET_HELP)),
        ],
        bases=(Config,),
        namespace={
            "__doc__": Config.__doc__,
            "__module__": __name__,
            "__post_init__": check,
        },
    )


def parse_args(args: Sequence[str] | None = None) -> Config:
    """The config of these flags: `--preset` first sets the attack flags' defaults."""
    args = list(sys.argv[1:] if args is None else args)
    return parse_config(config_class(_preset(args)), args)


def _preset(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", default="full", choices=sorted(ATTACK_PRESETS))
    return parser.parse_known_args(args)[0].preset


def main(cfg: Config) -> dict:
    """Attack the model (and the controls); return tamper_results.json's contents."""
    check_choices(cfg)
    out = Path(cfg.out).expanduser()
    if cfg.plot_only:
        plot_results(cfg.plot_only, out / PLOT_FILE)
        print(f"wrote {out / PLOT_FILE}")
        return {}
    settings = cfg.attack
    check_evaluator(settings.evaluator)
    write_run_info(out, asdict(cfg), attack_settings=asdict(settings))

    defaults = ModelConfig(
        world_preset=cfg.world_preset, world_seed=cfg.world_seed, device=cfg.device
    )
    model_cfg, weights = resolve_model(cfg.model, defaults)
    data = (cfg.attack_data, cfg.retain_data, cfg.eval_items)
    if model_cfg.model.split(":")[0] != TOYWORLD and None in data:
        raise ValueError(
            f"model {cfg.model!r} is not the toy world: pass --attack_data, --retain_data and "
            "--eval_items (JSON-lines documents and a directory of <split>.jsonl items)"
        )
    data_cfg = DataConfig(
        forget_data=cfg.attack_data, retain_data=cfg.retain_data, eval_items=cfg.eval_items
    )
    check_inputs(model_cfg, data_cfg)  # files parse and the model exists, before loading it
    setup = load_setup(model_cfg, data_cfg, weights=weights)
    report = attack_report(
        setup,
        settings,
        out,
        label=Path(cfg.model).name,
        controls=cfg.controls,
        weights=weights,
        device=cfg.device,
    )

    print(f"\n{settings.describe()}")
    print(f"{'model':<28}{'step':>6}{'held-out forget':>17}{'retain':>9}")
    curves = {report["label"]: report["records"], **report["controls"]}
    for label, records in curves.items():
        peak = max(records, key=lambda r: r["forget_acc"])
        for record in sorted(
            {id(r): r for r in (records[0], peak, records[-1])}.values(), key=lambda r: r["step"]
        ):
            print(
                f"{label[:27]:<28}{record['step']:>6}{record['forget_acc']:>17.3f}"
                f"{record['retain_acc']:>9.3f}"
            )
    summary = report["summary"]
    if "held" in summary:
        verdict = (
            "held for the whole attack"
            if summary["held"]
            else f"exceeded the filtered twin by 10 points at step "
            f"{summary['steps_to_exceed_filtered']}"
        )
        collapsed = " (collapsed: retain near chance)" if summary.get("collapsed") else ""
        print(f"held-out forget {verdict}{collapsed}")
    print(f"wrote {out / 'tamper_results.json'} and {out / PLOT_FILE}")
    return report


if __name__ == "__main__":
    argv = sys.argv[1:]
    run_recipe(main, config_class(_preset(argv)), argv)
