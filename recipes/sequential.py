"""Sequential unlearning: unlearn one block at a time, back to front, through the frozen original.

Loads the toy world's unfiltered model (building the world on first use), evaluates it, then runs
one phase per block (`unlearn.methods.sequential`): the block's output on forget text is routed
through the original model's later blocks and pushed to maximum entropy, with a retain term
through the updated model; only that block trains, for --num_steps steps, and the schedules
restart every phase. It evaluates again and writes to --out:

    run_info.json     the full config, git SHA, machine and command line
    layer<L>/         each phase's state and metrics.jsonl (a rerun resumes at the right phase)
    metrics.jsonl     every phase's records on one step axis (with "layer")
    training.png      those curves
    model/            the unlearned model and its tokenizer
    results.json      forget_acc, retain_acc, the same before unlearning, and more

Commands:
    python -m recipes.sequential --out runs/sequential
    python -m recipes.sequential --out runs/seq --forget_loss random_ce --maintain_unlearned true
    python -m recipes.sequential --out /tmp/smoke --world_preset tiny --num_steps 2
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from unlearn.data import PairedBatches, tokenize_documents
from unlearn.experiment import (
    DataConfig,
    ModelConfig,
    TrainingConfig,
    evaluate,
    load_setup,
    report,
    start_run,
)
from unlearn.methods.sequential import SequentialConfig, run_sequential
from unlearn.plots import plot_training
from unlearn.provenance import write_run_info
from unlearn.runs import run_recipe
from unlearn.train_state import saved_train_seconds


@dataclass
class Config:
    """Sequential unlearning on the toy world (or any causal LM); --num_steps is per block."""

    out: str = "runs/sequential"
    """Output directory (rerun the same command to resume)."""
    overwrite: bool = False
    """Delete what --out holds and start over (a rerun without it resumes the same run and refuses
    any other: another recipe, config, model, data or code version)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32))
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(
            num_steps=60, lr=2e-3, warmup_steps=5, eval_every=0, save_every=20
        )
    )
    method: SequentialConfig = field(default_factory=SequentialConfig)


def main(cfg: Config) -> dict[str, float]:
    """Unlearn block by block and return results.json's numbers."""
    out = Path(cfg.out).expanduser()
    start_run(
        out, "sequential", cfg, cfg.model, cfg.data, overwrite=cfg.overwrite, train_cfg=cfg.training
    )
    write_run_info(out, asdict(cfg))
    torch.manual_seed(cfg.training.seed)
    setup = load_setup(cfg.model, cfg.data)
    model, tokenizer = setup.loaded.hf_model.float(), setup.loaded.tokenizer
    headline = cfg.data.eval_template
    before = {
        **evaluate(model, tokenizer, setup.items, headline),
        **report(model, tokenizer, setup),
    }

    batches = PairedBatches(
        tokenize_documents(tokenizer, setup.forget_docs, cfg.data.max_len),
        tokenize_documents(tokenizer, setup.retain_docs, cfg.data.max_len),
        batch_size=cfg.data.batch_size,
        seed=cfg.training.seed,
        use_value_mask=cfg.data.use_value_mask,
    )
    eval_items = {
        kind: {s: v for s, v in splits.items() if s in ("forget_dev", "retain")}
        for kind, splits in setup.items.items()
        if kind in (headline, "items")
    }
    train_cfg = cfg.training
    result = run_sequential(
        model,
        cfg.method,
        batches,
        steps_per_layer=train_cfg.num_steps,
        out_dir=out,
        optim=train_cfg.optim_settings(),
        lora=train_cfg.lora_settings(),
        eval_fn=lambda m: evaluate(m, tokenizer, eval_items, headline),
        eval_every=train_cfg.eval_every,
        save_every=train_cfg.save_every,
        seed=train_cfg.seed,
        on_nonfinite=train_cfg.on_nonfinite,
    )
    seconds = sum(saved_train_seconds(phase.out_dir) for phase in result.phases)
    after = {
        **evaluate(result.model, tokenizer, setup.items, headline),
        **report(result.model, tokenizer, setup),
    }

    result.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    # One step axis over the phases: phase i's step s is i * num_steps + s.
    history = [
        {**record, "step": i * train_cfg.num_steps + record["step"], "layer": phase.layer}
        for i, phase in enumerate(result.phases)
        for record in phase.history
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    plot_training(history, out / "training.png", title="sequential")
    results = {
        **after,
        **{f"{k}_before": v for k, v in before.items()},
        "num_steps": train_cfg.num_steps * len(result.phases),
        "num_phases": len(result.phases),
        "train_seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(
        f"test forget {before['forget_acc']:.3f} -> {after['forget_acc']:.3f}, "
        f"retain {before['retain_acc']:.3f} -> {after['retain_acc']:.3f}; {out}"
    )
    return results


if __name__ == "__main__":
    run_recipe(main, Config)
