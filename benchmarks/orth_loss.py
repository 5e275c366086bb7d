"""Benchmark: the orthogonality loss, eager reference vs torch.compile vs the fused Triton kernel.

Each case times forward + backward (loss, then the gradient w.r.t. the [layer batch pos d_model]
activations) of three implementations on the same random activations and mask (25% of each
sequence padded):

- ``eager``: `unlearn.losses.orthogonality_loss`, the PyTorch reference;
- ``compile``: `torch.compile(orthogonality_loss, dynamic=True)` (its compile time shows in the
  first call's time, ``first_s``; timed rounds start after the warm-up);
- ``triton``: `unlearn.kernels.orthogonality_loss_fused(..., backend="triton")`, CUDA only.

Reported per case: median milliseconds over the timed rounds, the peak memory allocated beyond the
inputs (CUDA only: torch's CPU allocator keeps no statistics), and the achieved bandwidth, taken as
the minimum traffic any implementation needs (read the activations once, write their gradient once:
2 x layer x batch x pos x d_model x itemsize bytes) divided by the median time.

Grids. On CUDA (the default there; about 4 minutes on one H200), bf16, every combination of
batch {4, 16, 32}, pos {512, 2048}, d_model {2048, 4096}, layers {1, 8, 32}. Without CUDA, the
PyTorch paths only at a reduced grid, bf16, batch {4, 16}, pos {128, 512}, d_model {256, 1024},
layers {1, 4}; the results say which grid ran. ``--max_seconds`` stops starting new cases once
exceeded (the skipped cases are listed).

Run::

    python -m benchmarks.orth_loss                          # GPU grid on CUDA, CPU grid otherwise
    python -m benchmarks.orth_loss --batch 4 --pos 64 --d_model 128 --layers 2 --out_dir /tmp/b

Writes ``benchmarks/results/orth_loss.{json,md}`` with the device and the command.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import simple_parsing
import torch
from torch import Tensor

from unlearn.kernels import orthogonality_loss_fused, triton_available
from unlearn.losses import orthogonality_loss
from unlearn.provenance import portable_paths

RESULTS = Path(__file__).resolve().parent / "results"

GRIDS = {
    "gpu": dict(batch=[4, 16, 32], pos=[512, 2048], d_model=[2048, 4096], layers=[1, 8, 32]),
    "cpu": dict(batch=[4, 16], pos=[128, 512], d_model=[256, 1024], layers=[1, 4]),
}
"""Default shape grids: the full one on CUDA, a reduced one for the PyTorch paths on a CPU."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Config:
    """Benchmark settings; an empty shape list takes the device's default grid (GRIDS)."""

    batch: list[int] = field(default_factory=list)
    """Batch sizes."""
    pos: list[int] = field(default_factory=list)
    """Sequence lengths."""
    d_model: list[int] = field(default_factory=list)
    """Model widths."""
    layers: list[int] = field(default_factory=list)
    """Numbers of target layers."""
    dtype: str = "bf16"
    """Activation dtype: bf16, fp16 or fp32."""
    impls: list[str] = field(default_factory=lambda: ["eager", "compile", "triton"])
    """Implementations to time; triton is dropped without CUDA."""
    rounds: int = 0
    """Timed rounds per case (0: 10 on CUDA, 3 on CPU)."""
    warmup: int = 2
    """Untimed rounds first (the first compile call is one of them)."""
    max_seconds: float = 280.0
    """Start no new case after this many seconds (the rest are listed as skipped)."""
    threads: int = 0
    """torch threads on CPU (0: torch's default)."""
    out_dir: Path = RESULTS
    """Where to write orth_loss.json and orth_loss.md."""
    note: str = ""
    """A line about the conditions of the run, copied into the results."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _implementations(names: list[str]) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    table = {
        "eager": orthogonality_loss,
        "compile": torch.compile(orthogonality_loss, dynamic=True),
        "triton": lambda acts, mask: orthogonality_loss_fused(acts, mask, backend="triton"),
    }
    return {name: table[name] for name in names}


def time_case(
    fn: Callable[[Tensor, Tensor], Tensor], acts: Tensor, mask: Tensor, warmup: int, rounds: int
) -> dict:
    """Median forward + backward time, first-call time and peak extra memory of one case."""
    device = acts.device

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        loss = fn(acts, mask)
        (grad,) = torch.autograd.grad(loss, acts)
        _sync(device)
        del grad
        return time.perf_counter() - start

    first_s = step()
    for _ in range(warmup - 1):
        step()
    peak_extra = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    times = [step() for _ in range(rounds)]
    if device.type == "cuda":
        peak_extra = torch.cuda.max_memory_allocated(device) - baseline
    return {
        "ms": 1e3 * statistics.median(times),
        "first_s": first_s,
        "peak_extra_bytes": peak_extra,
    }


def machine(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def write_results(cfg: Config, info: dict, rows: list[dict], skipped: list[dict]) -> None:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "orth_loss.json").write_text(
        json.dumps({**info, "rows": rows, "skipped": skipped}, indent=1) + "\n"
    )
    lines = [
        "# Orthogonality loss: eager vs torch.compile vs fused Triton kernel",
        "",
        f"Command: `{info['command']}` ({info['seconds']:.1f} s)",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info["machine"].items()),
        "",
        f"Grid: {info['grid']} ({info['grid_note']}), dtype {cfg.dtype}, "
        f"{info['rounds']} timed rounds after {cfg.warmup} warm-up.",
        "",
    ]
    if cfg.note:
        lines += [f"Note: {cfg.note}", ""]
    lines += [
        "Forward + backward, median ms. GB/s is the minimum traffic (read the activations once, "
        "write their gradient once) over the median time. Peak MiB: memory allocated beyond the "
        "inputs (CUDA only). first s: the first call, which for `compile` includes compilation "
        "(dynamic shapes, so mostly only the first case of the run compiles).",
        "",
        "| layers | batch | pos | d_model | acts MiB | impl | ms | GB/s | peak MiB | first s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        peak = row["peak_extra_bytes"]
        lines.append(
            f"| {row['layers']} | {row['batch']} | {row['pos']} | {row['d_model']} "
            f"| {row['acts_bytes'] / 2**20:.1f} | {row['impl']} | {row['ms']:.3f} "
            f"| {row['gb_per_s']:.2f} | {'n/a' if peak is None else f'{peak / 2**20:.0f}'} "
            f"| {row['first_s']:.2f} |"
        )
    if skipped:
        lines += ["", f"Skipped after --max_seconds: {len(skipped)} cases: {skipped}"]
    (cfg.out_dir / "orth_loss.md").write_text("\n".join(lines) + "\n")


def main(cfg: Config) -> list[dict]:
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    grid_name = "gpu" if device.type == "cuda" else "cpu"
    shapes = {key: getattr(cfg, key) or default for key, default in GRIDS[grid_name].items()}
    is_default_grid = all(shapes[key] == GRIDS[grid_name][key] for key in shapes)
    grid_note = f"the {grid_name} default grid" if is_default_grid else "a custom grid"
    if device.type == "cpu":
        grid_note += "; no CUDA, so PyTorch paths only (the Triton kernel is not timed)"
    impl_names = [name for name in cfg.impls if name != "triton" or device.type == "cuda"]
    impls = _implementations(impl_names)
    rounds = cfg.rounds or (10 if device.type == "cuda" else 3)
    dtype = DTYPES[cfg.dtype]
    cases = sorted(
        itertools.product(shapes["layers"], shapes["batch"], shapes["pos"], shapes["d_model"]),
        key=lambda case: (case[0] * case[1] * case[2] * case[3], case),
    )
    rows, skipped = [], []
    generator = torch.Generator().manual_seed(0)
    for num_layers, batch, pos, d_model in cases:
        case = dict(layers=num_layers, batch=batch, pos=pos, d_model=d_model)
        if time.perf_counter() - start > cfg.max_seconds:
            skipped.append(case)
            continue
        acts = torch.randn(num_layers, batch, pos, d_model, generator=generator)
        acts = acts.to(device=device, dtype=dtype).requires_grad_(True)
        mask = torch.ones(batch, pos, dtype=torch.bool)
        mask[:, int(0.75 * pos) :] = False
        mask = mask.to(device)
        traffic = 2 * acts.numel() * acts.element_size()
        for name, fn in impls.items():
            result = time_case(fn, acts, mask, cfg.warmup, rounds)
            row = {
                **case,
                "impl": name,
                "acts_bytes": acts.numel() * acts.element_size(),
                **result,
                "gb_per_s": traffic / (result["ms"] * 1e-3) / 1e9,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del acts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = {
        "command": shlex.join(["python", "-m", "benchmarks.orth_loss", *sys.argv[1:]]),
        "config": portable_paths(asdict(cfg)),
        "machine": machine(device),
        "grid": shapes,
        "grid_note": grid_note,
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
    }
    write_results(cfg, info, rows, skipped)
    return rows


if __name__ == "__main__":
    main(simple_parsing.parse(Config, args=sys.argv[1:]))
