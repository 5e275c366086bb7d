"""Checkpoint activation transfer: unlearn by pulling forget activations onto an early checkpoint's.

Builds or reuses the toy world, then: sweeps the model's saved training checkpoints on the forget
items and picks the latest one still within --margin of chance (teacher_sweep/: table and PNG);
fits a map per layer from the teacher's block outputs to the model's on retain text (--map_kind:
ridge "affine", or "svcca": reduce each side by SVD to --svcca_variance of its variance, then CCA),
reporting held-out MSE of every fitted kind next to the identity map's (maps/heldout_mse.json;
svcca also writes kept dimensions and canonical correlations to maps/svcca.json); unlearns with the
masked MSE between the model's forget activations and the mapped teacher's plus a retain term;
evaluates; attacks the unlearned model with the standard tamper attack (recipes.tamper's "full"
preset) next to the unfiltered model and the filtered twin (tamper/: tamper_results.json and
tamper.png; --tamper false skips it); and prints a summary table. Outputs as every unlearning
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

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from unlearn.data import tokenize_documents
from unlearn.experiment import (
    DataConfig,
    ModelConfig,
    TrainingConfig,
    load_setup,
    run_unlearning,
    start_run,
    summary_table,
)
from unlearn.methods import CheckpointTransfer, CheckpointTransferConfig
from unlearn.models import list_checkpoints, load_model
from unlearn.runs import run_recipe
from unlearn.tamper import ATTACK_PRESETS
from unlearn.tamper_report import attack_report, resolve_model
from unlearn.transfer import (
    fit_affine_maps,
    save_maps,
    select_checkpoint,
    sweep_checkpoints,
    write_sweep,
)


@dataclass
class Config:
    """Checkpoint activation transfer on the toy world (or any causal LM with checkpoints)."""

    out: str = "runs/checkpoint_transfer"
    """Output directory (rerun the same command to resume training)."""
    overwrite: bool = False
    """Delete what --out holds and start over (a rerun without it resumes the same run and refuses
    any other: another recipe, config, model, data or code version)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=300, lr=3e-3))
    method: CheckpointTransferConfig = field(default_factory=CheckpointTransferConfig)
    teacher_revisions: list[str] | None = None
    """Checkpoints to sweep, oldest first (default: every saved checkpoint of the model but the
    last; a hub model needs them listed)."""
    chance: float = 0.25
    """Chance accuracy of the forget items."""
    margin: float = 0.05
    """The teacher is the latest checkpoint with forget accuracy <= chance + margin."""
    map_kind: Literal["affine", "svcca", "identity"] = "affine"
    """Map teacher activations into the model's basis by ridge regression ("affine") or through
    SVCCA ("svcca"; the ridge map is fitted too, as a baseline in the MSE report), or use them as
    they are ("identity")."""
    ridge: float = 1e-3
    """Ridge penalty of the affine maps (relative to the mean input energy)."""
    svcca_variance: float = 0.99
    """Share of each side's variance that SVCCA keeps before CCA, in (0, 1]."""
    map_docs: int = 640
    """Retain documents to fit the maps on (the last fifth held out for the MSE report)."""
    tamper: bool = True
    """Attack the unlearned model at the end (with the unfiltered and filtered controls)."""
    tamper_steps: int = 300
    """Steps of that attack."""

    def __post_init__(self) -> None:
        if not 0.0 < self.svcca_variance <= 1.0:
            raise ValueError(
                f"--svcca_variance must be in (0, 1] (a share of variance), got "
                f"{self.svcca_variance}"
            )


ATTACK_REPORT_STEPS = (25, 100, 300)
"""Attack steps the summary prints."""


