"""Build a toy world end to end: text, tokenizer, both pretraining runs, evaluations, report.

`build_world(cfg)` is idempotent, resumable and safe to run from several processes at once:

- A world whose directory holds `COMPLETE` is returned at once.
- Otherwise the build takes a file lock next to the world directory (`<preset>-<hash>.lock`). A
  second build of the same world waits for it, then returns the world the first one finished, or
  resumes it if the first one died (the OS releases the lock of a dead process).
- Every artifact is written under a temporary name and renamed into place when complete
  (`unlearn.toyworld.atomic`), so each stage is done exactly when its last file exists:
  `data/.done`, the `tokenizer/` folder, a model folder's `MODEL_FILES` (never `config.json`
  alone), each checkpoint's entry in `evals.json`, then `report.json`, `accuracy.png` and
  `COMPLETE`. A rerun after a kill removes stale temporaries, skips what is done, and ends with the
  same bytes as an uninterrupted build.
- If a resumed build still fails (say, a file damaged by a full disk), the error names the folder to
  delete and the `--force true` rebuild.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from unlearn.eval import evaluate_mc
from unlearn.models import list_checkpoints
from unlearn.plots import plot_checkpoint_accuracy
from unlearn.provenance import git_sha, machine
from unlearn.toyworld import atomic
from unlearn.toyworld.config import PRESETS, ToyWorldConfig, get_preset
from unlearn.toyworld.generator import ITEM_SPLITS, generate_world
from unlearn.toyworld.pretrain import (
    checkpoint_dir,
    pretrain,
    token_stream,
    train_tokenizer,
)
from unlearn.toyworld.world import (
    MODEL_FILES,
    MODEL_NAMES,
    TOKENIZER_FILES,
    ToyWorld,
    is_saved_model,
    unlearn_home,
    world_dir,
    write_jsonl,
)

CHANCE = 0.25
"""Accuracy of guessing on a 4-way item."""


def _texts(world: ToyWorld, corpus: str) -> list[str]:
    return [doc["text"] for doc in world.corpus(corpus)]


RESUME_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    SafetensorError,
)
"""What reading a damaged file raises; a resumed build that hits one says what to delete."""


def world_lock_path(out: Path) -> Path:
    """The lock file of the world directory `out` (a sibling, so deleting the world keeps it)."""
    return out.with_name(f"{out.name}.lock")


@contextmanager
def _world_lock(out: Path) -> Iterator[None]:
    lock = FileLock(world_lock_path(out))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        tqdm.write(
            f"waiting for another process to finish building {out} (lock {lock.lock_file})",
            file=sys.stderr,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _write_data(cfg: ToyWorldConfig, data_dir: Path) -> None:
    """Write the corpora, items and facts into the folder `data_dir`, `.done` last."""
    data = generate_world(cfg)
    for name, docs in data["corpora"].items():
        write_jsonl(data_dir / f"{name}.jsonl", docs)
    for split, items in data["items"].items():
        write_jsonl(data_dir / "items" / f"{split}.jsonl", items)
    facts = [
        {
            "entity": e,
            "split": data["splits"][e],
            "facts": data["facts"][e],
            "false_facts": data["false_facts"][e],
        }
        for e in data["facts"]
    ]
    write_jsonl(data_dir / "facts.jsonl", facts)
    (data_dir / ".done").touch()


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
        atomic.write_text(path, json.dumps(evals, indent=1, sort_keys=True))
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


def _save_model(model: GPTNeoXForCausalLM, tokenizer: Any, model_dir: Path) -> None:
    """Save the final model and tokenizer into `model_dir`, which already holds `checkpoints/`.

    The files are saved into a temporary sibling folder and moved in one by one, `MODEL_FILES`
    last and in order, so `is_saved_model(model_dir)` turns true only once everything is in place.
    (Renaming the whole folder would mean moving the checkpoints out of the way first, and a kill
    then would lose them.)
    """
    tmp = atomic.tmp_path(model_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    order = {name: i for i, name in enumerate(MODEL_FILES)}
    for file in sorted(tmp.iterdir(), key=lambda f: (order.get(f.name, -1), f.name)):
        atomic.put_in_place(file, model_dir / file.name)
    tmp.rmdir()


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
    if world.is_complete and not force:
        return world
    out.parent.mkdir(parents=True, exist_ok=True)
    with _world_lock(out):
        if force:
            shutil.rmtree(out, ignore_errors=True)
        elif world.is_complete:
            return world  # another process built it while this one waited for the lock
        is_resuming = out.is_dir() and any(out.iterdir())
        out.mkdir(exist_ok=True)
        atomic.remove_stale_tmp(out)
        try:
            _build(world, cfg, preset)
        except RESUME_ERRORS as err:
            if not is_resuming:
                raise
            raise RuntimeError(
                f"could not resume the unfinished toy-world build in {out} "
                f"({type(err).__name__}: {err}). Delete that folder and build again: "
                f"{_rebuild_hint(cfg, preset, out)}"
            ) from err
    return world


def _rebuild_hint(cfg: ToyWorldConfig, preset: str, out: Path) -> str:
    """The commands that delete and rebuild the world in `out`."""
    rebuild = "build_world(..., force=True)"
    if preset in PRESETS and cfg == get_preset(preset, seed=cfg.seed):
        root = "" if out.parent == unlearn_home() / "toyworld" else f" --root '{out.parent}'"
        rebuild = (
            f"python -m recipes.toyworld --preset {preset} --seed {cfg.seed}{root} --force true"
        )
    return f"`rm -rf '{out}'`, or rebuild with `{rebuild}`."


def _build(world: ToyWorld, cfg: ToyWorldConfig, preset: str) -> None:
    """Every stage of the build that is not done yet; the caller holds the world's lock."""
    out = world.root
    timing_path = out / "build_seconds.json"
    spent = json.loads(timing_path.read_text())["seconds"] if timing_path.exists() else 0.0
    start = time.perf_counter()

    def save_timing() -> float:
        total = spent + time.perf_counter() - start
        atomic.write_text(timing_path, json.dumps({"seconds": total}))
        return total

    atomic.write_text(
        out / "config.json",
        json.dumps(
            {"config": asdict(cfg), "hash": cfg.hash(), "preset": preset, "git_sha": git_sha()},
            indent=2,
            sort_keys=True,
        ),
    )
    if not (out / "data" / ".done").exists():
        with atomic.writing(out / "data") as tmp:
            _write_data(cfg, tmp)
    if not all((world.tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        texts = _texts(world, "pretrain_forget") + _texts(world, "pretrain_retain")
        with atomic.writing(world.tokenizer_dir) as tmp:
            train_tokenizer(texts, cfg.vocab_size).save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(world.tokenizer_dir)
    retain_stream = token_stream(tokenizer, _texts(world, "pretrain_retain"))
    forget_stream = token_stream(tokenizer, _texts(world, "pretrain_forget"))
    save_timing()

    for name, stream in (("unfiltered", forget_stream), ("filtered", None)):
        final_dir = world.model_dir(name)
        if is_saved_model(final_dir):
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
        _save_model(model, tokenizer, final_dir)
        save_timing()

    evals = _evaluate_all(world, tokenizer, cfg)
    build_seconds = save_timing()
    report = _report(world, cfg, evals, build_seconds)
    atomic.write_text(out / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    with atomic.writing(out / "accuracy.png") as tmp:
        plot_checkpoint_accuracy(report, tmp)
    atomic.write_text(out / "COMPLETE", "")
