"""The one training core: paired forget/retain batches -> a method's step graph -> weighted terms.

`train` runs any method (`unlearn.methods`) on a Hugging Face causal LM:

- `train` changes `model` in place (its weights, or peft's adapters injected into it): pass a
  fresh copy to run again;
- every optimizer step takes `PairedBatches.at(step, ...)`, split into `grad_accum` micro-batches;
  each micro-batch runs the method's compiled step graph on the models "trainable" (the model being
  unlearned) and "base" (the model as it was: a frozen copy under full fine-tuning, the same model
  with its LoRA adapters disabled under LoRA, `adapters_disabled`), then sums the method's terms
  weighted by their coefficients at the current progress (optimizer step / (num_steps - 1), from
  0 at the first step to 1 at the last);
- full fine-tuning, or LoRA through peft (`LoraSettings`), with AdamW or Muon (Muon on 2-D
  weights, AdamW on the rest), gradient clipping, linear warmup, fp32 or bf16 autocast;
- with `OptimSettings.sam_rho` > 0, every method's forget terms (all but "retain") are
  sharpness-aware: their gradient is taken at the worst point of a ρ-ball, the retain term's at
  the weights themselves (`_Run.sharpness_aware_backward`); with `OptimSettings.tar_steps` > 0
  they are tamper-resistant instead: their gradient is taken after a simulated fine-tuning
  attack on attack-split forget text (`_Run.tamper_resistant_backward`, TAR, first order);
- under `torchrun`, each rank takes its share of the global batch; `OptimSettings.parallel`
  chooses DDP (the model on every rank, gradients all-reduced bucket by bucket while the backward
  pass runs; `replicate` with unused parameters allowed, since a step runs several traces of the
  model and some stop early) or FSDP2 (`fully_shard` on every block, then the root: weights,
  gradients and optimizer state sharded, saved as a sharded checkpoint, `_sharded`); either way
  the model returned is a plain module holding the full trained weights on every rank. LoRA runs
  keep the model plain on every rank and average the adapters' gradients (a small share of the
  weights) in one all-reduce after the backward pass;
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
import fnmatch
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from interventions import FrozenView, StepGraph, Write
from interventions.sites import describe_model, resolve_site
from unlearn import train_state_sharded as _sharded
from unlearn.config import LoraSettings, NonFinitePolicy, OptimSettings
from unlearn.data import PairedBatches
from unlearn.methods.base import (
    BASE,
    FORGET,
    RETAIN,
    RETAIN_TERM,
    TRAINABLE,
    Method,
    extra_models,
)
from unlearn.ranks import distributed_context
from unlearn.train_state import (
    STATE_FILE,
    Progress,
    floating_tensors,
    is_finite,
    load_state,
    save_state,
)

METRICS_FILE = "metrics.jsonl"

LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
"""Default LoRA targets per `config.model_type`: every linear layer of a block."""


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


if TYPE_CHECKING:
    from unlearn.methods.plan import Phase

BLOCK_SITE = "blocks.{l}.hook_resid_post"
"""A block's output site; its module path names the block's parameters."""


def block_path(model: nn.Module, layer: int) -> str:
    """Module path of block `layer` (e.g. "gpt_neox.layers.3"); any architecture of the table."""
    return resolve_site(model, BLOCK_SITE.format(l=layer)).path


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether a block-relative parameter name matches a glob pattern (None: every name does)."""
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def block_parameters(
    model: nn.Module, layers: Sequence[int], patterns: Sequence[str] | None = None
) -> list[str]:
    """Full names of the parameters of the given blocks, only those matching `patterns` if given.

    Args:
        model: A model of the site table (`interventions.sites`).
        layers: Block indices.
        patterns: Glob patterns (`fnmatch`, `*` crosses dots) of parameter names relative to a
            block, e.g. "mlp.*" or "mlp.dense_4h_to_h.weight"; None: every parameter.

    Raises:
        ValueError: A block has no parameter matching `patterns` (the message lists its names).
    """
    names = []
    for layer in layers:
        path = block_path(model, layer)
        local = [name for name, _ in model.get_submodule(path).named_parameters()]
        chosen = [name for name in local if _matches(name, patterns)]
        if not chosen:
            raise ValueError(
                f"no parameter of block {layer} ({path}) matches {list(patterns or [])}; its "
                f"parameters are {local}"
            )
        names += [f"{path}.{name}" for name in chosen]
    return names


def set_trainable_layers_(
    model: nn.Module, layers: Sequence[int], patterns: Sequence[str] | None = None
) -> list[str]:
    """Freeze every parameter of `model` but those of the given blocks; return their names.

    `patterns` narrows each block to the parameters it matches (`block_parameters`).
    """
    chosen = set(block_parameters(model, layers, patterns))
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        if param.requires_grad:
            names.append(name)
    return names


