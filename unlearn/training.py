"""The one training core: paired forget/retain batches -> a method's step graph -> weighted terms.

`train` runs any method (`unlearn.methods`) on a Hugging Face causal LM:

- `train` changes `model` in place (its weights, or peft's adapters injected into it): pass a
  fresh copy to run again;
- every optimizer step takes `PairedBatches.at(step, ...)`, split into `grad_accum` micro-batches;
  each micro-batch runs the method's compiled step graph on the models "trainable" (the model being
  unlearned) and "base" (a frozen copy of it as it was), then sums the method's terms weighted by
  their coefficients at the current progress (optimizer step / (num_steps - 1), from 0 at the
  first step to 1 at the last);
- full fine-tuning, or LoRA through peft (`LoraSettings`), with AdamW or Muon (Muon on 2-D
  weights, AdamW on the rest), gradient clipping, linear warmup, fp32 or bf16 autocast;
- under `torchrun`, each rank takes its share of the global batch and gradients are averaged
  across ranks before the optimizer step (an explicit all-reduce: a step runs several traces of
  the model, some stopped early, which DDP's one-forward-one-backward hooks do not allow);
- metrics go to `metrics.jsonl` and a progress bar; `eval_fn` runs every `eval_every` steps;
- the trainable parameters, optimizer, step and elapsed time are saved every `save_every` steps,
  with the settings that shape the run (steps, optimizer, LoRA, seed, batch size, the method's
  terms and the caller's `run_key`); a rerun with the same `out_dir` and settings resumes from
  there and ends with the same result, and one with other settings raises `RunMismatchError`
  saying what differs instead of mixing two runs (`unlearn.train_state`);
- a state is saved only when every parameter and optimizer tensor is finite; a non-finite loss or
  gradient norm stops the run with `FloatingPointError` (`on_nonfinite="stop"`, the last finite
  state stays on disk) or skips that step (`on_nonfinite="skip"`, counted as `skipped_steps`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from interventions import StepGraph
from unlearn.data import PairedBatches
from unlearn.methods.base import BASE, FORGET, RETAIN, TRAINABLE, Method, extra_models
from unlearn.train_state import (
    STATE_FILE,
    Progress,
    floating_tensors,
    is_finite,
    load_state,
    save_state,
)

METRICS_FILE = "metrics.jsonl"

NonFinitePolicy = Literal["stop", "skip"]
"""What a step with a NaN or infinite loss or gradient norm does: stop the run with the last
finite state on disk, or skip the step (no update; counted as `skipped_steps`)."""

LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
"""Default LoRA targets per `config.model_type`: every linear layer of a block."""


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer and step settings."""

    lr: float = 3e-4
    """Peak learning rate."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """AdamW, or Muon on 2-D weight matrices with AdamW on the rest."""
    weight_decay: float = 0.0
    """Weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warmup: constant, or decaying to 0 at the last step (linear, cosine)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per rank)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of the forward passes (weights stay fp32)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number (0 trains nothing), got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(
                f"grad_accum must be >= 1 (micro-batches per step), got {self.grad_accum}"
            )
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(
                "warmup_steps, grad_clip and weight_decay must be >= 0, got "
                f"{self.warmup_steps}, {self.grad_clip}, {self.weight_decay}"
            )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters instead of full fine-tuning."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    """Module names; None means every linear layer of a block (`LORA_TARGETS`)."""


@dataclass
class TrainResult:
    """What a finished run returns."""

    model: nn.Module
    """The trained model (LoRA merged)."""
    history: list[dict[str, float | int]] = field(default_factory=list)
    """One record per logged step (losses, coefficients, evaluations; "step" is an int)."""
    train_seconds: float = 0.0
    """Wall time of the run, summed over every segment of a resumed run."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient norm (`on_nonfinite="skip"`)."""


def distributed_context() -> tuple[int, int]:
    """(rank, world size), initializing the process group under torchrun if needed."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap `model` with trainable LoRA adapters (peft).

    Raises:
        ValueError: No default targets for this architecture and none given.
    """
    from peft import LoraConfig, get_peft_model

    model_type = getattr(model.config, "model_type", "?")
    targets = settings.target_modules or LORA_TARGETS.get(model_type)
    if targets is None:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r}; pass target_modules "
            f"(known defaults: {sorted(LORA_TARGETS)})"
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias="none",
    )
    return get_peft_model(model, config)


