"""Benchmark: LoRA run memory with the frozen original as a deep copy vs the adapter-disabled model.

Under LoRA the training core's frozen original ("base") used to be a deep copy of the model; it is
now the trained model itself with its adapters disabled (`unlearn.training.adapters_disabled`).
For each method (one that reads "base") this trains `--num_steps` LoRA steps on the toy world
both ways (the copy through the training core's private switch `_COPY_BASE_UNDER_LORA`) and
reports, per way:

- the bytes of the unique parameter and buffer storages of the models the step graph is compiled
  with ("trainable", "base" and any extra), recorded at compile time;
- the peak of torch's CPU allocations during the `train_plan` call, from the profiler's memory
  events (torch's CPU allocator keeps no statistics of its own; the model loaded before the call
  is not counted, the copy made inside it is). Python's garbage collector runs only after every
  step: nnsight's traces leave reference cycles that hold activations, and where the collector
  happens to run otherwise moved the peak by up to 15 MiB between two identical runs;
- seconds per step of an unprofiled run of the same steps, and what one peft `disable_adapter()`
  context costs (entered once per trace of "base").

Run (about a minute on 2 CPU cores)::

    python -m benchmarks.lora_memory
    python -m benchmarks.lora_memory --world_preset tiny --num_steps 1 --out_dir /tmp/b  # smoke

Writes ``benchmarks/results/lora_memory.{json,md}`` with the command, machine and git SHA.
"""

from __future__ import annotations

import copy
import gc
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import simple_parsing
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from interventions import StepGraph
from unlearn import training
from unlearn.config import DataConfig, LoraSettings, ModelConfig, OptimSettings, TrainingConfig
from unlearn.data import PairedBatches, tokenize_documents
from unlearn.experiment import load_setup
from unlearn.methods import Context, registration
from unlearn.provenance import git_sha, machine, portable_paths
from unlearn.toyworld.config import WorldPreset

RESULTS = Path(__file__).resolve().parent / "results"

WAYS = {"copy": True, "adapters_disabled": False}
"""How the frozen original is made, to the value of the training core's `_COPY_BASE_UNDER_LORA`."""


@dataclass
class Config:
    """Benchmark settings."""

    methods: list[str] = field(default_factory=lambda: ["npo", "circuit_breakers"])
    """Registered methods to run (with their defaults); each must read "base"."""
    world_preset: WorldPreset = "default"
    """Toy-world preset whose unfiltered model is trained."""
    num_steps: int = 3
    """LoRA steps per run."""
    batch_size: int = 32
    """Forget and retain rows per step."""
    max_len: int = 128
    """Tokens per row."""
    max_docs: int = 256
    """Forget and retain documents tokenized (the runs read num_steps x batch_size rows)."""
    lora_rank: int = 8
    """LoRA rank."""
    threads: int = 1
    """torch threads."""
    out_dir: Path = RESULTS
    """Where to write lora_memory.json and lora_memory.md."""
    note: str = ""
    """A line about the conditions of the run, copied into the results."""


def _storages(model: nn.Module) -> dict[int, int]:
    """Bytes of each unique storage behind a model's parameters and buffers, by address."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def peak_allocated(prof: Any) -> int:
    """Peak of the running sum of the CPU allocations and frees the profiler recorded."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == DeviceType.CPU:
            total += event.nbytes()
            peak = max(peak, total)
    return peak


def _collect(model: nn.Module) -> dict[str, float]:
    """An "evaluation" that only runs Python's garbage collector (after every step)."""
    gc.collect()
    return {}


def run_way(way: str, model: nn.Module, phases: list, batches: PairedBatches, cfg: Config) -> dict:
    """Train `cfg.num_steps` LoRA steps with the original made `way`; memory and time."""
    storages: dict[str, dict[int, int]] = {}

    class Recording(StepGraph):
        def compile(self, models, **kwargs):
            storages.update({name: _storages(m) for name, m in models.items()})
            return super().compile(models, **kwargs)

    kwargs = dict(
        optim=OptimSettings(lr=1e-3, warmup_steps=1),
        lora=LoraSettings(lora_rank=cfg.lora_rank),
        seed=0,
        save_every=cfg.num_steps,
    )
    with (
        mock.patch.object(training, "StepGraph", Recording),
        mock.patch.object(training, "_COPY_BASE_UNDER_LORA", WAYS[way]),
        tempfile.TemporaryDirectory() as tmp,
    ):
        trained = copy.deepcopy(model)
        gc.collect()
        gc.disable()  # collected after every step only (`_collect`): the same points both ways
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = Path(tmp) / "p"
                training.train_plan(
                    trained, phases, batches, out_dir=out, eval_fn=_collect, eval_every=1, **kwargs
                )
        finally:
            gc.enable()
        del trained
        timed = copy.deepcopy(model)
        start = time.perf_counter()
        training.train_plan(timed, phases, batches, out_dir=Path(tmp) / "t", **kwargs)
        seconds = time.perf_counter() - start
    unique = {ptr: size for per_model in storages.values() for ptr, size in per_model.items()}
    return {
        "way": way,
        "model_bytes": {name: sum(s.values()) for name, s in storages.items()},
        "step_graph_unique_bytes": sum(unique.values()),
        "peak_allocated_bytes": peak_allocated(prof),
        "seconds_per_step": round(seconds / cfg.num_steps, 3),
    }


