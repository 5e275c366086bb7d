"""Tuned-lens unlearning: maximize the entropy of every layer's lens prediction on forget text.

Loads the toy world's unfiltered model (building the world on first use), evaluates it, unlearns
with the lens-entropy forget term plus a retain term (`unlearn.methods.lens_unlearn`), evaluates
again and writes run_info.json, metrics.jsonl, training.png, model/ and results.json to --out.

Commands:
    python -m recipes.lens_unlearn --out runs/lens_unlearn
    python -m recipes.lens_unlearn --out runs/lens --lens_path runs/tuned_lens/lens
    python -m recipes.lens_unlearn --out /tmp/smoke --world_preset tiny --num_steps 2
    python -m recipes.lens_unlearn --out runs/x --model EleutherAI/pythia-14m \
        --forget_data forget.jsonl --retain_data retain.jsonl --eval_items items/
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from unlearn.experiment import DataConfig, ModelConfig, TrainingConfig, run_unlearning, start_run
from unlearn.methods import LensUnlearn, LensUnlearnConfig
from unlearn.runs import run_recipe


@dataclass
class Config:
    """Tuned-lens unlearning on the toy world (or any causal LM)."""

    out: str = "runs/lens_unlearn"
    """Output directory (rerun the same command to resume)."""
    overwrite: bool = False
    """Delete what --out holds and start over (a rerun without it resumes the same run and refuses
    any other: another recipe, config, model, data or code version)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=300, lr=9e-4))
    method: LensUnlearnConfig = field(default_factory=LensUnlearnConfig)


def main(cfg: Config) -> dict[str, float]:
    """Unlearn and return results.json's numbers."""
    run_key = start_run(
        cfg.out,
        "lens_unlearn",
        cfg,
        cfg.model,
        cfg.data,
        overwrite=cfg.overwrite,
        train_cfg=cfg.training,
        paths={"lens_path": cfg.method.lens_path},
    )
    results = run_unlearning(
        lambda n_layers: LensUnlearn(cfg.method, n_layers, device=cfg.model.device),
        cfg.model,
        cfg.data,
        cfg.training,
        cfg.out,
        asdict(cfg),
        name="lens_unlearn",
        run_key=run_key,
    )
    print(
        f"held-out forget {results['forget_acc_before']:.3f} -> {results['forget_acc']:.3f}, "
        f"retain {results['retain_acc_before']:.3f} -> {results['retain_acc']:.3f}; {cfg.out}"
    )
    return results


if __name__ == "__main__":
    run_recipe(main, Config)