def make_optimizer(
    params: list[nn.Parameter], settings: OptimSettings
) -> list[torch.optim.Optimizer]:
    """AdamW on everything, or Muon on 2-D weights plus AdamW on the rest."""
    adamw = dict(lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return [torch.optim.AdamW(params, **adamw)]
    matrices = [p for p in params if p.ndim == 2 and p.shape[0] < 50_000]
    others = [p for p in params if not (p.ndim == 2 and p.shape[0] < 50_000)]
    optimizers: list[torch.optim.Optimizer] = []
    if matrices:
        optimizers.append(
            torch.optim.Muon(
                matrices,
                lr=settings.lr,
                momentum=0.95,
                weight_decay=settings.weight_decay,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    if others:
        optimizers.append(torch.optim.AdamW(others, **adamw))
    return optimizers


def learning_rate(settings: OptimSettings, step: int, num_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `num_steps`.

    Linear warmup over `warmup_steps` (step s gets (s + 1) / warmup of the peak), then the
    schedule: constant, or a linear or cosine decay from the peak at the end of warmup to 0.
    """
    warm = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    if settings.schedule == "constant" or step < settings.warmup_steps:
        return settings.lr * warm
    span = max(1, num_steps - settings.warmup_steps)
    done = (step - settings.warmup_steps) / span
    if settings.schedule == "linear":
        return settings.lr * (1.0 - done)
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown schedule {settings.schedule!r}; choose constant, linear or cosine")


def _uses_base(method: Method) -> bool:
    names = ((getattr(n, "model", None), getattr(n, "target", None)) for n in method.nodes)
    return any(BASE in pair for pair in names)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_state(
    out_dir: Path, model: nn.Module, optimizers: list, settings: dict[str, Any], progress: Progress
) -> None:
    save_state(out_dir, _trainable(model), optimizers, settings, progress)


def _rewind_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records up to `step` (a resumed run rewrites what came after its state).

    At step 0 nothing is kept: a run that starts over redoes its step-0 evaluation.
    """
    if not path.exists():
        return []
    records = map(json.loads, path.read_text().splitlines())
    kept = [r for r in records if r["step"] <= step] if step > 0 else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _micro_step(
    step_fn: Callable,
    method: Method,
    batches: Mapping[str, Any],
    progress: float,
    dtype: str,
    scale: float,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    with autocast:
        acts = step_fn(batches)
        total = torch.zeros((), device=device)
        metrics: dict[str, float] = {}
        for term in method.terms:
            value = term.fn(acts, batches[FORGET], batches[RETAIN]).float()
            weight = term.weight(progress)
            total = total + weight * value
            metrics[f"loss/{term.name}"] = float(value.detach())
            metrics[f"coef/{term.name}"] = weight
    metrics["loss/total"] = float(total.detach())
    return total * scale, metrics


def _train_settings(
    method: Method,
    batches: PairedBatches,
    num_steps: int,
    optim: OptimSettings,
    lora: LoraSettings | None,
    seed: int,
    on_nonfinite: str,
    run_key: str | None,
) -> dict[str, Any]:
    """The settings that shape a run's trajectory, stored with its state and checked on resume."""
    return {
        "num_steps": num_steps,
        "optim": asdict(optim),
        "lora": asdict(lora) if lora is not None else None,
        "seed": seed,
        "batch_size": batches.batch_size,
        "method": [type(method).__name__, *(term.name for term in method.terms)],
        "on_nonfinite": on_nonfinite,
        "run_key": run_key,
    }


def _check_arguments(
    num_steps: int,
    save_every: int,
    log_every: int,
    eval_every: int,
    on_nonfinite: str,
    batch_size: int,
    n_micro: int,
) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if save_every < 1 or log_every < 1:
        raise ValueError(f"save_every and log_every must be >= 1, got {save_every}, {log_every}")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: start and end only), got {eval_every}")
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    if batch_size % n_micro:
        raise ValueError(
            f"batch_size {batch_size} does not split into {n_micro} micro-batches (ranks x "
            f"grad_accum); choose a multiple of {n_micro}"
        )


def train(
    model: nn.Module,
    method: Method,
    batches: PairedBatches,
    *,
    num_steps: int,
    out_dir: str | os.PathLike[str],
    optim: OptimSettings = OptimSettings(),
    lora: LoraSettings | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    eval_steps: Collection[int] = (),
    save_every: int = 50,
    log_every: int = 1,
    seed: int = 0,
    on_nonfinite: NonFinitePolicy = "stop",
    run_key: str | None = None,
    desc: str = "unlearn",
) -> TrainResult:
    """Unlearn with `method` for `num_steps` optimizer steps; resume if `out_dir` holds a state.

    Args:
        model: A Hugging Face causal LM (fp32 weights). Its current weights are the frozen "base".
        method: The nodes and terms to train with.
        batches: Paired forget/retain batches (global batch size per optimizer step).
        num_steps: Optimizer steps.
        out_dir: Where state and `metrics.jsonl` go.
        optim: Optimizer settings.
        lora: Train LoRA adapters (merged into the returned model) instead of all weights.
        eval_fn: Called on the model (rank 0) at step 0, every `eval_every` steps and at the end;
            its numbers are logged as `eval/<key>`.
        eval_every: Steps between evaluations (0: only at the start and the end).
        eval_steps: Further steps to evaluate at (e.g. the early steps of a tamper attack).
        save_every: Steps between saved states.
        log_every: Steps between metric records.
        seed: Seeds torch's generator at every step (seed + step), so random terms such as
            random-target cross-entropy are reproducible and a resumed run matches.
        on_nonfinite: A NaN or infinite loss or gradient norm stops the run ("stop") or skips
            the step ("skip": no update, logged as `skipped_steps`, warned about at the end).
        run_key: What else the caller keys the run by (e.g. `unlearn.runs` keys of its config,
            inputs and code): a saved state is resumed only under the same key.
        desc: Progress-bar label.

    Raises:
        FloatingPointError: A loss or gradient norm became NaN or infinite under "stop", or the
            weights did (the last finite state is kept).
        RunMismatchError: `out_dir` holds the state of a run with other settings or `run_key`.
    """
    rank, world_size = distributed_context()
    _check_arguments(
        num_steps,
        save_every,
        log_every,
        eval_every,
        on_nonfinite,
        batches.batch_size,
        world_size * optim.grad_accum,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    settings = _train_settings(method, batches, num_steps, optim, lora, seed, on_nonfinite, run_key)

    # The frozen original costs a model's memory: copied only for methods that read it.
    base = copy.deepcopy(model).eval().requires_grad_(False) if _uses_base(method) else None
    if lora is not None:
        torch.manual_seed(seed)  # LoRA's random init: the same on every rank and every rerun
    trainable = add_lora(model, lora) if lora is not None else model
    trainable.train()
    params = list(_trainable(trainable).values())
    optimizers = make_optimizer(params, optim)
    models = {TRAINABLE: trainable, **({BASE: base} if base is not None else {})}
    models.update(extra_models(method))
    step_fn = StepGraph(list(method.nodes)).compile(models)

    saved = (
        load_state(out, _trainable(trainable), optimizers, settings)
        if (out / STATE_FILE).exists()
        else Progress()
    )
    start, skipped = saved.step, saved.skipped_steps
    segment_start, elapsed = time.perf_counter(), saved.elapsed_seconds
    history = _rewind_metrics(out / METRICS_FILE, start) if rank == 0 else []

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        with (out / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def evaluate(step: int) -> None:
        if eval_fn is None or rank != 0:
            return
        trainable.eval()
        with torch.no_grad():
            scores = eval_fn(trainable)
        trainable.train()
        log({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})

    def nonfinite(what: str, step: int) -> FloatingPointError:
        kept = (
            f"the last good state (step {last_saved}) is in {out}, finite"
            if last_saved
            else "no state was saved yet"
        )
        return FloatingPointError(  # steps numbered as in metrics.jsonl (1 = the first)
            f"{what} at step {step + 1}; {kept}. Lower the learning rate or the coefficients and "
            "start over (a new output directory, or --overwrite true), or skip such steps "
            "(on_nonfinite 'skip': --on_nonfinite skip)"
        )

    if start == 0:
        evaluate(0)
    progress = tqdm(
        range(start, num_steps),
        desc=desc,
        initial=start,
        total=num_steps,
        disable=rank != 0,
        dynamic_ncols=True,
    )
    last_saved = start
    for step in progress:
        lr = learning_rate(optim, step, num_steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        step_is_finite = True
        for micro in range(optim.grad_accum):
            # Seeded by the global micro-batch index, so random terms (random-target CE) draw the
            # same numbers whether the global batch is split over ranks or micro-batches.
            torch.manual_seed(seed + step * 10_007 + rank * optim.grad_accum + micro)
            forget, retain = batches.at(step, rank, world_size, micro, optim.grad_accum)
            loss, metrics = _micro_step(
                step_fn,
                method,
                {FORGET: forget.to(device), RETAIN: retain.to(device)},
                step / max(1, num_steps - 1),
                optim.dtype,
                1.0 / optim.grad_accum,
                device,
            )
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value / optim.grad_accum
            step_is_finite = math.isfinite(metrics["loss/total"])
            if world_size > 1:  # every rank stops or skips together instead of hanging
                flag = torch.tensor([0.0 if step_is_finite else 1.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                step_is_finite = flag.item() == 0.0
            if not step_is_finite:
                if on_nonfinite == "stop":
                    raise nonfinite(f"loss is {metrics['loss/total']} ({metrics})", step)
                break
            torch.autograd.backward(loss)
        if world_size > 1 and step_is_finite:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            packed = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
            dist.all_reduce(packed, op=dist.ReduceOp.AVG)
            sums = dict(zip(sums, packed.tolist(), strict=True))
        grad_norm = float("nan")
        if step_is_finite:
            # Measured before clipping: clipping a NaN norm would write NaN into every gradient.
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            grad_norm = float(norm)
            step_is_finite = math.isfinite(grad_norm)
            if not step_is_finite and on_nonfinite == "stop":
                raise nonfinite(f"gradient norm is {grad_norm} (loss {sums['loss/total']})", step)
        if step_is_finite:
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, optim.grad_clip, norm)
            for opt in optimizers:
                opt.step()
        else:
            skipped += 1
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
        done = step + 1
        if rank == 0 and (done % log_every == 0 or done == num_steps or not step_is_finite):
            extra = {"skipped_steps": skipped} if skipped else {}
            log({"step": done, "lr": lr, "grad_norm": grad_norm, **sums, **extra})
            progress.set_postfix(loss=f"{sums['loss/total']:.3f}")
        if done == num_steps or (eval_every and done % eval_every == 0) or done in eval_steps:
            evaluate(done)  # before saving: a run killed in between redoes this evaluation
        if done % save_every == 0 or done == num_steps:
            # Checked on every rank (they hold the same weights), so all stop together.
            if not is_finite(floating_tensors(params, optimizers)):
                raise nonfinite("the weights or optimizer state became NaN or infinite", step)
            elapsed = saved.elapsed_seconds + time.perf_counter() - segment_start
            if rank == 0:
                _save_state(out, trainable, optimizers, settings, Progress(done, elapsed, skipped))
            last_saved = done
        if world_size > 1:
            dist.barrier()
    progress.close()
    if skipped:
        warnings.warn(
            f"{skipped} of {num_steps} steps were skipped for a NaN or infinite loss or gradient "
            f"norm ({out / METRICS_FILE} marks them with skipped_steps)",
            RuntimeWarning,
            stacklevel=2,
        )
    trainable.eval()
    merged = trainable.merge_and_unload() if lora is not None else trainable
    # The time up to the final state, as saved: a rerun of a finished run reports the same.
    return TrainResult(model=merged, history=history, train_seconds=elapsed, skipped_steps=skipped)
