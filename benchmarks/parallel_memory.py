"""Benchmark: memory per process of a method with a frozen companion at 1 and 2 processes.

Circuit breakers (which read the frozen original) train `--num_steps` full fine-tuning steps on
the toy world in one process, and under `torchrun` on 2 gloo processes with DDP and with FSDP2
(its companion replicated, then sharded). Each process records the peak of torch's CPU
allocations from loading the model to the end of training (profiler memory events, Python's
garbage collector run after every step, as `benchmarks.lora_memory`), the bytes of its own
parameters and optimizer state, and seconds per step; next to each, the memory model's estimate
(`unlearn.memory.estimate`) of the same run.

Run (a few minutes on 2 CPU cores)::

    python -m benchmarks.parallel_memory
    python -m benchmarks.parallel_memory --world_preset tiny --num_steps 1 --out_dir /tmp/pm

Writes ``benchmarks/results/parallel_memory.{json,md}`` with the command, machine and git SHA.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from simple_parsing import parse

from benchmarks.lora_memory import peak_allocated
from unlearn.memory import MIB, PYTHIA_6_9B, ModelShape, estimate
from unlearn.provenance import git_sha, machine
from unlearn.toyworld.config import WorldPreset

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "1 process": (1, "ddp", False),
    "2 x DDP": (2, "ddp", False),
    "2 x FSDP2, companion replicated": (2, "fsdp", False),
    "2 x FSDP2, companion sharded": (2, "fsdp", True),
}
"""Label -> (processes, --parallel, --shard_companions)."""


@dataclass
class Config:
    """Memory per process at 1 and 2 processes."""

    world_preset: WorldPreset = "default"
    """Toy-world preset."""
    num_steps: int = 3
    """Training steps per run."""
    batch_size: int = 16
    """Forget (and as many retain) rows per optimizer step, over every process."""
    max_len: int = 128
    """Tokens per row."""
    out_dir: str = "benchmarks/results"
    """Where parallel_memory.{json,md} go."""
    worker: str | None = None
    """(internal) Run one process's measurement and write it to this file."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """(internal) The worker's strategy."""
    shard_companions: bool = False
    """(internal) The worker's companion sharding."""


