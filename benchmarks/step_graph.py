"""Benchmark: training steps compiled from a step graph vs the same math in raw forward hooks.

Three steps, each forward + loss + backward + AdamW on GPT-NeoX models with random weights:

- ``mse_mid``: masked MSE between the trainable and the frozen model's block outputs at a middle
  layer (both forwards stop after that block).
- ``routed_write``: sequential-unlearning routing written as a Read, a Write and a Read: the
  trainable model's middle-block output replaces the frozen base's, and a max-entropy loss is taken
  on the base's logits. Same FLOPs as the raw-hook version, so the ratio is nnsight's overhead.
- ``routed_skip``: the same math as one ``Route`` node, which skips the base's blocks up to the
  routed one instead of computing and overwriting them (a raw hook cannot skip a module).

Raw-hook baselines run on separate copies that nnsight never wrapped (a wrapped module's plain
forward pays nnsight's inert per-module dispatch), with the same inputs (attention mask and
position ids included) and the same early stop (an exception from the hook). The two variants run
back to back in each round, in alternating order, and the reported ratio is the median of the
per-round ratios, so drift from other jobs on the machine hits both sides alike.

Run (about 2 minutes on 2 CPU cores)::

    python -m benchmarks.step_graph
    python -m benchmarks.step_graph --rounds 2 --sizes toy --out_dir /tmp/bench   # smoke test

Writes ``benchmarks/results/step_graph.{json,md}`` with the machine and the command.
"""

from __future__ import annotations

import copy
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

import nnsight
import simple_parsing
import torch
import transformers
from torch import Tensor, nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from interventions import Read, Route, StepGraph, Write, position_ids_from_mask
from unlearn.provenance import portable_paths

RESULTS = Path(__file__).resolve().parent / "results"

SIZES = {
    "toy": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "25M": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048
    ),
}
"""Model sizes: the toy world's default GPT-NeoX, and one of about 25M parameters."""


@dataclass
class Config:
    """Benchmark settings."""

    sizes: list[str] = field(default_factory=lambda: ["toy", "25M"])
    """Which model sizes to run (keys of SIZES)."""
    batch_toy: int = 16
    """Batch size for the toy model (the toy world trains at 32)."""
    batch_25m: int = 8
    """Batch size for the 25M model."""
    seq_len: int = 128
    """Tokens per sequence (the models' context length)."""
    rounds: int = 12
    """Timed rounds on the toy model; each round runs every variant of every step once."""
    rounds_25m: int = 6
    """Timed rounds on the 25M model."""
    warmup: int = 2
    """Untimed rounds first."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    out_dir: Path = RESULTS
    """Where to write step_graph.json and step_graph.md."""
    note: str = ""
    """A line about the conditions of the run, copied into the results."""


class _Stop(Exception):
    """Raised by a raw hook to end a forward early, the way nnsight's tracer.stop() does."""


def build(size: str) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
        **SIZES[size],
    )
    return GPTNeoXForCausalLM(config)


def capture(
    model: GPTNeoXForCausalLM, layer: int, kwargs: dict, *, replace: Tensor | None = None
) -> Tensor:
    """Raw hooks: return block ``layer``'s output and stop, or replace it and return the logits."""
    store = {}

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if replace is not None:
            return replace
        store["h"] = output
        raise _Stop

    handle = model.gpt_neox.layers[layer].register_forward_hook(hook)
    try:
        logits = model(**kwargs).logits
    except _Stop:
        return store["h"]
    finally:
        handle.remove()
    return logits


def max_entropy_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """KL(uniform || p) up to a constant: logsumexp(z) - mean(z), masked mean over tokens."""
    per_token = logits.logsumexp(-1) - logits.mean(-1)
    return (per_token * mask).sum() / mask.sum()


def masked_mse(acts: Tensor, ref: Tensor, mask: Tensor) -> Tensor:
    return ((acts - ref).pow(2).mean(-1) * mask).sum() / mask.sum()


def make_steps(size: str, batch: dict, layer: int) -> dict[str, dict[str, Callable[[], Tensor]]]:
    """Each step as an nnsight variant and a raw-hook variant, each on its own model copies."""
    torch.manual_seed(0)
    base = build(size).requires_grad_(False)
    trainable = copy.deepcopy(base).requires_grad_(True)
    with torch.no_grad():
        for param in trainable.parameters():
            param.add_(0.02 * torch.randn_like(param))
    raw_base, raw_trainable = copy.deepcopy(base), copy.deepcopy(trainable)
    models = {"trainable": trainable, "base": base}
    site = f"blocks.{layer}.hook_resid_post"
    mask = batch["attention_mask"].float()
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
        use_cache=False,
    )
    mse = StepGraph(
        [
            Read("acts", site, model="trainable", batch="forget"),
            Read("ref", site, model="base", batch="forget"),
        ]
    ).compile(models)
    routed_write = StepGraph(
        [
            Read("h", site, model="trainable", batch="forget"),
            Write(site, value="h", model="base", batch="forget"),
            Read("logits", "unembed", model="base", batch="forget"),
        ]
    ).compile(models)
    routed_skip = StepGraph(
        [
            Route("logits", site, source="trainable", target="base", batch="forget"),
        ]
    ).compile(models)
    batches = {"forget": batch}

    def raw_mse() -> Tensor:
        with torch.no_grad():
            ref = capture(raw_base, layer, kwargs)
        return masked_mse(capture(raw_trainable, layer, kwargs), ref, mask)

    def raw_routed() -> Tensor:
        h = capture(raw_trainable, layer, kwargs)
        return max_entropy_loss(capture(raw_base, layer, kwargs, replace=h), mask)

    def graph_mse() -> Tensor:
        out = mse(batches)
        return masked_mse(out["acts"], out["ref"], mask)

    return {
        "mse_mid": {"nnsight": graph_mse, "raw_hooks": raw_mse},
        "routed_write": {
            "nnsight": lambda: max_entropy_loss(routed_write(batches)["logits"], mask),
            "raw_hooks": raw_routed,
        },
        "routed_skip": {
            "nnsight": lambda: max_entropy_loss(routed_skip(batches)["logits"], mask),
            "raw_hooks": raw_routed,
        },
        "_trainables": {"nnsight": trainable, "raw_hooks": raw_trainable},
    }