def disable_adapter_ms(model: nn.Module, cfg: Config, rounds: int = 50) -> float:
    """Milliseconds to enter and leave peft's `disable_adapter()` once on this model."""
    peft_model = training.add_lora(copy.deepcopy(model), LoraSettings(lora_rank=cfg.lora_rank))
    start = time.perf_counter()
    for _ in range(rounds):
        with peft_model.disable_adapter():
            pass
    return round(1e3 * (time.perf_counter() - start) / rounds, 3)


def bench_method(name: str, setup: Any, batches: PairedBatches, cfg: Config) -> list[dict]:
    """Both ways for one method, with its registered defaults."""
    model = setup.loaded.hf_model.float()
    with tempfile.TemporaryDirectory() as tmp:
        context = Context(
            model=model,
            tokenizer=setup.loaded.tokenizer,
            source=setup.loaded.source,
            forget_docs=setup.forget_docs[: cfg.max_docs],
            retain_docs=setup.retain_docs[: cfg.max_docs],
            items=setup.items,
            data=DataConfig(batch_size=cfg.batch_size, max_len=cfg.max_len),
            training=TrainingConfig(num_steps=cfg.num_steps),
            device="cpu",
            out_dir=Path(tmp),
            world=setup.world,
        )
        plan = registration(name).build(registration(name).default_config(), context)
    if not any(training._uses_base(phase.method) for phase in plan.phases):
        raise ValueError(f"{name} does not read 'base' with its defaults; choose another method")
    rows = []
    for way in WAYS:
        row = {"method": name, **run_way(way, model, plan.phases, batches, cfg)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_results(cfg: Config, info: dict[str, Any]) -> None:
    """lora_memory.json and a markdown table."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "lora_memory.json").write_text(json.dumps(info, indent=2) + "\n")
    mib = 2**20
    weights = info["model_weight_bytes"]
    lines = [
        "# The frozen original of a LoRA run: a deep copy vs the model with adapters disabled",
        "",
        f"Command: `{info['command']}` ({info['seconds']} s), git {info['git_sha']}",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info["machine"].items()),
        "",
        *([f"Note: {cfg.note}", ""] if cfg.note else []),
        f"Toy world `{cfg.world_preset}`: {info['model_params'] / 1e6:.2f}M parameters, "
        f"{weights / mib:.2f} MiB of weights and buffers; LoRA rank {cfg.lora_rank}, "
        f"{cfg.num_steps} steps of {cfg.batch_size} x {cfg.max_len} tokens. Step-graph storages: "
        "unique bytes of the parameters and buffers of the models the step graph is compiled "
        "with. Peak: torch's CPU allocations during the run (profiler memory events; the loaded "
        "model is not counted; garbage collected after every step). One `disable_adapter()` "
        "costs "
        f"{info['disable_adapter_ms']} ms (entered once per trace of the original).",
        "",
        "| method | original | step-graph storages MiB | peak MiB | saved MiB (copies) | s/step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    by_method: dict[str, dict[str, dict]] = {}
    for row in info["results"]:
        by_method.setdefault(row["method"], {})[row["way"]] = row
    for method, ways in by_method.items():
        for way, row in ways.items():
            saved = ways["copy"]["peak_allocated_bytes"] - row["peak_allocated_bytes"]
            lines.append(
                f"| {method} | {way} | {row['step_graph_unique_bytes'] / mib:.2f} "
                f"| {row['peak_allocated_bytes'] / mib:.2f} | {saved / mib:.2f} "
                f"({saved / weights:.2f}) | {row['seconds_per_step']} |"
            )
    (cfg.out_dir / "lora_memory.md").write_text("\n".join(lines) + "\n")


def main(cfg: Config) -> dict[str, Any]:
    """Load the toy world once, run every method both ways, write the results."""
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    data = DataConfig(batch_size=cfg.batch_size, max_len=cfg.max_len)
    setup = load_setup(ModelConfig(world_preset=cfg.world_preset, device="cpu"), data)
    model, tokenizer = setup.loaded.hf_model.float(), setup.loaded.tokenizer
    batches = PairedBatches(
        tokenize_documents(tokenizer, setup.forget_docs[: cfg.max_docs], cfg.max_len),
        tokenize_documents(tokenizer, setup.retain_docs[: cfg.max_docs], cfg.max_len),
        batch_size=cfg.batch_size,
    )
    rows = [row for name in cfg.methods for row in bench_method(name, setup, batches, cfg)]
    info = {
        "command": shlex.join(["python", "-m", "benchmarks.lora_memory", *sys.argv[1:]]),
        "config": portable_paths(asdict(cfg)),
        "git_sha": git_sha(),
        "machine": machine(),
        "seconds": round(time.perf_counter() - start, 1),
        "model_params": sum(p.numel() for p in model.parameters()),
        "model_weight_bytes": sum(_storages(model).values()),
        "disable_adapter_ms": disable_adapter_ms(model, cfg),
        "results": rows,
    }
    write_results(cfg, info)
    return info


if __name__ == "__main__":
    main(simple_parsing.parse(Config, add_config_path_arg=False))
