"""Train a tuned lens (one affine translator per layer) and compare it with the logit lens.

For each block output but the last, fits an identity-initialized affine map so that decoding it
through the final norm and unembedding matches the model's own output distribution (KL), on the toy
world's pretraining text (both domains, without the held-out test entities). Then reports, per
layer, KL(p_final ‖ p_lens) on held-out validation text for the logit lens and the tuned lens.
Writes lens/ (safetensors), comparison.json, lens_kl.png and run_info.json to --out; pass
`--lens_path <out>/lens` to recipes.lens_unlearn.

Commands:
    python -m recipes.tuned_lens --out runs/tuned_lens
    python -m recipes.tuned_lens --out /tmp/smoke --world_preset tiny --num_steps 2
    python -m recipes.tuned_lens --out runs/lens --model EleutherAI/pythia-14m \
        --train_data train.jsonl --eval_data heldout.jsonl
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from unlearn.data import read_documents, tokenize_documents
from unlearn.experiment import TOYWORLD, ModelConfig, start_run
from unlearn.lens import TunedLens, lens_kl, train_tuned_lens
from unlearn.models import load_model
from unlearn.plots import plot_lens_comparison
from unlearn.provenance import write_run_info
from unlearn.runs import run_recipe
from unlearn.toyworld import build_world, get_preset
from unlearn.toyworld.world import TEST


@dataclass
class Config:
    """Tuned-lens training and comparison."""

    out: str = "runs/tuned_lens"
    """Output directory (rerun the same command to redo the run there)."""
    overwrite: bool = False
    """Delete what --out holds and start over (without it, a folder that holds another run, or
    files of no keyed run, is refused)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train_data: str | None = None
    """JSON-lines documents to fit on (default: the toy world's pretraining text)."""
    eval_data: str | None = None
    """JSON-lines held-out documents (default: the toy world's validation text)."""
    num_steps: int = 300
    """Optimizer steps."""
    lr: float = 1e-3
    """AdamW learning rate."""
    batch_size: int = 16
    """Documents per step."""
    max_len: int = 128
    """Longest document row in tokens."""
    seed: int = 0
    """Seed of the document order."""

    def __post_init__(self) -> None:
        if min(self.num_steps, self.batch_size) < 1 or self.max_len < 2 or not self.lr > 0:
            raise ValueError(
                "--num_steps and --batch_size must be >= 1, --max_len >= 2 and --lr > 0; got "
                f"{self.num_steps}, {self.batch_size}, {self.max_len}, {self.lr}"
            )
        is_toy = self.model.model.split(":")[0] == TOYWORLD
        if not is_toy and (self.train_data is None or self.eval_data is None):
            raise ValueError("a model other than the toy world needs --train_data and --eval_data")


def main(cfg: Config) -> dict[str, float]:
    """Train, compare, save; return the mean per-layer KL of both lenses."""
    out = Path(cfg.out).expanduser()
    start_run(
        out,
        "tuned_lens",
        cfg,
        cfg.model,
        overwrite=cfg.overwrite,
        documents={"train_data": cfg.train_data, "eval_data": cfg.eval_data},
    )
    write_run_info(out, asdict(cfg))
    torch.manual_seed(cfg.seed)
    source = cfg.model.model
    if source.split(":")[0] == TOYWORLD:
        world = build_world(
            get_preset(cfg.model.world_preset, seed=cfg.model.world_seed),
            preset=cfg.model.world_preset,
        )
        source = str(world.model_dir(source.partition(":")[2] or "unfiltered"))
        # Text that states test facts never trains the lens (the held-out test split is only
        # reported on); dev and attack entities may.
        test = set(world.heldout_entities()[TEST])
        train_docs = [
            doc
            for doc in world.corpus("pretrain_retain") + world.corpus("pretrain_forget")
            if doc["entity"] not in test
        ]
        eval_docs = [
            doc
            for doc in world.corpus("val_retain") + world.corpus("val_forget")
            if doc["entity"] not in test
        ]
    if cfg.train_data is not None:
        train_docs = read_documents(cfg.train_data, "--train_data")
    if cfg.eval_data is not None:
        eval_docs = read_documents(cfg.eval_data, "--eval_data")
    loaded = load_model(source, revision=cfg.model.revision, device=cfg.model.device)
    model, tokenizer = loaded.hf_model, loaded.tokenizer

    order = torch.randperm(len(train_docs)).tolist()
    train_rows = tokenize_documents(tokenizer, [train_docs[i] for i in order], cfg.max_len)
    eval_rows = tokenize_documents(tokenizer, eval_docs, cfg.max_len)
    n_batches = min(cfg.num_steps, len(train_rows) // cfg.batch_size) or 1
    train_batches = [
        train_rows.batch(range(i * cfg.batch_size, (i + 1) * cfg.batch_size))
        for i in range(n_batches)
    ]
    eval_batches = [
        eval_rows.batch(range(i, min(i + 64, len(eval_rows)))) for i in range(0, len(eval_rows), 64)
    ]

    lens = TunedLens.for_model(model)
    losses = train_tuned_lens(model, lens, train_batches, num_steps=cfg.num_steps, lr=cfg.lr)
    lens.save(out / "lens")
    kl = lens_kl(model, lens, eval_batches)
    wins = all(t < g for t, g in zip(kl["tuned"], kl["logit"], strict=True))
    comparison = {
        "layers": list(range(len(kl["logit"]))),
        **kl,
        "tuned_wins_every_layer": wins,
        "final_train_kl": losses[-1],
    }
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    plot_lens_comparison(kl, out / "lens_kl.png")

    print(f"{'layer':>6}{'logit lens KL':>16}{'tuned lens KL':>16}")
    for layer, (g, t) in enumerate(zip(kl["logit"], kl["tuned"], strict=True)):
        print(f"{layer:>6}{g:>16.4f}{t:>16.4f}")
    print(f"lens saved to {out / 'lens'}")
    return {
        "logit_kl_mean": sum(kl["logit"]) / len(kl["logit"]),
        "tuned_kl_mean": sum(kl["tuned"]) / len(kl["tuned"]),
    }


if __name__ == "__main__":
    run_recipe(main, Config)