def bench_size(cfg: Config, size: str) -> list[dict]:
    """Time every step's two variants on one model size; check they compute the same loss."""
    n_batch = cfg.batch_toy if size == "toy" else cfg.batch_25m
    rounds = cfg.rounds if size == "toy" else cfg.rounds_25m
    torch.manual_seed(1)
    input_ids = torch.randint(2, 512, (n_batch, cfg.seq_len))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    layer = SIZES[size]["num_hidden_layers"] // 2 - 1
    steps = make_steps(size, batch, layer)
    trainables = steps.pop("_trainables")
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in trainables.items()
    }
    n_params = sum(p.numel() for p in trainables["nnsight"].parameters())

    def train_step(step: str, variant: str) -> tuple[float, float]:
        optimizer = optimizers[variant]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = steps[step][variant]()
        torch.autograd.backward(loss)
        optimizer.step()
        return time.perf_counter() - start, loss.item()

    rows = []
    for step in steps:
        # Same weights on both sides before the first update, so the losses must agree.
        losses = {v: steps[step][v]().item() for v in ("nnsight", "raw_hooks")}
        if abs(losses["nnsight"] - losses["raw_hooks"]) > 1e-4 * max(1.0, abs(losses["raw_hooks"])):
            raise AssertionError(f"{size} {step}: losses differ {losses}")
        times: dict[str, list[float]] = {"nnsight": [], "raw_hooks": []}
        for round_index in range(cfg.warmup + rounds):
            order = ("nnsight", "raw_hooks") if round_index % 2 else ("raw_hooks", "nnsight")
            for variant in order:
                elapsed, _ = train_step(step, variant)
                if round_index >= cfg.warmup:
                    times[variant].append(elapsed)
        medians = {v: statistics.median(t) for v, t in times.items()}
        minima = {v: min(t) for v, t in times.items()}
        paired = [n / r for n, r in zip(times["nnsight"], times["raw_hooks"], strict=True)]
        rows.append(
            {
                "size": size,
                "params": n_params,
                "batch": n_batch,
                "seq_len": cfg.seq_len,
                "layer": layer,
                "step": step,
                "nnsight_ms": round(1e3 * medians["nnsight"], 2),
                "raw_hooks_ms": round(1e3 * medians["raw_hooks"], 2),
                "ratio": round(statistics.median(paired), 3),
                "ratio_of_minima": round(minima["nnsight"] / minima["raw_hooks"], 3),
                "rounds": rounds,
                "loss_at_start": round(losses["raw_hooks"], 6),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": torch.multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "nnsight": nnsight.__version__,
        "transformers": transformers.__version__,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


def write_results(cfg: Config, rows: list[dict], seconds: float) -> None:
    info = {
        "command": shlex.join(["python", "-m", "benchmarks.step_graph", *sys.argv[1:]]),
        "config": portable_paths(asdict(cfg)),
        "machine": machine(),
        "seconds": round(seconds, 1),
        "targets": {"toy": "ratio <= 1.15", "25M": "ratio <= 1.05"},
        "results": rows,
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "step_graph.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        "# Step graph vs raw forward hooks",
        "",
        f"Command: `{info['command']}` ({info['seconds']} s)",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info["machine"].items()),
        "",
        *([f"Note: {cfg.note}", ""] if cfg.note else []),
        "Median time of one training step (forward traces, loss, backward, AdamW). Ratio is "
        "nnsight / raw hooks: the median over rounds of the ratio within a round (both variants "
        "run back to back, so load from other jobs cancels), and in the last column the ratio of "
        "the fastest rounds. Targets: "
        "ratio <= 1.15 on the toy model, <= 1.05 at 25M parameters. `routed_skip` skips the "
        "frozen base's blocks up to the routed one, which raw hooks cannot do.",
        "",
        "| size | params | batch x seq | step | nnsight ms | raw hooks ms | ratio | ratio (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['params'] / 1e6:.2f}M | {row['batch']} x {row['seq_len']} "
            f"| {row['step']} | {row['nnsight_ms']} | {row['raw_hooks_ms']} | {row['ratio']} "
            f"| {row['ratio_of_minima']} |"
        )
    (cfg.out_dir / "step_graph.md").write_text("\n".join(lines) + "\n")


def main(cfg: Config) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    rows = [row for size in cfg.sizes for row in bench_size(cfg, size)]
    write_results(cfg, rows, time.perf_counter() - start)
    return rows


if __name__ == "__main__":
    main(simple_parsing.parse(Config, args=sys.argv[1:]))