def main(cfg: Config) -> dict[str, float]:
    """Select a teacher, fit maps, unlearn; return results.json's numbers plus the teacher's."""
    out = Path(cfg.out).expanduser()
    run_key = start_run(
        out,
        "checkpoint_transfer",
        cfg,
        cfg.model,
        cfg.data,
        overwrite=cfg.overwrite,
        train_cfg=cfg.training,
        models={"teacher": cfg.method.teacher},
    )
    setup = load_setup(cfg.model, cfg.data)
    source = cfg.method.teacher or setup.loaded.source
    kind = cfg.data.eval_template if "items" not in setup.items else "items"
    forget_items = [
        *setup.items[kind].get("forget_attack", []),
        *setup.items[kind]["forget_dev"],
    ]
    revisions = cfg.teacher_revisions or list_checkpoints(source)[:-1]
    scores = sweep_checkpoints(
        source, revisions, forget_items, setup.items[kind]["retain"], device=cfg.model.device
    )
    chosen = select_checkpoint(scores, cfg.chance, cfg.margin)
    write_sweep(scores, chosen, out / "teacher_sweep", chance=cfg.chance)

    maps_path, fitted = None, None
    if cfg.map_kind != "identity":
        teacher = load_model(source, revision=chosen.revision, device=cfg.model.device).hf_model
        rows = tokenize_documents(
            setup.loaded.tokenizer, setup.retain_docs[: cfg.map_docs], cfg.data.max_len
        )
        size = cfg.data.batch_size
        batches = [
            rows.batch(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)
        ]
        layers = cfg.method.layers or list(range(setup.loaded.hf_model.config.num_hidden_layers))
        fitted = fit_affine_maps(
            teacher,
            setup.loaded.hf_model,
            batches,
            layers,
            ridge=cfg.ridge,
            svcca_variance=cfg.svcca_variance if cfg.map_kind == "svcca" else None,
            n_heldout=max(1, len(batches) // 5),
        )
        maps = (
            fitted.affine
            if cfg.map_kind == "affine"
            else {layer: fit.map for layer, fit in fitted.svcca.items()}
        )
        maps_path = str(save_maps(maps, out / "maps"))
        (out / "maps" / "heldout_mse.json").write_text(json.dumps(fitted.mse, indent=2) + "\n")
        if fitted.svcca:
            svcca_info = {
                layer: {
                    "dims_teacher": fit.dims_in,
                    "dims_model": fit.dims_out,
                    "correlations": fit.correlations.tolist(),
                }
                for layer, fit in fitted.svcca.items()
            }
            (out / "maps" / "svcca.json").write_text(json.dumps(svcca_info, indent=2) + "\n")
    method_cfg = replace(
        cfg.method, teacher=source, teacher_revision=chosen.revision, maps_path=maps_path
    )
    results = run_unlearning(
        lambda n_layers: CheckpointTransfer(method_cfg, n_layers, device=cfg.model.device),
        cfg.model,
        cfg.data,
        cfg.training,
        out,
        {**asdict(cfg), "selected_teacher": chosen.revision},
        name="checkpoint_transfer",
        setup=setup,
        run_key=run_key,
    )

    print(
        f"\nteacher: {chosen.revision} (forget {chosen.forget_acc:.3f}"
        + (f", retain {chosen.retain_acc:.3f})" if chosen.retain_acc is not None else ")")
    )
    if fitted is not None:
        print(
            f"held-out map MSE ({' / '.join(fitted.mse)}): "
            + ", ".join(
                f"L{layer} " + "/".join(f"{per[layer]:.3f}" for per in fitted.mse.values())
                for layer in fitted.mse["identity"]
            )
        )
    if fitted is not None and fitted.svcca:
        print(
            "svcca kept dims (teacher/model), top canonical correlations: "
            + ", ".join(
                f"L{layer} {fit.dims_in}/{fit.dims_out} "
                + " ".join(f"{rho:.3f}" for rho in fit.correlations[:3].tolist())
                for layer, fit in fitted.svcca.items()
            )
        )
    print(summary_table(results))
    if not cfg.tamper:
        return {**results, "teacher_forget_acc": chosen.forget_acc}

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
    return {
        **results,
        "teacher_forget_acc": chosen.forget_acc,
        "tamper_forget_acc_peak": report["summary"]["forget_acc_peak"],
    }


if __name__ == "__main__":
    run_recipe(main, Config)
