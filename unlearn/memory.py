"""A memory model of one training run per device.

Weights, gradients, optimizer state, frozen companions and activations, for a model size, number
of processes, batch and sequence length.

Counted in bytes, fp32 weights (4 bytes a parameter; bfloat16 autocast keeps fp32 weights and
halves the activations). Per device, with N processes:

- trainable weights: all P parameters (DDP, one process), P / N (FSDP2), plus one gathered block
  at a time under FSDP2; LoRA: the frozen weights are the model's, the adapters are trained;
- gradients: as the trained weights (LoRA: the adapters');
- optimizer state: AdamW two moments per trained parameter; Muon one momentum per matrix entry
  (AdamW on the rest); sharded like the weights under FSDP2;
- companions: a frozen full copy of the model for each companion a method reads (the original
  for a retain term or routing: 1 under full fine-tuning, 0 under LoRA, whose original is the
  model with its adapters disabled), P / N each with `--shard_companions`;
- activations kept for the backward pass, for every row a device trains on (its share of the
  global batch, forget and retain rows both) through every block, after Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models"): 34 s h + 5 a s² bytes a row
  and block in 16-bit, so 68 s h + 10 a s² in fp32 (s tokens, h width, a heads; the a s² term
  only where attention keeps its probabilities, the eager implementation: PyTorch's fused
  attention keeps none), plus the logits (s V, and as much again for their gradient). s is the
  padded length of a batch (rows are padded to the batch's longest, not to `max_len`).

`benchmarks/parallel_memory.py` checks it against the peak of torch's allocations on the toy
world at 1 and 2 processes; docs/MEMORY.md tabulates it for a 6.9B model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a decoder-only transformer depends on."""

    n_params: int
    """Parameters."""
    n_layers: int
    """Blocks."""
    d_model: int
    """Residual width h."""
    n_heads: int
    """Attention heads a."""
    vocab: int
    """Vocabulary size V."""

    @classmethod
    def of(cls, model: object) -> ModelShape:
        """The shape of a Hugging Face model (its config and parameter count)."""
        config = model.config  # type: ignore[attr-defined]
        return cls(
            n_params=sum(p.numel() for p in model.parameters()),  # type: ignore[attr-defined]
            n_layers=config.num_hidden_layers,
            d_model=config.hidden_size,
            n_heads=config.num_attention_heads,
            vocab=config.vocab_size,
        )


PYTHIA_6_9B = ModelShape(
    n_params=6_857_302_016, n_layers=32, d_model=4096, n_heads=32, vocab=50_432
)
"""Pythia-6.9B (GPT-NeoX), the reference's model size."""


@dataclass(frozen=True)
class Estimate:
    """Bytes per device, by part."""

    weights: float
    gradients: float
    optimizer: float
    companions: float
    activations: float

    @property
    def total(self) -> float:
        """Every part together."""
        return sum(asdict(self).values())


def estimate(
    shape: ModelShape,
    *,
    rows: int,
    seq_len: float,
    world_size: int = 1,
    parallel: Literal["ddp", "fsdp"] = "ddp",
    companions: int = 1,
    shard_companions: bool = False,
    optimizer: Literal["adamw", "muon"] = "adamw",
    lora_params: int = 0,
    precision: Literal["float32", "bfloat16"] = "float32",
    logit_rows: int | None = None,
    eager_attention: bool = False,
) -> Estimate:
    """The memory of one device.

    Args:
        shape: The model.
        rows: Rows one optimizer step trains on, over every process (forget and retain together).
        seq_len: Tokens per row.
        world_size: Processes.
        parallel: "ddp" or "fsdp" (`OptimSettings.parallel`); ignored in one process.
        companions: Frozen full copies the method keeps (0 under LoRA, whose original is the
            model itself).
        shard_companions: Companions sharded under FSDP2.
        optimizer: AdamW (2 states a parameter) or Muon (1 for matrices, taken as all).
        lora_params: Trained adapter parameters (0: full fine-tuning).
        precision: bfloat16 autocast halves the activations.
        logit_rows: Rows whose logits are kept (default: all).
        eager_attention: Attention keeps its a s² probabilities per row and block.
    """
    sharded = world_size > 1 and parallel == "fsdp"
    share = 1 / world_size if sharded else 1.0
    p = shape.n_params
    trained = lora_params or p
    block = (p - 2 * shape.vocab * shape.d_model) / shape.n_layers
    if lora_params:
        weights = 4 * (p + lora_params)
    else:
        weights = 4 * (p * share + (block if sharded else 0.0))
    gradients = 4 * trained * (share if not lora_params else 1.0)
    states = 2 if optimizer == "adamw" else 1
    optim = 4 * states * trained * (share if not lora_params else 1.0)
    companion = 4 * p * companions * (1 / world_size if sharded and shard_companions else 1.0)
    per_device_rows = rows / world_size
    s, h, a = seq_len, shape.d_model, shape.n_heads
    per_row_block = 68 * s * h + (10 * a * s * s if eager_attention else 0)
    logits = (
        2
        * 4
        * s
        * shape.vocab
        * (per_device_rows if logit_rows is None else logit_rows / world_size)
    )
    activations = per_device_rows * shape.n_layers * per_row_block + logits
    if precision == "bfloat16":
        activations /= 2
    return Estimate(weights, gradients, optim, companion, activations)