def block_lora(
    model: nn.Module,
    lora: LoraSettings,
    layers: Sequence[int],
    patterns: Sequence[str] | None = None,
) -> LoraSettings:
    """LoRA settings whose targets are only the linear layers of the given blocks.

    With `patterns` (as in `block_parameters`), only the linear layers whose weight matches one
    ("mlp.*" matches "mlp.dense_h_to_4h.weight") get adapters.

    Raises:
        ValueError: The model type has no default LoRA targets and none were given, or no target
            layer of the blocks matches `patterns`.
    """
    model_type = getattr(model.config, "model_type", "?")
    targets = lora.lora_targets or LORA_TARGETS.get(model_type)
    if targets is None:
        raise ValueError(f"no default LoRA targets for model_type {model_type!r}; pass some")
    full = tuple(
        f"{path}.{name}"
        for path in (block_path(model, layer) for layer in layers)
        for name, _ in model.get_submodule(path).named_modules()
        if name.rpartition(".")[2] in targets and _matches(f"{name}.weight", patterns)
    )
    if layers and not full:
        raise ValueError(
            f"no LoRA target ({list(targets)}) of blocks {list(layers)} has a weight matching "
            f"{list(patterns or [])}; pass other parameter patterns or --lora_targets"
        )
    return replace(lora, lora_targets=full)


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap `model` with trainable LoRA adapters (peft).

    Raises:
        ValueError: No default targets for this architecture and none given.
    """
    from peft import LoraConfig, get_peft_model

    model_type = getattr(model.config, "model_type", "?")
    targets = settings.lora_targets or LORA_TARGETS.get(model_type)
    if targets is None:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r}; pass lora_targets "
            f"(known defaults: {sorted(LORA_TARGETS)})"
        )
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(targets),
        bias="none",
    )
    return get_peft_model(model, config)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` that also orthogonalizes matrices sharded across ranks (FSDP2).

    Muon's update is the Newton-Schulz orthogonalization of a whole matrix's momentum, which no
    shard can compute alone: for a DTensor weight the momentum stays sharded (it is elementwise),
    the update matrix is gathered, orthogonalized on every rank and scattered back to the shards.
    Plain weights take `torch.optim.Muon`'s own step.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; DTensor weights as the class says, plain ones as torch.optim.Muon."""
        if not any(
            hasattr(p, "device_mesh") for group in self.param_groups for p in group["params"]
        ):
            return super().step(closure)
        from torch.distributed.tensor import distribute_tensor
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = update.full_tensor() if hasattr(update, "full_tensor") else update
                whole = _zeropower_via_newtonschulz(
                    whole, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                if hasattr(param, "device_mesh"):
                    whole = distribute_tensor(whole, param.device_mesh, param.placements)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(whole, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


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
            Muon(
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


_COPY_BASE_UNDER_LORA = False
"""Under LoRA, deep-copy the frozen original as full fine-tuning does, instead of disabling the
adapters (`adapters_disabled`): the reference the tests compare the shared original against."""


def adapters_disabled(peft_model: nn.Module) -> FrozenView:
    """The frozen original of a LoRA run: `peft_model` with its adapters disabled, in eval mode.

    LoRA never changes the base weights, so the original needs no copy: every call runs the peft
    model inside peft's ``disable_adapter()`` (the adapters are bypassed and take no gradient) and
    in eval mode (no dropout, as in a frozen ``copy.deepcopy(model).eval()``), then restores the
    adapters and each module's train/eval flag (`interventions.FrozenView`). Its module paths are
    the peft model's under ``module.``, so sites resolve on it as on the peft model.
    """
    disable_adapter = peft_model.disable_adapter  # a PeftModel's, typed as nn.Module's attribute
    return FrozenView(peft_model, cast(Callable[[], AbstractContextManager[Any]], disable_adapter))


def _frozen_original(model: nn.Module, lora: LoraSettings | None) -> nn.Module | None:
    """A frozen copy of `model` for full fine-tuning; None under LoRA.

    Under LoRA the original is the trained model with its adapters disabled, made once the
    adapters exist (`adapters_disabled`).
    """
    if lora is not None and not _COPY_BASE_UNDER_LORA:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def _uses_base(method: Method) -> bool:
    names = ((getattr(n, "model", None), getattr(n, "target", None)) for n in method.nodes)
    return any(BASE in pair for pair in names)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_parallel(optim: OptimSettings, lora: LoraSettings | None, world_size: int) -> None:
    """Refuse what the data-parallel strategies do not support, before anything runs.

    Raises:
        ValueError: A simulated attack (`tar_steps`) under LoRA; FSDP2 with LoRA, or a
            sharpness-aware or simulated-attack full fine-tune, on more than one rank.
    """
    if optim.tar_steps > 0 and lora is not None:
        raise ValueError(
            "--tar_steps simulates a full fine-tuning attack, but under LoRA only the adapters "
            "train, so the simulated attack would move only them; run it as a full fine-tune "
            "(--lora_rank 0)"
        )
    if world_size == 1:
        return
    if optim.parallel == "fsdp" and lora is not None:
        raise ValueError(
            "--parallel fsdp shards full fine-tuning only; LoRA runs keep one copy of the frozen "
            "weights per rank: use --parallel ddp with --lora_rank"
        )
    if optim.tar_steps > 0:
        raise ValueError(
            "--tar_steps simulates an attack on this rank's weights between the step's backward "
            "passes, which DDP's and FSDP2's gradient hooks do not allow; run it in one process "
            "(--grad_accum for a larger batch)"
        )
    if optim.sam_rho > 0 and lora is None:
        raise ValueError(
            "--sam_rho takes its own gradient of the forget terms before the step's backward pass, "
            "which DDP's and FSDP2's gradient hooks do not allow; run sharpness-aware unlearning "
            "in one process (--grad_accum for a larger batch) or with LoRA (--lora_rank)"
        )


_MESHES: dict[tuple[str, int], Any] = {}


def _mesh(device: torch.device, world_size: int) -> Any:
    """The 1-D device mesh of every rank (made once per process)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, world_size)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, (world_size,))
    return _MESHES[key]


def _policy(precision: str) -> Any:
    """FSDP2's mixed precision for `OptimSettings.precision`.

    bfloat16: weights gathered and the forward pass in bf16, gradients reduced in fp32 into the
    fp32 weights the optimizer updates.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _per_block(model: nn.Module, wrap: Callable[[nn.Module], Any]) -> None:
    """`wrap` every block, then the root.

    Each block is its own unit: gathered for its forward, reduced in its backward, overlapping the
    backward of the blocks before it.
    """
    for layer in range(describe_model(model).n_layers):
        wrap(model.get_submodule(block_path(model, layer)))
    wrap(model)


def _data_parallel(
    trainable: nn.Module, companions: Mapping[str, Any], optim: OptimSettings, device: torch.device
) -> None:
    """Make a fully fine-tuned `trainable` data-parallel in place, and the companions.

    "fsdp": FSDP2 `fully_shard`. "ddp": FSDP2's replicate (DDP on FSDP2's hooks, which register
    the gradient reduction in each unit's forward, so a trace stopped early still reduces the
    gradients it made, unlike DDP's module wrapper).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh, policy = _mesh(device, dist.get_world_size()), _policy(optim.precision)
    if optim.parallel == "fsdp":
        _per_block(trainable, lambda m: fully_shard(m, mesh=mesh, mp_policy=policy))
        for companion in companions.values() if optim.shard_companions else ():
            # A companion shared by several phases is sharded once.
            if isinstance(companion, nn.Module) and not isinstance(companion, FSDPModule):
                _per_block(companion, lambda m: fully_shard(m, mesh=mesh, mp_policy=policy))
        return
    from torch.distributed._composable.replicate_with_fsdp import replicate

    _per_block(trainable, lambda m: replicate(m, mesh=mesh, mp_policy=policy))


def _checkpoint_blocks(model: nn.Module, method: Method) -> None:
    """Recompute every block of `model` in the backward pass (`activation_checkpointing`).

    Raises:
        ValueError: The method writes into the trained model.
    """
    from torch.distributed._composable import checkpoint

    writes = [n for n in method.nodes if isinstance(n, Write) and n.model == TRAINABLE]
    if writes:
        raise ValueError(
            f"{type(method).__name__} writes into the trained model ({writes[0].site}), which a "
            "recomputed block would not replay: run it without --activation_checkpointing"
        )
    for layer in range(describe_model(model).n_layers):
        checkpoint(model.get_submodule(block_path(model, layer)))


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local part (a DTensor's shard on this rank; a plain tensor itself)."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def _total_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The global L2 norm of the gradients.

    Whole also when they are DTensors, sharded or replicated across the ranks.
    """
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _clip_grads(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients so their global norm is at most `max_norm` (as torch's clipping)."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in _local(grads):
        g.mul_(coef.to(g.device, g.dtype))


def _unwrapped(model: nn.Module) -> nn.Module:
    """A plain module (no DDP or FSDP2 hooks) holding `model`'s full weights, on every rank.

    Built on the meta device and filled with the gathered state dict; buffers and tensor
    attributes a state dict omits (e.g. rotary frequencies) are taken from `model`.

    Raises:
        RuntimeError: A tensor of the new module was left unfilled.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    # Gathered (FSDP2) or the replicas themselves (DDP): no further copy; `model` is not trained
    # again, so the new module may share its replicas' storage.
    state = {k: v.detach() for k, v in get_model_state_dict(model, options=options).items()}
    plain_cls = next(
        (c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), None
    )
    if plain_cls is None:
        raise TypeError(
            f"{type(model).__name__} is not a Hugging Face model; under torchrun the trained "
            "model is rebuilt from its class in transformers"
        )
    with torch.device("meta"):
        plain = plain_cls(model.config)
    plain.load_state_dict(state, assign=True, strict=True)
    wrapped = dict(model.named_modules())
    for name, module in plain.named_modules():
        for attr, value in [*module._buffers.items(), *vars(module).items()]:
            if torch.is_tensor(value) and value.is_meta:
                setattr(module, attr, getattr(wrapped[name], attr))
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"gathering the trained model left {left[:5]} unfilled")
    plain.generation_config = model.generation_config
    for (_, trained), (_, param) in zip(
        model.named_parameters(), plain.named_parameters(), strict=False
    ):
        param.requires_grad_(trained.requires_grad)
    return plain.eval()


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


class _MicroLoss(NamedTuple):
    """One micro-batch's weighted loss, whole and split as a sharpness-aware step needs it."""

    total: torch.Tensor
    """Σ coef · ramp · term over every term (what a plain step differentiates)."""
    forget: torch.Tensor
    """The same sum over every term but "retain" (sharpness-aware under `sam_rho`)."""
    retain: torch.Tensor
    """The "retain" term, weighted (0 without one)."""
    metrics: dict[str, float]
    """Each term's value and coefficient, and the total."""


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for precision "bfloat16", nothing for "float32"."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _micro_step(
    step_fn: Callable,
    method: Method,
    batches: Mapping[str, Any],
    progress: float,
    dtype: str,
    device: torch.device,
) -> _MicroLoss:
    with _autocast(dtype, device):
        acts = step_fn(batches)
        total = forget = retain = torch.zeros((), device=device)
        metrics: dict[str, float] = {}
        for term in method.terms:
            value = term.fn(acts, batches[FORGET], batches[RETAIN]).float()
            weight = term.weight(progress)
            total = total + weight * value
            if term.name == RETAIN_TERM:
                retain = retain + weight * value
            else:
                forget = forget + weight * value
            metrics[f"loss/{term.name}"] = float(value.detach())
            metrics[f"coef/{term.name}"] = weight
    metrics["loss/total"] = float(total.detach())
    return _MicroLoss(total, forget, retain, metrics)


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


class _StepOutcome(NamedTuple):
    """What one optimizer step gives the log."""

    sums: dict[str, float]
    """Each metric averaged over the micro-batches (and ranks) that ran."""
    grad_norm: float
    """Gradient norm before clipping (NaN when the loss was not finite)."""
    is_finite: bool
    """Whether the step updated the weights (False: skipped)."""


@dataclass
class _Run:
    """One `train` call: its settings, models, optimizers and bookkeeping, for its helpers."""

    method: Method
    batches: PairedBatches
    num_steps: int
    optim: OptimSettings
    seed: int
    on_nonfinite: str
    settings: dict[str, Any]
    """What the saved state is keyed by (`_train_settings`)."""
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    out: Path
    rank: int
    world_size: int
    device: torch.device
    trainable: nn.Module
    """The model, or its LoRA wrapper."""
    wrapped: bool
    """Whether `trainable` is data-parallel (DDP or FSDP2: torchrun and full fine-tuning)."""
    params: list[nn.Parameter]
    optimizers: list[torch.optim.Optimizer]
    step_fn: Callable
    """The method's compiled step graph."""
    saved: Progress
    """The state this segment resumed from (step 0: a fresh start)."""
    segment_start: float
    """`time.perf_counter()` when this segment started."""
    history: list[dict[str, Any]]
    skipped: int
    last_saved: int
    """The step of the last state on disk (the resumed one until this segment saves)."""
    elapsed: float
    """Training seconds up to the last saved state, every segment together."""

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to the history and to metrics.jsonl (rank 0 only calls this)."""
        self.history.append(record)
        with (self.out / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def evaluate(self, step: int) -> None:
        """Log `eval_fn`'s numbers on rank 0, in eval mode without gradients.

        Under FSDP2 every rank runs `eval_fn` (each forward pass gathers the shards from all of
        them); rank 0 logs.
        """
        if self.eval_fn is None or (self.rank != 0 and not self.sharded):
            return
        self.trainable.eval()
        with torch.no_grad():
            scores = self.eval_fn(self.trainable)
        self.trainable.train()
        if self.rank == 0:
            self.log({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})

    def nonfinite(self, what: str, step: int) -> FloatingPointError:
        """The error that stops the run, saying where the last finite state is."""
        kept = (
            f"the last good state (step {self.last_saved}) is in {self.out}, finite"
            if self.last_saved
            else "no state was saved yet"
        )
        return FloatingPointError(  # steps numbered as in metrics.jsonl (1 = the first)
            f"{what} at step {step + 1}; {kept}. Lower the learning rate or the coefficients and "
            "start over (a new output directory, or --overwrite true), or skip such steps "
            "(on_nonfinite 'skip': --on_nonfinite skip)"
        )

    def accumulate_grads(self, step: int) -> tuple[dict[str, float], bool]:
        """Run every micro-batch of this rank, backward each; (mean metrics, loss finite)."""
        grad_accum, rank, world_size = self.optim.grad_accum, self.rank, self.world_size
        sums: dict[str, float] = {}
        step_is_finite = True
        for micro in range(grad_accum):
            # Seeded by the global micro-batch index, so random terms (random-target CE) draw the
            # same numbers whether the global batch is split over ranks or micro-batches.
            seed = self.seed + step * 10_007 + rank * grad_accum + micro
            torch.manual_seed(seed)
            forget, retain = self.batches.at(step, rank, world_size, micro, grad_accum)
            batches = {FORGET: forget.to(self.device), RETAIN: retain.to(self.device)}
            progress = step / max(1, self.num_steps - 1)
            loss = self.micro_loss(batches, progress)
            metrics = loss.metrics
            step_is_finite = self.is_finite_everywhere(metrics["loss/total"])
            what = f"loss is {metrics['loss/total']} ({metrics})"
            if step_is_finite and self.optim.sam_rho > 0 and loss.forget.requires_grad:
                perturbed = self.sharpness_aware_backward(loss, batches, progress, seed)
                metrics["loss/sam_forget"] = perturbed
                step_is_finite = self.is_finite_everywhere(perturbed)
                what = f"the forget loss at the sharpness-aware point is {perturbed} ({metrics})"
            elif step_is_finite and self.optim.tar_steps > 0 and loss.forget.requires_grad:
                attacked, attack_loss = self.tamper_resistant_backward(
                    loss, batches, progress, seed, step, micro
                )
                metrics["loss/tar_forget"], metrics["loss/tar_attack"] = attacked, attack_loss
                step_is_finite = self.is_finite_everywhere(attacked)
                what = f"the forget loss after the simulated attack is {attacked} ({metrics})"
            elif step_is_finite:
                torch.autograd.backward(loss.total * (1.0 / grad_accum))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value / grad_accum
            if not step_is_finite:
                if self.on_nonfinite == "stop":
                    raise self.nonfinite(what, step)
                break
        return sums, step_is_finite

    def micro_loss(self, batches: Mapping[str, Any], progress: float) -> _MicroLoss:
        """The method's weighted terms on one micro-batch, at the current weights."""
        return _micro_step(
            self.step_fn, self.method, batches, progress, self.optim.precision, self.device
        )

    def is_finite_everywhere(self, value: float) -> bool:
        """Whether `value` is finite on every rank (so all ranks stop or skip together)."""
        is_finite = math.isfinite(value)
        if self.world_size > 1:  # every rank stops or skips together instead of hanging
            flag = torch.tensor([0.0 if is_finite else 1.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            is_finite = flag.item() == 0.0
        return is_finite

    def sharpness_aware_backward(
        self, loss: _MicroLoss, batches: Mapping[str, Any], progress: float, seed: int
    ) -> float:
        """Accumulate a sharpness-aware micro-batch gradient; return the perturbed forget loss.

        Fan et al. 2025 (ICML), "Towards LLM Unlearning Resilient to Relearning Attacks: A
        Sharpness-Aware Minimization Perspective and Beyond": min_θ max_{‖δ‖≤ρ} L_f(θ + δ) +
        L_r(θ), with the inner maximum taken to first order as in SAM (Foret et al. 2021):
        δ = ρ g_f / ‖g_f‖, g_f = ∇L_f(θ). L_f is the weighted sum of every term but "retain", L_r
        the weighted retain term. The gradient accumulated is ∇L_r(θ) + ∇L_f(θ + δ): only the
        forget terms are sharpness-aware. ‖g_f‖ is over the trainable parameters (LoRA: the
        adapters) and δ is this micro-batch's own (with `grad_accum` > 1 or several ranks each
        micro-batch has its δ, SAM's m-sharpness). The weights are restored exactly (from a copy)
        afterwards, and random terms redraw the same numbers at θ + δ (reseeded with `seed`).
        Cost: one more forward pass of the step graph and one more backward pass of L_f.

        Returns:
            L_f(θ + δ) (unscaled); the gradient of a non-finite one is not accumulated.
        """
        scale = 1.0 / self.optim.grad_accum
        grads = torch.autograd.grad(loss.forget, self.params, retain_graph=True, allow_unused=True)
        if loss.retain.requires_grad:
            torch.autograd.backward(loss.retain * scale)
        present = [g for g in grads if g is not None]
        norm = torch.nn.utils.get_total_norm(present) if present else torch.zeros(())
        step_size = self.optim.sam_rho / (float(norm) + 1e-12)

        def ascend() -> None:
            with torch.no_grad():
                for param, grad in zip(self.params, grads, strict=True):
                    if grad is not None:
                        param.add_(grad, alpha=step_size)

        return self.forget_backward_elsewhere(ascend, batches, progress, seed)

    def tamper_resistant_backward(
        self,
        loss: _MicroLoss,
        batches: Mapping[str, Any],
        progress: float,
        seed: int,
        step: int,
        micro: int,
    ) -> tuple[float, float]:
        """Accumulate a TAR-style micro-batch gradient: the forget terms after a simulated attack.

        Tamirisa et al. 2025 (ICLR), "Tamper-Resistant Safeguards for Open-Weight LLMs", first-
        order: θ' = θ after `tar_steps` steps of a fine-tuning attack (AdamW from a fresh state
        at `tar_lr`, no weight decay, next-token loss on forget batches, i.e. attack-split text
        only: the batches the run's own stream holds past its last step), then ∇L_f(θ') is
        accumulated as the gradient at θ (the attack's steps are not differentiated through),
        and ∇L_r(θ) as usual. The weights, and the gradient accumulated before, are restored
        exactly afterwards. The attack moves the parameters the run trains (a phase that trains
        some blocks only is attacked in those). Cost: `tar_steps` forward and backward passes of
        the model, then one more forward pass of the step graph and backward pass of L_f.

        Returns:
            L_f(θ') (unscaled; its gradient is not accumulated when non-finite) and the attack's
            last next-token loss.
        """
        if loss.retain.requires_grad:
            torch.autograd.backward(loss.retain * (1.0 / self.optim.grad_accum))
        attack_losses: list[float] = []

        def attack() -> None:
            accumulated = [p.grad for p in self.params]
            for param in self.params:
                param.grad = None
            inner = torch.optim.AdamW(self.params, lr=self.optim.tar_lr, weight_decay=0.0)
            accum = self.optim.grad_accum
            for k in range(self.optim.tar_steps):
                index = self.num_steps + step * self.optim.tar_steps + k
                forget, _ = self.batches.at(index, self.rank, self.world_size, micro, accum)
                attack_losses.append(self.attack_step(inner, forget.to(self.device)))
            for param, grad in zip(self.params, accumulated, strict=True):
                param.grad = grad

        value = self.forget_backward_elsewhere(attack, batches, progress, seed)
        return value, attack_losses[-1]

    def attack_step(self, optimizer: torch.optim.Optimizer, batch: Any) -> float:
        """One step of the simulated fine-tuning attack: next-token loss on `batch`, AdamW."""
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        with _autocast(self.optim.precision, self.device):
            out = self.trainable(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def forget_backward_elsewhere(
        self, move: Callable[[], None], batches: Mapping[str, Any], progress: float, seed: int
    ) -> float:
        """Move the weights (`move`), accumulate the forget terms' gradient there, restore them.

        Shared by the sharpness-aware and the tamper-resistant steps. Random terms redraw the same
        numbers as at the weights themselves (reseeded with `seed`).

        Returns:
            The forget terms' value at the moved weights (unscaled); a non-finite one's gradient
            is not accumulated.
        """
        saved = [p.detach().clone() for p in self.params]
        try:
            move()
            torch.manual_seed(seed)
            moved = self.micro_loss(batches, progress)
            value = float(moved.forget.detach())
            if math.isfinite(value):  # the caller stops or skips the step on every rank
                torch.autograd.backward(moved.forget * (1.0 / self.optim.grad_accum))
        finally:
            with torch.no_grad():
                for param, original in zip(self.params, saved, strict=True):
                    param.copy_(original)
        return value

    def average_across_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """Average the metrics over the ranks, and the LoRA adapters' gradients (in place).

        Under full fine-tuning DDP or FSDP2 averaged the gradients during the backward pass.
        """
        if not self.wrapped:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        packed = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(packed, op=dist.ReduceOp.AVG)
        return dict(zip(sums, packed.tolist(), strict=True))

    def optimizer_step(self, step: int, lr: float) -> _StepOutcome:
        """One optimizer step at learning rate `lr`: gradients, their norm, clip, update or skip."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        sums, step_is_finite = self.accumulate_grads(step)
        if self.world_size > 1 and step_is_finite:
            sums = self.average_across_ranks(sums)
        grad_norm = float("nan")
        if step_is_finite:
            # Measured before clipping: clipping a NaN norm would write NaN into every gradient.
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = _total_norm(grads, self.device)
            grad_norm = float(norm)
            step_is_finite = math.isfinite(grad_norm)
            if not step_is_finite and self.on_nonfinite == "stop":
                what = f"gradient norm is {grad_norm} (loss {sums['loss/total']})"
                raise self.nonfinite(what, step)
        if step_is_finite:
            if self.optim.grad_clip > 0:
                _clip_grads(grads, self.optim.grad_clip, norm)
            for opt in self.optimizers:
                opt.step()
        else:
            self.skipped += 1
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
        return _StepOutcome(sums, grad_norm, step_is_finite)

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded across the ranks (FSDP2)."""
        return self.world_size > 1 and self.optim.parallel == "fsdp"

    def save(self, done: int) -> None:
        """Save the state after `done` steps, or stop if it is not finite.

        In one process a `train_state.pt`; under torchrun every rank writes its part of a
        sharded checkpoint (`unlearn.train_state_sharded`).
        """
        finite = is_finite(_local(floating_tensors(self.params, self.optimizers)))
        if self.sharded:  # each rank checked its own shards
            finite = self.is_finite_everywhere(0.0 if finite else math.inf)
        if not finite:  # every rank holds the same verdict, so all stop together
            raise self.nonfinite("the weights or optimizer state became NaN or infinite", done - 1)
        self.elapsed = self.saved.elapsed_seconds + time.perf_counter() - self.segment_start
        progress = Progress(done, self.elapsed, self.skipped)
        if self.wrapped:  # DTensor weights (sharded or replicated): a DCP checkpoint
            _sharded.save(self.out, self.trainable, self.optimizers, self.settings, progress)
        elif self.rank == 0:
            _save_state(self.out, self.trainable, self.optimizers, self.settings, progress)
        self.last_saved = done


def _start_run(
    model: nn.Module,
    method: Method,
    batches: PairedBatches,
    *,
    out: Path,
    num_steps: int,
    optim: OptimSettings,
    lora: LoraSettings | None,
    seed: int,
    on_nonfinite: str,
    run_key: str | None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None,
    ranks: tuple[int, int],
) -> _Run:
    """Make the frozen base, add LoRA, build the optimizers and the step graph, load a state.

    `ranks`: (rank, world size), from `distributed_context`.
    """
    rank, world_size = ranks
    device = next(model.parameters()).device
    settings = _train_settings(method, batches, num_steps, optim, lora, seed, on_nonfinite, run_key)
    # The frozen original, only for methods that read it. Full fine-tuning changes the weights,
    # so it is a copy (a model's memory); LoRA does not, so it is the trained model itself with
    # its adapters disabled (no second copy of the weights).
    uses_base = _uses_base(method)
    base = _frozen_original(model, lora) if uses_base else None
    if lora is not None:
        torch.manual_seed(seed)  # LoRA's random init: the same on every rank and every rerun
    trainable = add_lora(model, lora) if lora is not None else model
    if uses_base and base is None:
        base = adapters_disabled(trainable)
    companions = {**({BASE: base} if base is not None else {}), **extra_models(method)}
    # Compiled before the models become data-parallel: the graph's frozen copies (a lens's final
    # norm and unembedding) are taken of plain modules; the wrapping happens in place.
    step_fn = StepGraph(list(method.nodes)).compile({TRAINABLE: trainable, **companions})
    if optim.activation_checkpointing:
        _checkpoint_blocks(trainable, method)
    # LoRA: the adapters (a small share of the weights) are all-reduced after the backward pass;
    # the model stays plain, as merging the adapters needs.
    wrapped = world_size > 1 and lora is None
    if wrapped:
        _data_parallel(trainable, companions, optim, device)
    trainable.train()
    params = list(_trainable(trainable).values())
    optimizers = make_optimizer(params, optim)
    if not (out / STATE_FILE).exists():
        saved = Progress()
    elif wrapped:
        saved = _sharded.load(out, trainable, optimizers, settings)
    else:
        saved = load_state(out, _trainable(trainable), optimizers, settings)
    segment_start = time.perf_counter()
    history = _rewind_metrics(out / METRICS_FILE, saved.step) if rank == 0 else []
    return _Run(
        method=method,
        batches=batches,
        num_steps=num_steps,
        optim=optim,
        seed=seed,
        on_nonfinite=on_nonfinite,
        settings=settings,
        eval_fn=eval_fn,
        out=out,
        rank=rank,
        world_size=world_size,
        device=device,
        trainable=trainable,
        wrapped=wrapped,
        params=params,
        optimizers=optimizers,
        step_fn=step_fn,
        saved=saved,
        segment_start=segment_start,
        history=history,
        skipped=saved.skipped_steps,
        last_saved=saved.step,
        elapsed=saved.elapsed_seconds,
    )


def _run_steps(
    run: _Run,
    desc: str,
    log_every: int,
    eval_every: int,
    eval_steps: Collection[int],
    save_every: int,
) -> None:
    """Train from the resumed step to the last; after each step log, evaluate, save, in order."""
    start, num_steps = run.saved.step, run.num_steps
    progress = tqdm(
        range(start, num_steps),
        desc=desc,
        initial=start,
        total=num_steps,
        disable=run.rank != 0,
        dynamic_ncols=True,
    )
    for step in progress:
        lr = learning_rate(run.optim, step, num_steps)
        outcome = run.optimizer_step(step, lr)
        done = step + 1
        if run.rank == 0 and (done % log_every == 0 or done == num_steps or not outcome.is_finite):
            extra = {"skipped_steps": run.skipped} if run.skipped else {}
            run.log(
                {"step": done, "lr": lr, "grad_norm": outcome.grad_norm, **outcome.sums, **extra}
            )
            progress.set_postfix(loss=f"{outcome.sums['loss/total']:.3f}")
        if done == num_steps or (eval_every and done % eval_every == 0) or done in eval_steps:
            run.evaluate(done)  # before saving: a run killed in between redoes this evaluation
        if done % save_every == 0 or done == num_steps:
            run.save(done)
        if run.world_size > 1:
            dist.barrier()
    progress.close()


def _finish(run: _Run, lora: LoraSettings | None) -> TrainResult:
    """Warn about skipped steps; merge LoRA; the result with the time up to the final state."""
    if run.skipped:
        warnings.warn(
            f"{run.skipped} of {run.num_steps} steps were skipped for a NaN or infinite loss or "
            f"gradient norm ({run.out / METRICS_FILE} marks them with skipped_steps)",
            RuntimeWarning,
            stacklevel=3,
        )
    run.trainable.eval()
    merged = run.trainable.merge_and_unload() if lora is not None else run.trainable
    if run.wrapped:
        merged = _unwrapped(merged)
    # The time up to the final state, as saved: a rerun of a finished run reports the same.
    return TrainResult(
        model=merged, history=run.history, train_seconds=run.elapsed, skipped_steps=run.skipped
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
        lora: Train LoRA adapters (merged into the returned model) instead of all weights
            (None, or rank 0: every weight).
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
    lora = lora if lora is not None and lora.enabled else None
    rank, world_size = distributed_context()
    check_parallel(optim, lora, world_size)
    n_micro = world_size * optim.grad_accum
    _check_arguments(
        num_steps, save_every, log_every, eval_every, on_nonfinite, batches.batch_size, n_micro
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _start_run(
        model,
        method,
        batches,
        out=out,
        num_steps=num_steps,
        optim=optim,
        lora=lora,
        seed=seed,
        on_nonfinite=on_nonfinite,
        run_key=run_key,
        eval_fn=eval_fn,
        ranks=(rank, world_size),
    )
    if run.saved.step == 0:
        run.evaluate(0)
    _run_steps(run, desc, log_every, eval_every, eval_steps, save_every)
    return _finish(run, lora)


def train_plan(
    model: nn.Module,
    phases: Sequence[Phase],
    batches: PairedBatches,
    *,
    out_dir: str | os.PathLike[str],
    optim: OptimSettings = OptimSettings(),
    lora: LoraSettings | None = None,
    seed: int = 0,
    desc: str = "unlearn",
    **train_kwargs: Any,
) -> list[TrainResult]:
    """Run a method's phases (`unlearn.methods.plan`) in order, each one `train` call.

    A phase with `blocks` trains only those blocks (full fine-tuning, or LoRA adapters on their
    linear layers); one with `parameters` trains only the block parameters matching its patterns
    (LoRA: adapters only on the linear layers whose weight matches), in its `blocks` or in every
    block; a phase with neither trains what `train` trains. A phase with `init` first sets the
    model's weights with it (before `train` makes the frozen "base"). Each phase keeps its state
    in `out_dir/<phase.name>` with its own schedule (warmup and ramps restart), so a rerun passes
    through finished phases (`train` only reloads their weights) and resumes the interrupted one.

    Args:
        model: A Hugging Face causal LM (fp32 weights), changed in place; the original on every
            call, resumed or not (the phases' saved weights are applied to it).
        phases: The phases.
        batches: Paired forget/retain batches, used by every phase.
        out_dir: Root of the phases' output directories.
        optim: Optimizer settings of every phase.
        lora: LoRA adapters instead of full fine-tuning (merged at the end of each phase; None,
            or rank 0: every weight).
        seed: The run's seed; a phase trains with seed + its `seed_offset`.
        desc: Progress-bar label.
        **train_kwargs: Further arguments of `train` (eval_fn, eval_every, save_every,
            on_nonfinite, run_key, ...).

    Returns:
        Each phase's `TrainResult`; the last one's model is the unlearned model.
    """
    lora = lora if lora is not None and lora.enabled else None
    results = []
    for phase in phases:
        if phase.init is not None:
            with torch.no_grad():
                phase.init(model)
        phase_lora = lora
        if _restricts(phase):
            blocks = range(describe_model(model).n_layers) if phase.blocks is None else phase.blocks
            set_trainable_layers_(model, [] if lora is not None else blocks, phase.parameters)
            if lora is not None:
                phase_lora = block_lora(model, lora, blocks, phase.parameters)
        result = train(
            model,
            phase.method,
            batches,
            num_steps=phase.num_steps,
            out_dir=Path(out_dir) / phase.name,
            optim=optim,
            lora=phase_lora,
            seed=seed + phase.seed_offset,
            desc=f"{desc} {phase.name}".strip(),
            **train_kwargs,
        )
        model = result.model
        results.append(result)
    if any(_restricts(phase) for phase in phases):
        model.requires_grad_(False)
    return results


def _restricts(phase: Phase) -> bool:
    """Whether a phase trains only part of the model (some blocks, or some of their parameters)."""
    return phase.blocks is not None or phase.parameters is not None