def _local_bytes(tensors: list[Any]) -> int:
    return sum(
        (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes() for t in tensors
    )


def worker(cfg: Config) -> None:
    """One process: load, train with the profiler on, write the measurement to `cfg.worker`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import unlearn.training as training
    from unlearn.config import DataConfig, ModelConfig, OptimSettings, TrainingConfig
    from unlearn.data import PairedBatches, tokenize_documents
    from unlearn.experiment import load_setup
    from unlearn.methods import Context, registration
    from unlearn.ranks import distributed_context

    rank, world_size = distributed_context()
    torch.manual_seed(0)
    optimizers: list[Any] = []
    make_optimizer = training.make_optimizer

    def recording(params, settings):  # the optimizers, to measure their state afterwards
        optimizers.extend(make_optimizer(params, settings))
        return optimizers

    training.make_optimizer = recording
    gc.collect()
    gc.disable()
    with (
        tempfile.TemporaryDirectory() as tmp,
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        setup = load_setup(ModelConfig(world_preset=cfg.world_preset), DataConfig())
        model = setup.loaded.hf_model.float()
        shape = ModelShape.of(model)
        tokenizer = setup.loaded.tokenizer
        forget = tokenize_documents(tokenizer, setup.forget_docs[:256], cfg.max_len)
        retain = tokenize_documents(tokenizer, setup.retain_docs[:256], cfg.max_len)
        context = Context(
            model=model,
            tokenizer=tokenizer,
            source=setup.loaded.source,
            forget_docs=setup.forget_docs[:256],
            retain_docs=setup.retain_docs[:256],
            items=setup.items,
            data=DataConfig(batch_size=cfg.batch_size, max_len=cfg.max_len),
            training=TrainingConfig(num_steps=cfg.num_steps),
            device="cpu",
            out_dir=Path(tmp),
            world=setup.world,
        )
        method = registration("circuit_breakers")
        plan = method.build(method.default_config(), context)
        batches = PairedBatches(forget, retain, batch_size=cfg.batch_size)
        shapes = [
            rows.input_ids.shape[1]
            for step in range(cfg.num_steps)
            for rows in batches.at(step, rank, world_size, 0, 1)
        ]
        start = time.perf_counter()
        results = training.train_plan(
            model,
            plan.phases,
            batches,
            out_dir=Path(tmp) / "run",
            optim=OptimSettings(
                lr=1e-3,
                warmup_steps=1,
                parallel=cfg.parallel,
                shard_companions=cfg.shard_companions,
            ),
            eval_fn=lambda m: gc.collect() and {} or {},
            eval_every=1,
            save_every=cfg.num_steps,
        )
        seconds = time.perf_counter() - start
        params = [p for p in model.parameters()]
        states = [
            v for opt in optimizers for s in opt.state.values() for v in s.values()
            if torch.is_tensor(v) and v.numel() > 1
        ]  # fmt: skip
        measured = {
            "rank": rank,
            "peak_allocated_bytes": None,
            "own_parameter_bytes": _local_bytes(params),
            "optimizer_state_bytes": _local_bytes(states),
            "seconds_per_step": seconds / cfg.num_steps,
            "shape": asdict(shape),
            "padded_tokens_per_row": sum(shapes) / len(shapes),
            "eager_attention": getattr(model.config, "_attn_implementation", None) == "eager",
            "final_loss": results[-1].history[-1].get("loss/total")
            if results[-1].history
            else None,
        }
    gc.enable()
    measured["peak_allocated_bytes"] = peak_allocated(prof)
    Path(cfg.worker).with_suffix(f".rank{rank}.json").write_text(json.dumps(measured) + "\n")
    if world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def run_setting(cfg: Config, label: str, tmp: Path) -> dict[str, Any]:
    """Launch one setting (one process, or torchrun with two) and read its measurements."""
    nproc, parallel, shard = SETTINGS[label]
    target = tmp / label.replace(" ", "_").replace(",", "")
    args = [
        "-m", "benchmarks.parallel_memory", "--worker", str(target), "--parallel", parallel,
        "--shard_companions", str(shard), "--world_preset", cfg.world_preset,
        "--num_steps", str(cfg.num_steps), "--batch_size", str(cfg.batch_size),
        "--max_len", str(cfg.max_len),
    ]  # fmt: skip
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         "--master_port=29611"]
        if nproc > 1
        else [sys.executable]
    )  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, *args], cwd=REPO_ROOT, env=env, text=True, capture_output=True
    )
    if done.returncode:
        raise RuntimeError(f"{label} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ranks = [json.loads(target.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]
    shape = ModelShape(**ranks[0]["shape"])
    predicted = estimate(
        shape,
        rows=2 * cfg.batch_size,
        seq_len=ranks[0]["padded_tokens_per_row"],
        world_size=nproc,
        eager_attention=ranks[0]["eager_attention"],
        parallel=parallel,
        shard_companions=shard,
    )
    return {"label": label, "ranks": ranks, "estimate": asdict(predicted), "total": predicted.total}


def markdown(info: dict[str, Any]) -> str:
    """parallel_memory.md: what was run, measured against the estimate, and the 6.9B table."""
    cfg, mach = info["config"], info["machine"]
    lines = [
        "# Memory per process at 1 and 2 processes",
        "",
        f"Command: `{info['command']}`, git {info['git_sha']}",
        "",
        f"Machine: {mach['platform']}, torch {mach['torch']}, {mach['cpu_threads']} CPU threads "
        "(each process 1 thread, gloo).",
        "",
        f"Circuit breakers (frozen original as companion), full fine-tuning, AdamW, "
        f"{cfg['num_steps']} steps of {cfg['batch_size']} forget and {cfg['batch_size']} retain "
        f"rows of at most {cfg['max_len']} tokens (global; "
        f"{info['settings'][0]['ranks'][0]['padded_tokens_per_row']:.0f} after padding to each "
        f"batch's longest), toy world `{cfg['world_preset']}` "
        f"({info['settings'][0]['ranks'][0]['shape']['n_params'] / 1e6:.2f}M parameters). "
        "Measured: peak of torch's CPU allocations from loading the model to the end of "
        "training (rank 0; profiler memory events), the process's own parameter and optimizer "
        "state bytes. Estimated: `unlearn.memory.estimate` of the same run.",
        "",
        "| setting | measured peak MiB | own parameters MiB | optimizer state MiB | "
        "estimate MiB (weights / grads / optimizer / companions / activations) | "
        "measured / estimate | s/step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in info["settings"]:
        rank0, est = row["ranks"][0], row["estimate"]
        parts = " / ".join(f"{est[k] / MIB:.1f}" for k in est)
        lines.append(
            f"| {row['label']} | {rank0['peak_allocated_bytes'] / MIB:.1f} | "
            f"{rank0['own_parameter_bytes'] / MIB:.2f} | "
            f"{rank0['optimizer_state_bytes'] / MIB:.2f} | {row['total'] / MIB:.1f} ({parts}) | "
            f"{rank0['peak_allocated_bytes'] / row['total']:.2f} | "
            f"{rank0['seconds_per_step']:.2f} |"
        )
    lines += ["", "Estimated for Pythia-6.9B (GiB per device, fp32 weights, AdamW, batch 32 "
              "forget + 32 retain rows x 512 tokens global, bf16 activations):", "",
              "| setting | weights | grads | optimizer | companions | activations | total |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for label, est in info["pythia_6_9b"].items():
        lines.append(f"| {label} | " + " | ".join(f"{v / 2**30:.1f}" for v in est.values()) + " |")
    return "\n".join(lines) + "\n"


PYTHIA_LORA_R16 = 32 * 16 * ((4096 + 12288) + (4096 + 4096) + (4096 + 16384) + (16384 + 4096))
"""Rank-16 adapters on every linear layer of Pythia-6.9B's 32 blocks: r (d_in + d_out) each."""


def pythia_table() -> dict[str, dict[str, float]]:
    """The estimate for 6.9B at the settings docs/MEMORY.md and the README quote."""
    rows = {
        "1 GPU": dict(world_size=1),
        "8 x DDP": dict(world_size=8, parallel="ddp"),
        "8 x FSDP2, companion replicated": dict(world_size=8, parallel="fsdp"),
        "8 x FSDP2, companion sharded": dict(world_size=8, parallel="fsdp", shard_companions=True),
        "8 x DDP, LoRA r16 (no companion copy)": dict(
            world_size=8, parallel="ddp", companions=0, lora_params=PYTHIA_LORA_R16
        ),
    }
    table = {}
    for label, kwargs in rows.items():
        est = estimate(PYTHIA_6_9B, rows=64, seq_len=512, precision="bfloat16", **kwargs)
        table[label] = {**asdict(est), "total": est.total}
    return table


def main(cfg: Config) -> dict[str, Any]:
    """Every setting, then the results files."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_setting(cfg, label, Path(tmp)) for label in SETTINGS]
    sha = git_sha()
    info = {
        "command": shlex.join(["python", "-m", "benchmarks.parallel_memory", *sys.argv[1:]]),
        "git_sha": sha,
        "machine": machine(),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("worker",)},
        "settings": rows,
        "pythia_6_9b": pythia_table(),
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel_memory.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "parallel_memory.md").write_text(markdown(info))
    print(markdown(info))
    return info


if __name__ == "__main__":
    config = parse(Config)
    if config.worker:
        worker(config)
    else:
        main(config)
