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

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from unlearn.experiment import TOYWORLD, DataConfig, ModelConfig, check_inputs, load_setup
from unlearn.provenance import write_run_info
from unlearn.runs import check_choices, run_recipe
from unlearn.tamper import ATTACK_PRESETS, AttackSettings
from unlearn.tamper_report import PLOT_FILE, attack_report, plot_results, resolve_model


@dataclass
class Config:
    """A tamper attack on the toy world (or any causal LM with attack data and items)."""

    model: str = "toyworld"
    """An unlearning recipe's output directory, a model directory, "toyworld[:filtered]" or a
    Hugging Face name."""
    out: str = "runs/tamper"
    """Output directory (rerun the same command to resume)."""
    preset: Literal["full", "lora", "repair_then_attack", "benign"] = "full"
    """Attack preset (unlearn.tamper.ATTACK_PRESETS); the flags below override it."""
    num_steps: int | None = None
    """Attack steps."""
    lr: float | None = None
    """Peak learning rate."""
    schedule: Literal["constant", "linear", "cosine"] | None = None
    """Learning-rate schedule after warmup."""
    warmup_steps: int | None = None
    """Warmup steps."""
    batch_size: int | None = None
    """Rows per step."""
    lora_rank: int | None = None
    """LoRA rank (0: full fine-tune)."""
    precision: Literal["float32", "bfloat16"] | None = None
    """Autocast dtype."""
    eval_every: int | None = None
    """Steps between evaluations."""
    seed: int | None = None
    """Seed of the data order."""
    controls: bool = True
    """Also attack the unfiltered model and the filtered twin and run a benign fine-tune
    (toy world only)."""
    plot_only: list[str] | None = None
    """Only redraw --out/tamper.png from these tamper_results.json files (overlaid)."""
    world_preset: Literal["default", "tiny"] = "default"
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

    def __post_init__(self) -> None:
        at_least = {"num_steps": 1, "batch_size": 1, "warmup_steps": 0, "lora_rank": 0}
        at_least["eval_every"] = 0
        problems = [
            f"--{name} must be >= {low}, got {value}"
            for name, low in at_least.items()
            if (value := getattr(self, name)) is not None and value < low
        ]
        if self.lr is not None and not self.lr > 0:
            problems.append(f"--lr must be a positive number (0 trains nothing), got {self.lr}")
        if problems:
            raise ValueError("; ".join(problems))


ATTACK_FLAGS = tuple(
    f.name for f in fields(Config) if f.name in {a.name for a in fields(AttackSettings)}
)
"""The flags that override the preset's `AttackSettings` (the fields both declare)."""


def main(cfg: Config) -> dict:
    """Attack the model (and the controls); return tamper_results.json's contents."""
    check_choices(cfg)
    out = Path(cfg.out).expanduser()
    if cfg.plot_only:
        plot_results(cfg.plot_only, out / PLOT_FILE)
        print(f"wrote {out / PLOT_FILE}")
        return {}
    overrides = {k: v for k in ATTACK_FLAGS if (v := getattr(cfg, k)) is not None}
    settings = replace(ATTACK_PRESETS[cfg.preset], **overrides)
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
    run_recipe(main, Config)
