"""What every unlearning recipe does around its method: model, data, evaluation, outputs.

Recipes share three config groups (the tuned-lens "ingredients"): `ModelConfig` (the toy world by
default, or any Hugging Face name or local directory), `DataConfig` (forget/retain documents and
evaluation items; the toy world's by default) and `TrainingConfig` (steps, optimizer, LoRA,
evaluation and saving). `run_method` runs any registered method (`unlearn.methods.REGISTRY`): it
checks every input and claims the output directory before any model loads (`start_run`: files
exist and parse, the folder holds nothing of another run), loads the model and data, lets the
method prepare its plan (`Registration.build`: teacher selection, targets, ...), evaluates the
model, resolves the forget token mask of per-token unlearning (`--token_mask`: the value tokens,
a selector's mask computed on the model before unlearning, or a mask file; `unlearn.selection`),
trains every phase of the plan through the training core (`unlearn.training.train_plan`),
evaluates it again and writes, into the output directory:

    run_key.json      what the run is keyed by: recipe, config, input content, code version
    run_info.json     the full config, git SHA, machine and command line (and where the
                      token mask came from, with the share of forget tokens it selects)
    metrics.jsonl     losses, coefficients and evaluations over steps
    training.png      those curves
    model/            the unlearned model (LoRA merged) and its tokenizer
    results.json      forget_acc (held-out forget items), retain_acc, the same before unlearning,
                      the attack-split and seen-template accuracies where the items exist

A rerun of the same command resumes training where it stopped; a rerun with anything different
(config, recipe, model or data content, code) refuses and says what differs (`unlearn.runs`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn.compute import FlopCount
from unlearn.config import TOYWORLD, DataConfig, ModelConfig, TrainingConfig
from unlearn.data import PairedBatches, read_documents, read_items, tokenize_documents
from unlearn.eval import reporting
from unlearn.keys import content_key
from unlearn.lm_eval_scoring import Evaluator, check_evaluator, evaluate_with
from unlearn.methods import Context, Plan, Registration
from unlearn.models import LoadedModel, load_model, model_key
from unlearn.plots import plot_training
from unlearn.provenance import write_run_info
from unlearn.ranks import is_main_process, rank_zero_first
from unlearn.runs import check_choices, claim_run_dir
from unlearn.selection import (
    MASK_FILE,
    NEEDS_KEYWORDS,
    SelectionInputs,
    resolve_token_mask,
    token_mask_source,
)
from unlearn.toyworld import MODEL_NAMES, build_world, get_preset
from unlearn.toyworld.world import DEV, TEST, ToyWorld
from unlearn.training import TrainResult, train_plan


@dataclass
class Setup:
    """A loaded model with its data, ready to unlearn."""

    loaded: LoadedModel
    forget_docs: list[dict[str, Any]]
    retain_docs: list[dict[str, Any]]
    items: dict[str, dict[str, list[dict[str, Any]]]]
    """Template kind ("reserved"/"seen"/"items") -> split -> items, for tuning and monitoring:
    forget_attack, forget_dev, retain (never test)."""
    world: ToyWorld | None = None
    """The toy world the data came from (None for user-supplied data)."""
    test_items: list[dict[str, Any]] = field(default_factory=list)
    """Held-out test items (both template kinds), scored only by `report` (final reporting)."""


def read_item_splits(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The item splits of a directory of <split>.jsonl files, every line checked.

    Raises:
        FileNotFoundError: No such directory.
        ValueError: A malformed line (file and line named), or no forget_dev, forget_test or
            retain split.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--eval_items {root} is not a directory of <split>.jsonl items")
    splits = {p.stem: read_items(p, f"{p.stem} items") for p in sorted(root.glob("*.jsonl"))}
    missing = {DEV, TEST, "retain"} - splits.keys()
    if missing:
        raise ValueError(f"{root} lacks {sorted(missing)}.jsonl; it holds {sorted(splits)}")
    return splits


def model_source(model_cfg: ModelConfig) -> tuple[str, ToyWorld | None]:
    """The name or directory the config's model loads from, and its toy world (built if needed).

    Raises:
        ValueError: An unknown toy-world model name.
    """
    if model_cfg.model.split(":")[0] != TOYWORLD:
        return model_cfg.model, None
    name = model_cfg.model.partition(":")[2] or "unfiltered"
    if name not in MODEL_NAMES:
        raise ValueError(
            f"unknown toy-world model {name!r}; use toyworld[:{'|'.join(MODEL_NAMES)}]"
        )
    world = build_world(
        get_preset(model_cfg.world_preset, seed=model_cfg.world_seed),
        preset=model_cfg.world_preset,
    )
    return str(world.model_dir(name)), world


def _check_data_given(source: str, data_cfg: DataConfig) -> None:
    if None in (data_cfg.forget_data, data_cfg.retain_data, data_cfg.eval_items):
        raise ValueError(
            f"model {source!r} is not the toy world: pass --forget_data, --retain_data and "
            "--eval_items (JSON-lines documents and a directory of <split>.jsonl items)"
        )


def check_inputs(
    model_cfg: ModelConfig,
    data_cfg: DataConfig | None = None,
    *,
    train_cfg: TrainingConfig | None = None,
    documents: Mapping[str, str | None] | None = None,
    paths: Mapping[str, str | None] | None = None,
    models: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """Check every input the configs name without loading a model, and key each one's content.

    Data files must exist and parse with their required fields, a local model must be a saved
    model, and a hub model must be cached or reachable (`unlearn.models.model_key`). The toy world
    is built if needed.

    Args:
        model_cfg: The model.
        data_cfg: Its forget/retain documents and evaluation items.
        train_cfg: Training settings checked against the data (batch size and grad_accum).
        documents: Further JSON-lines document files by name (e.g. rewritten documents).
        paths: Further files or directories by name (e.g. a saved lens); None values are skipped.
        models: Further models by name (e.g. a teacher); None values are skipped.

    Returns:
        Content keys by input name ("model", the data files' flag names, "world_data", ...).

    Raises:
        ValueError: Missing data for a non-toy model, a malformed file (file and line named), or
            a batch size that grad_accum does not divide.
        FileNotFoundError: A missing file, directory or model.
        ImportError: `--evaluator lm_eval` without lm-eval installed.
    """
    keys: dict[str, str] = {}
    is_toy = model_cfg.model.split(":")[0] == TOYWORLD
    if data_cfg is not None:
        if not is_toy:
            _check_data_given(model_cfg.model, data_cfg)
        if train_cfg is not None and data_cfg.batch_size % train_cfg.optim.grad_accum:
            raise ValueError(
                f"--batch_size {data_cfg.batch_size} does not split into --grad_accum "
                f"{train_cfg.optim.grad_accum} micro-batches; choose a multiple of "
                f"{train_cfg.optim.grad_accum}"
            )
        for name in ("forget_data", "retain_data"):
            if (path := getattr(data_cfg, name)) is not None:
                read_documents(path, f"--{name}")
                keys[name] = content_key(Path(path).expanduser())
        if data_cfg.eval_items is not None:
            read_item_splits(data_cfg.eval_items)
            keys["eval_items"] = content_key(Path(data_cfg.eval_items).expanduser())
        keys |= token_mask_key(data_cfg.token_mask, is_toy)
        check_evaluator(data_cfg.evaluator)
    for name, path in (documents or {}).items():
        if path is not None:
            read_documents(path, f"--{name}")
            keys[name] = content_key(Path(path).expanduser())
    for name, path in (paths or {}).items():
        if path is not None:
            if not Path(path).expanduser().exists():
                raise FileNotFoundError(f"--{name} {path} does not exist")
            keys[name] = content_key(Path(path).expanduser())
    source, world = model_source(model_cfg)
    keys["model"] = model_key(source, model_cfg.revision)
    if world is not None:
        keys["world_data"] = content_key(world.root / "data")
    for name, model in (models or {}).items():
        if model is not None:
            keys[name] = model_key(model)
    return keys


def token_mask_key(spec: str, is_toy: bool) -> dict[str, str]:
    """Check a `--token_mask` value before anything loads, and key a mask file's content.

    Returns:
        {"token_mask": content key} for a mask file (one of the run's inputs); {} otherwise (the
        value itself is in the config, and a selector's defaults are code).

    Raises:
        ValueError: An unknown value, or a keyword-based selector outside the toy world.
    """
    source = token_mask_source(spec)
    if source == "selector" and spec in NEEDS_KEYWORDS and not is_toy:
        raise ValueError(
            f"--token_mask {spec} needs keywords, which only the toy world has: make the mask "
            f"with python -m recipes.select_tokens --selector {spec} --keywords <file> and pass "
            "its path"
        )
    if source != "file":
        return {}  # the value, in the config, keys it; a selector's defaults are code
    path = Path(spec).expanduser()
    return {"token_mask": content_key(path if path.is_file() else path / MASK_FILE)}


def start_run(
    out: str | Path,
    recipe: str,
    cfg: Any,
    model_cfg: ModelConfig,
    data_cfg: DataConfig | None = None,
    *,
    overwrite: bool = False,
    **inputs: Any,
) -> dict[str, Any]:
    """Check a recipe's config and inputs, then claim its output folder; before any model loads.

    Args:
        out: The output folder.
        recipe: The recipe's name.
        cfg: Its config (a dataclass, whose `Literal` choices are checked, or `asdict` of one).
        model_cfg: The model.
        data_cfg: The data.
        overwrite: Clear the folder first (`unlearn.runs.claim_run_dir`).
        **inputs: `check_inputs`' keyword arguments (train_cfg, documents, paths, models).

    Returns:
        The run's key (pass `key["key"]` to `unlearn.training.train`).

    Raises:
        ValueError: A bad choice or input (see `check_inputs`).
        RunMismatchError: The folder holds another run.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        check_choices(cfg)
        cfg = dataclasses.asdict(cfg)
    keys = check_inputs(model_cfg, data_cfg, **inputs)
    return claim_run_dir(out, recipe, cfg, keys, overwrite=overwrite)


def load_setup(model_cfg: ModelConfig, data_cfg: DataConfig, weights: str | None = None) -> Setup:
    """Load the model and the data the configs name (building the toy world if needed).

    `weights` loads another model directory (e.g. an unlearned model) with the data that
    `model_cfg` implies: the toy world's for a toy-world config.

    Raises:
        ValueError: A non-toy model without forget/retain data or evaluation items, or a
            malformed data file (file and line named).
    """
    source, world = model_source(model_cfg)
    if world is None:
        _check_data_given(source, data_cfg)
    forget = (
        read_documents(data_cfg.forget_data, "--forget_data")
        if data_cfg.forget_data
        else world.corpus("forget_attack")  # type: ignore[union-attr]
    )
    retain = (
        read_documents(data_cfg.retain_data, "--retain_data")
        if data_cfg.retain_data
        else world.corpus("retain")  # type: ignore[union-attr]
    )
    if data_cfg.max_forget_docs is not None:
        forget = forget[: data_cfg.max_forget_docs]
    if data_cfg.eval_items is not None:
        splits = read_item_splits(data_cfg.eval_items)
        items = {"items": {split: rows for split, rows in splits.items() if split != TEST}}
        test_items = [{**row, "split": TEST} for row in splits[TEST]]
    else:
        items = {kind: world.items_by_split(kind) for kind in ("reserved", "seen")}  # type: ignore[union-attr]
        test_items = world.test_items()  # type: ignore[union-attr]
    loaded = load_model(
        weights or source,
        revision=None if weights else model_cfg.revision,
        dtype=model_cfg.dtype,
        device=model_cfg.device,
    )
    return Setup(loaded, forget, retain, items, world, test_items)


def model_identity(run_key: Mapping[str, Any], model_cfg: ModelConfig) -> str:
    """The model a run reads, as the selection cache keys it: content, revision and dtype."""
    return f"{run_key['inputs']['model']}@{model_cfg.revision}:{model_cfg.dtype}"


def selection_inputs(
    setup: Setup,
    data_cfg: DataConfig,
    model_key: str,
    keywords: list[str] | None = None,
    model: nn.Module | None = None,
) -> SelectionInputs:
    """What a token selector reads in this setup: its model, documents, dev items and keywords.

    Args:
        setup: The loaded model and data.
        data_cfg: The data settings (row length).
        model_key: Key of the model (`model_identity`; the selection cache's).
        keywords: The keywords (default: the toy world's, or none outside it).
        model: The model to read (default: the setup's, as loaded).
    """
    if keywords is None and setup.world is not None:
        keywords = setup.world.keywords()
    return SelectionInputs(
        model=model if model is not None else setup.loaded.hf_model,
        tokenizer=setup.loaded.tokenizer,
        forget_docs=setup.forget_docs,
        retain_docs=setup.retain_docs,
        max_len=data_cfg.max_len,
        model_key=model_key,
        dev_items=[item for splits in setup.items.values() for item in splits.get(DEV, [])],
        keywords=keywords,
    )


def forget_token_masks(
    setup: Setup, data_cfg: DataConfig, model_key: str, model: nn.Module | None = None
) -> tuple[list[list[bool]] | None, dict[str, Any]]:
    """The forget rows' token masks that `--token_mask` names (None for "all"), and a record.

    Raises:
        ValueError: See `unlearn.selection.resolve_token_mask`.
    """
    if token_mask_source(data_cfg.token_mask) == "all":
        return None, {}
    forget = tokenize_documents(setup.loaded.tokenizer, setup.forget_docs, data_cfg.max_len)
    masks, record = resolve_token_mask(
        data_cfg.token_mask,
        forget,
        lambda: selection_inputs(setup, data_cfg, model_key, model=model),
    )
    assert masks is not None  # only "all" resolves to no mask
    selected = sum(map(sum, masks))
    record["token_mask_fraction"] = selected / sum(len(row) for row in masks)
    print(f"token mask {data_cfg.token_mask}: {record['token_mask_fraction']:.1%} of forget tokens")
    return masks, record


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    items: Mapping[str, Mapping[str, Sequence]],
    headline: str,
    evaluator: Evaluator = "builtin",
) -> dict[str, float]:
    """Accuracy on every (tuning) item split, plus `dev_forget_acc`: dev forget over all kinds.

    Keys are `<split>_acc` for the headline template kind and `<split>_acc_<kind>` for the others;
    `evaluator` scores the items (`unlearn.lm_eval_scoring.evaluate_with`).
    """
    scores: dict[str, float] = {}
    dev_credit: list[float] = []
    for kind, splits in items.items():
        suffix = "" if kind in (headline, "items") else f"_{kind}"
        for split, split_items in splits.items():
            result = evaluate_with(evaluator, model, tokenizer, split_items)
            scores[f"{split}_acc{suffix}"] = result.acc
            if split == DEV:
                dev_credit += result.correct
    if dev_credit:
        scores["dev_forget_acc"] = sum(dev_credit) / len(dev_credit)
    return scores


def report(
    model: nn.Module, tokenizer: Any, setup: Setup, evaluator: Evaluator = "builtin"
) -> dict[str, float]:
    """Final reporting: test forget accuracy (`forget_acc`, both template kinds) and retain.

    The only place an unlearning run scores test items (`unlearn.eval.reporting`); nothing
    downstream of it makes a choice.

    Raises:
        ValueError: The setup has no test items.
    """
    if not setup.test_items:
        raise ValueError("no test items to report on: the setup was loaded without them")
    kind = "items" if "items" in setup.items else "reserved"
    with reporting():
        forget = evaluate_with(evaluator, model, tokenizer, setup.test_items)
        retain = evaluate_with(evaluator, model, tokenizer, setup.items[kind]["retain"])
    return {"forget_acc": forget.acc, "retain_acc": retain.acc}


def run_method(
    method: Registration,
    method_cfg: Any,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainingConfig,
    out_dir: str | Path,
    config: Any,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Check, load, prepare the method's plan, evaluate, train every phase, evaluate, write.

    Args:
        method: The registered method (`unlearn.methods.REGISTRY`).
        method_cfg: Its settings.
        model_cfg: The model.
        data_cfg: The data.
        train_cfg: The training (`num_steps` per phase).
        out_dir: The output folder.
        config: The recipe's whole config (a dataclass: its `Literal` choices are checked before
            anything loads), recorded in run_info.json.
        overwrite: Clear `out_dir` first.

    Returns:
        The contents of results.json, plus what the preparation chose (`Plan.info`).

    Raises:
        RunMismatchError: `out_dir` holds another run.
    """
    out = Path(out_dir).expanduser()
    _warn_if_untuned(method)
    run_key = start_run(
        out,
        method.name,
        config,
        model_cfg,
        data_cfg,
        overwrite=overwrite,
        train_cfg=train_cfg,
        **method.inputs(method_cfg, model_cfg, data_cfg),
    )
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    flops = FlopCount(train_cfg.count_flops)
    # torchrun: rank 0 prepares first (caches, a lens, token masks), the others then find them.
    with rank_zero_first(), flops.scope("prepare"):
        setup, plan, masks = _prepare(
            method, method_cfg, model_cfg, data_cfg, train_cfg, out, run_key, config
        )
    model, tokenizer = setup.loaded.hf_model, setup.loaded.tokenizer
    torch.manual_seed(train_cfg.seed)
    headline, evaluator = data_cfg.eval_template, data_cfg.evaluator
    before = {
        **evaluate(model, tokenizer, setup.items, headline, evaluator),
        **report(model, tokenizer, setup, evaluator),
    }
    with flops.scope("train"):
        trained = _train_phases(
            model, plan, setup, data_cfg, train_cfg, out, run_key["key"], method, masks, flops
        )
    flops.exclude("train", "eval")
    after = {
        **evaluate(trained[-1].model, tokenizer, setup.items, headline, evaluator),
        **report(trained[-1].model, tokenizer, setup, evaluator),
    }
    with rank_zero_first():
        if is_main_process():
            return _write_outputs(
                out, method.name, plan, trained, tokenizer, before, after, flops.flops
            )
    return {**json.loads((out / "results.json").read_text()), **plan.info}


def _prepare(
    method: Registration,
    method_cfg: Any,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainingConfig,
    out: Path,
    run_key: dict[str, Any],
    config: dict[str, Any],
) -> tuple[Setup, Plan, list[list[bool]] | None]:
    """Load the model and data, select the forget tokens, build the plan, write run_info.json."""
    torch.manual_seed(train_cfg.seed)
    setup = load_setup(model_cfg, data_cfg)
    model, tokenizer = setup.loaded.hf_model.float(), setup.loaded.tokenizer
    masks, mask_info = forget_token_masks(
        setup, data_cfg, model_identity(run_key, model_cfg), model
    )
    context = Context(
        model=model,
        tokenizer=tokenizer,
        source=setup.loaded.source,
        forget_docs=setup.forget_docs,
        retain_docs=setup.retain_docs,
        items=setup.items,
        data=data_cfg,
        training=train_cfg,
        device=model_cfg.device,
        out_dir=out,
        world=setup.world,
    )
    plan = method.build(method_cfg, context)
    write_run_info(out, {**config, **plan.info, **mask_info, "defaults_tuned_on_dev": method.tuned})
    return setup, plan, masks


def _warn_if_untuned(method: Registration) -> None:
    if not method.tuned:
        warnings.warn(
            f"{method.name}'s default settings are placeholders, not yet chosen on the dev split; "
            f"choose them with python -m benchmarks.tune_dev --methods {method.name}",
            UserWarning,
            stacklevel=3,
        )


def _train_phases(
    model: nn.Module,
    plan: Plan,
    setup: Setup,
    data_cfg: DataConfig,
    train_cfg: TrainingConfig,
    out: Path,
    run_key: str,
    method: Registration,
    masks: list[list[bool]] | None = None,
    flops: FlopCount | None = None,
) -> list[TrainResult]:
    """Batch the data (the forget rows with their token masks) and run the plan's phases.

    The evaluations during training are counted under `flops`' "eval" scope.
    """
    counted = flops or FlopCount(enabled=False)
    tokenizer, headline = setup.loaded.tokenizer, data_cfg.eval_template
    forget = tokenize_documents(tokenizer, setup.forget_docs, data_cfg.max_len)
    batches = PairedBatches(
        forget if masks is None else forget.with_token_masks(masks),
        tokenize_documents(tokenizer, setup.retain_docs, data_cfg.max_len),
        batch_size=data_cfg.batch_size,
        seed=train_cfg.seed,
    )
    eval_items = {
        kind: {s: v for s, v in splits.items() if s in (DEV, "retain")}
        for kind, splits in setup.items.items()
        if kind in (headline, "items")
    }
    return train_plan(
        model,
        plan.phases,
        batches,
        out_dir=out,
        optim=train_cfg.optim,
        lora=train_cfg.lora,
        seed=train_cfg.seed,
        desc=method.name,
        eval_fn=lambda m: counted.run(
            "eval", evaluate, m, tokenizer, eval_items, headline, data_cfg.evaluator
        ),
        eval_every=train_cfg.eval_every,
        save_every=train_cfg.save_every,
        on_nonfinite=train_cfg.on_nonfinite,
        run_key=run_key,
    )


def _write_outputs(
    out: Path,
    name: str,
    plan: Plan,
    trained: list[TrainResult],
    tokenizer: Any,
    before: dict[str, float],
    after: dict[str, float],
    flops: dict[str, int] | None = None,
) -> dict[str, Any]:
    """model/, metrics.jsonl over every phase, training.png and results.json (with `flops`)."""
    model = trained[-1].model
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    if len(plan.phases) > 1:
        # One step axis over the phases: phase i's step s follows every earlier phase's steps.
        offsets = [sum(p.num_steps for p in plan.phases[:i]) for i in range(len(plan.phases))]
        history = [
            {**record, "step": offset + record["step"], "phase": phase.name}
            for phase, offset, result in zip(plan.phases, offsets, trained, strict=True)
            for record in result.history
        ]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    else:
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plot_training(history, out / "training.png", title=name)
    results = {
        **after,
        **{f"{k}_before": v for k, v in before.items()},
        "num_steps": sum(phase.num_steps for phase in plan.phases),
        "num_phases": len(plan.phases),
        "skipped_steps": sum(result.skipped_steps for result in trained),
        "train_seconds": sum(result.train_seconds for result in trained),
        **(flops or {}),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return {**results, **plan.info}


def summary_table(results: Mapping[str, float]) -> str:
    """Test and dev held-out forget, attack-split forget and retain accuracy before and after."""
    lines = [f"{'':<10}{'test forget':>13}{'dev forget':>12}{'attack forget':>15}{'retain':>9}"]
    for label, suffix in (("before", "_before"), ("after", "")):
        dev = results.get(f"dev_forget_acc{suffix}", float("nan"))
        attack = results.get(f"forget_attack_acc{suffix}", float("nan"))
        lines.append(
            f"{label:<10}{results[f'forget_acc{suffix}']:>13.3f}{dev:>12.3f}{attack:>15.3f}"
            f"{results[f'retain_acc{suffix}']:>9.3f}"
        )
    return "\n".join(lines)
