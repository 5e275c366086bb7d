"""Rewritten activation transfer: unlearn by pulling forget activations onto a false rewrite's.

Builds or reuses the toy world, tokenizes the forget documents and their rewritten twins (the toy
world's `forget_rewritten`: the same documents with every value replaced by a fixed false one, or
--rewritten_data), aligns them token by token, runs the frozen model once over the twins to get
aligned targets at --sites and --layers, then unlearns with the masked MSE between the model's
activations on the original documents and those targets, the twin's cross-entropy (the reference's
(1−λ)·CE, here with gradient) and a KL retain term; evaluates; and prints a summary table. Outputs
as every unlearning recipe (run_info.json, metrics.jsonl, training.png, model/, results.json) in
--out.

Measured with the committed defaults on the default toy world (one thread, 2-core machine shared
with other jobs; 2 min 04 s wall, 99 s of training, 1.7 GB peak memory): held-out forget 0.950 →
0.313, attack-split forget 0.969 → 0.193 (below the 0.25 chance: the model now prefers the twin's
false values, which it was trained toward on these entities), retain 0.996 → 0.940. Seeds 1 and 2:
held-out forget 0.303 / 0.343, retain 0.955 / 0.937. The cross-entropy does the forgetting: with
--forget_coef 0 (no MSE) held-out forget is 0.293 / 0.290 (seeds 0 / 2), with
--rewritten_ce_coef 0 (MSE only) 0.497; the best MSE-only runs (MLP outputs) reach 0.34-0.35 only
with retain 0.85-0.90 (the former MSE-only default, block outputs with retain coefficient 4 at
lr 3e-3: 0.417, retain 0.909). The MSE at a position that predicts a value is zero (the twin's
prefix is the original's), so it cannot teach the false value itself.

Commands:
    python -m recipes.rewritten_transfer --out runs/rewritten_transfer
    python -m recipes.rewritten_transfer --out /tmp/smoke --world_preset tiny --num_steps 2
    python -m recipes.rewritten_transfer --out runs/rw_di \
        --model EleutherAI/deep-ignorance-unfiltered --forget_data forget.jsonl \
        --rewritten_data rewritten.jsonl --retain_data retain.jsonl \
        --eval_items items/ --max_len 1024 --sites hook_resid_post hook_mlp_out

(The logits' targets take documents × tokens × d_vocab floats: drop `unembed` from --sites for a
large vocabulary.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from unlearn.data import read_documents, tokenize_documents
from unlearn.experiment import (
    TOYWORLD,
    DataConfig,
    ModelConfig,
    TrainingConfig,
    load_setup,
    run_unlearning,
    start_run,
    summary_table,
)
from unlearn.methods.rewritten_transfer import (
    RewrittenTransfer,
    RewrittenTransferConfig,
    rewritten_targets,
)
from unlearn.runs import run_recipe
from unlearn.toyworld import build_world, get_preset


@dataclass
class Config:
    """Rewritten activation transfer on the toy world (or any causal LM with rewritten docs).

    Defaults: MSE (coefficient 1) at every block output, MLP output and the logits, the twin's
    cross-entropy at the value tokens (coefficient 2), KL retain (coefficient 8); 300 steps at
    lr 2e-3, 32 rows per step. The cross-entropy is what moves held-out forget below 0.35 (module
    docstring).
    """

    out: str = "runs/rewritten_transfer"
    """Output directory (rerun the same command to resume training)."""
    overwrite: bool = False
    """Delete what --out holds and start over (a rerun without it resumes the same run and refuses
    any other: another recipe, config, model, data or code version)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32, use_value_mask=True))
    """Default: 32 forget + 32 retain rows per step; forget terms at value tokens only (with every
    token instead: held-out forget 0.450, measured at seed 2)."""
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=300, lr=2e-3))
    """Default: 300 AdamW steps at a constant 2e-3 (measured: 1.5e-3 leaves held-out forget at
    0.29-0.36 over seeds 0-2; 400 steps lowers retain to 0.905 at seed 2)."""
    method: RewrittenTransferConfig = field(
        default_factory=lambda: RewrittenTransferConfig(
            sites=("hook_resid_post", "hook_mlp_out", "unembed"),
            rewritten_ce_coef=2.0,
            retain_coef=8.0,
        )
    )
    """Default: MSE (coefficient 1) at every block output, MLP output and the logits (the
    reference's hook kinds), the twin's cross-entropy at the value tokens (coefficient 2; without
    it held-out forget stays at 38-50%), KL retain (coefficient 8)."""
    rewritten_data: str | None = None
    """JSON-lines rewritten documents, line i the twin of forget document i; default: the toy
    world's forget_rewritten."""

    def __post_init__(self) -> None:
        if self.rewritten_data is None and self.model.model.split(":")[0] != TOYWORLD:
            raise ValueError(
                f"model {self.model.model!r} is not the toy world: pass --rewritten_data "
                "(JSON-lines rewritten twins of the forget documents)"
            )


def main(cfg: Config) -> dict[str, float]:
    """Align forget documents with their rewrites, precompute targets, unlearn; return results."""
    out = Path(cfg.out).expanduser()
    run_key = start_run(
        out,
        "rewritten_transfer",
        cfg,
        cfg.model,
        cfg.data,
        overwrite=cfg.overwrite,
        train_cfg=cfg.training,
        documents={"rewritten_data": cfg.rewritten_data},
    )
    setup = load_setup(cfg.model, cfg.data)
    if cfg.rewritten_data is not None:
        rewritten_docs = read_documents(cfg.rewritten_data, "--rewritten_data")
    else:
        world = build_world(
            get_preset(cfg.model.world_preset, seed=cfg.model.world_seed),
            preset=cfg.model.world_preset,
        )
        rewritten_docs = world.corpus("forget_rewritten")
    rewritten_docs = rewritten_docs[: len(setup.forget_docs)]
    for original, rewritten in zip(setup.forget_docs, rewritten_docs, strict=False):
        if "id" in original and "id" in rewritten and original["id"] not in rewritten["id"]:
            raise ValueError(
                f"rewritten document {rewritten['id']!r} is not the twin of {original['id']!r}: "
                "line i of the rewritten data must rewrite forget document i"
            )

    model, tokenizer = setup.loaded.hf_model.float(), setup.loaded.tokenizer
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if cfg.method.layers is None else cfg.method.layers
    # The same tokenization as run_unlearning's forget rows, so Batch.rows index these targets.
    targets = rewritten_targets(
        model,
        tokenize_documents(tokenizer, setup.forget_docs, cfg.data.max_len),
        tokenize_documents(tokenizer, rewritten_docs, cfg.data.max_len),
        layers,
        sites=cfg.method.sites,
        batch_size=cfg.data.batch_size,
    )
    results = run_unlearning(
        lambda n: RewrittenTransfer(cfg.method, n, targets),
        cfg.model,
        cfg.data,
        cfg.training,
        out,
        asdict(cfg),
        name="rewritten_transfer",
        setup=setup,
        run_key=run_key,
    )

    print(summary_table(results))
    return results


if __name__ == "__main__":
    run_recipe(main, Config)
