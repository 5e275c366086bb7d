"""Build a toy world end to end: text, tokenizer, both pretraining runs, evaluations, report.

`build_world(cfg)` is idempotent and resumable: each stage leaves a marker or a file, and a rerun
(after a kill, say) skips what is done. A world whose directory holds `COMPLETE` is returned at
once.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from unlearn.eval import evaluate_mc
from unlearn.models import list_checkpoints
from unlearn.plots import plot_checkpoint_accuracy
from unlearn.provenance import git_sha, machine
from unlearn.toyworld.config import ToyWorldConfig
from unlearn.toyworld.generator import ITEM_SPLITS, generate_world
from unlearn.toyworld.pretrain import (
    checkpoint_dir,
    pretrain,
    token_stream,
    train_tokenizer,
)
from unlearn.toyworld.world import MODEL_NAMES, ToyWorld, world_dir, write_jsonl

CHANCE = 0.25
"""Accuracy of guessing on a 4-way item."""


def _texts(world: ToyWorld, corpus: str) -> list[str]:
    return [doc["text"] for doc in world.corpus(corpus)]


def _write_data(cfg: ToyWorldConfig, root: Path) -> None:
    data = generate_world(cfg)
    for name, docs in data["corpora"].items():
        write_jsonl(root / "data" / f"{name}.jsonl", docs)
    for split, items in data["items"].items():
        write_jsonl(root / "data" / "items" / f"{split}.jsonl", items)
    facts = [
        {
            "entity": e,
            "split": data["splits"][e],
            "facts": data["facts"][e],
            "false_facts": data["false_facts"][e],
        }
        for e in data["facts"]
    ]
    write_jsonl(root / "data" / "facts.jsonl", facts)
    (root / "data" / ".done").touch()


def validation_loss(model: GPTNeoXForCausalLM, stream: torch.Tensor, n_ctx: int) -> float:
    """Mean next-token loss (nats/token) over non-overlapping windows of a token stream."""
    n_windows = len(stream) // n_ctx
    if n_windows == 0:
        raise ValueError(f"validation stream of {len(stream)} tokens is shorter than {n_ctx}")
    windows = stream[: n_windows * n_ctx].view(n_windows, n_ctx)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(64):
            logits = model(input_ids=chunk).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += chunk[:, 1:].numel()
    return total / count


def evaluate_checkpoint(
    model: GPTNeoXForCausalLM,
    tokenizer: Any,
    world: ToyWorld,
    val_streams: dict[str, torch.Tensor],
    n_ctx: int,
) -> dict[str, float]:
    """Accuracy on every item split with both templates, plus validation losses.

    Keys: `<split>_acc` and `<split>_acc_norm` (reserved template), the same with a `_seen` suffix
    (a template that post-pretraining corpora use), and `val_loss_forget`, `val_loss_retain`.
    """
    record: dict[str, float] = {}
    for template, suffix in (("reserved", ""), ("seen", "_seen")):
        for split in ITEM_SPLITS:
            result = evaluate_mc(model, tokenizer, world.items(split, template), batch_size=512)
            record[f"{split}_acc{suffix}"] = result.acc
            record[f"{split}_acc_norm{suffix}"] = result.acc_norm
    for name, stream in val_streams.items():
        record[f"val_loss_{name}"] = validation_loss(model, stream, n_ctx)
    return record


def _evaluate_all(world: ToyWorld, tokenizer: Any, cfg: ToyWorldConfig) -> dict[str, Any]:
    path = world.root / "evals.json"
    evals: dict[str, dict[str, dict[str, float]]] = (
        json.loads(path.read_text()) if path.exists() else {"unfiltered": {}, "filtered": {}}
    )
    val_streams = {
        name: token_stream(tokenizer, _texts(world, f"val_{name}")) for name in ("forget", "retain")
    }
    todo = [
        (name, ckpt) for name in MODEL_NAMES for ckpt in list_checkpoints(world.model_dir(name))
    ]
    for name, ckpt in tqdm(todo, desc="evaluate checkpoints", dynamic_ncols=True):
        step = ckpt.removeprefix("step")
        if name == "filtered" and int(step) <= cfg.stage1_steps and step in evals["unfiltered"]:
            # The twin is bit-identical to the unfiltered run up to the stage boundary.
            evals[name].setdefault(step, evals["unfiltered"][step])
        if step in evals[name]:
            continue
        model = GPTNeoXForCausalLM.from_pretrained(world.model_dir(name) / "checkpoints" / ckpt)
        model.eval()
        evals[name][step] = evaluate_checkpoint(model, tokenizer, world, val_streams, cfg.n_ctx)
        path.write_text(json.dumps(evals, indent=1, sort_keys=True))
    return evals


def _report(
    world: ToyWorld, cfg: ToyWorldConfig, evals: dict[str, Any], build_seconds: float
) -> dict[str, Any]:
    def by_step(records: dict[str, Any]) -> dict[int, Any]:
        return {int(step): rec for step, rec in sorted(records.items(), key=lambda kv: int(kv[0]))}

    unfiltered, filtered = by_step(evals["unfiltered"]), by_step(evals["filtered"])
    forget_keys = ("forget_attack_acc", "forget_heldout_acc")
    knows_retain_only = [
        step
        for step, rec in unfiltered.items()
        if rec["retain_acc"] >= 0.8 and all(rec[k] <= 0.35 for k in forget_keys)
    ]
    sizes = {f"{split}_facts": len(world.items(split)) for split in ITEM_SPLITS}
    sizes.update(
        {
            f"{name}_docs": len(world.corpus(name))
            for name in ("pretrain_forget", "pretrain_retain", "forget_attack", "retain")
        }
    )
    sizes["parameters"] = sum(
        p.numel() for p in GPTNeoXForCausalLM.from_pretrained(world.model_dir()).parameters()
    )
    return {
        "unfiltered": unfiltered[cfg.num_steps],
        "filtered": filtered[cfg.num_steps],
        "checkpoints": unfiltered,
        "filtered_checkpoints": filtered,
        "stage1_steps": cfg.stage1_steps,
        "num_steps": cfg.num_steps,
        "chance": CHANCE,
        "retain_known_forget_unknown_steps": knows_retain_only,
        "build_seconds": build_seconds,
        "sizes": sizes,
        "config_hash": cfg.hash(),
        "git_sha": git_sha(),
        "machine": machine(),
    }


def build_world(
    cfg: ToyWorldConfig,
    *,
    preset: str = "custom",
    root: Path | None = None,
    force: bool = False,
) -> ToyWorld:
    """Build (or finish building, or just return) the world of `cfg`.

    Args:
        cfg: The world's config.
        preset: Name used in the directory name (the hash decides identity).
        root: Parent directory of worlds (default `$UNLEARN_HOME/toyworld`).
        force: Rebuild from scratch even if a complete world exists.

    Returns:
        The built world; its `report()` holds the accuracies and `build_seconds`.
    """
    out = world_dir(cfg, preset, root)
    world = ToyWorld(out)
    if force and out.exists():
        shutil.rmtree(out)
    if world.is_complete:
        return world
    out.mkdir(parents=True, exist_ok=True)
    timing_path = out / "build_seconds.json"
    spent = json.loads(timing_path.read_text())["seconds"] if timing_path.exists() else 0.0
    start = time.perf_counter()

    def save_timing() -> float:
        total = spent + time.perf_counter() - start
        timing_path.write_text(json.dumps({"seconds": total}))
        return total

    (out / "config.json").write_text(
        json.dumps(
            {"config": asdict(cfg), "hash": cfg.hash(), "preset": preset, "git_sha": git_sha()},
            indent=2,
            sort_keys=True,
        )
    )
    if not (out / "data" / ".done").exists():
        _write_data(cfg, out)
    if not (world.tokenizer_dir / "tokenizer.json").exists():
        texts = _texts(world, "pretrain_forget") + _texts(world, "pretrain_retain")
        train_tokenizer(texts, cfg.vocab_size).save_pretrained(world.tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(world.tokenizer_dir)
    retain_stream = token_stream(tokenizer, _texts(world, "pretrain_retain"))
    forget_stream = token_stream(tokenizer, _texts(world, "pretrain_forget"))
    save_timing()

    for name, stream in (("unfiltered", forget_stream), ("filtered", None)):
        final_dir = world.model_dir(name)
        if (final_dir / "config.json").exists():
            continue
        fork = (
            checkpoint_dir(world.model_dir("unfiltered"), cfg.stage1_steps)
            if name == "filtered"
            else None
        )
        model = pretrain(
            cfg,
            tokenizer,
            final_dir,
            retain_stream,
            stream,
            fork_from=fork,
            keep_state_steps=(cfg.stage1_steps,),
            desc=f"pretrain {name}",
        )
        model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        save_timing()

    evals = _evaluate_all(world, tokenizer, cfg)
    build_seconds = save_timing()
    report = _report(world, cfg, evals, build_seconds)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot_checkpoint_accuracy(report, out / "accuracy.png")
    (out / "COMPLETE").touch()
    return world
