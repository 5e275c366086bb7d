"""Transformer probes from an early checkpoint's residual stream to the final model's.

ALGORITHMS.md section 3.6. For a probed layer l, a small transformer maps the block output h_l of a
teacher checkpoint (one still at chance on the forget domain) to the final model's h_l on the same
tokens: Linear(d_model → d_probe) → depth × pre-norm `nn.TransformerEncoderLayer` → Linear(d_probe →
d_model), with depth = max(1, round(depth_scale · (n_layers − l))), so a probe from a low layer,
which has more of the network above it to stand in for, gets more capacity. Probes are fitted by
masked MSE at `blocks.{l}.hook_resid_post` on both models (the reference fitted them on block inputs
and applied them to block outputs; here both are block outputs). `ProbeUnlearn`
(`unlearn.methods.probe_unlearn`) then decodes probe(h_l) through the final norm and unembedding.

Usage:
    >>> fit = train_probes(teacher_hf, model_hf, token_batches, layers=[0, 1, 2, 3], num_steps=300)
    >>> fit.mse  # {"probe": {layer: mse}, "identity": {layer: mse}} on held-out batches
    >>> save_probes(fit.probes, "probes");  probes = load_probes("probes")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from interventions import Read, StepGraph, describe_model
from unlearn.data import Batch

SITE = "blocks.{l}.hook_resid_post"
"""Where probes read and predict: the output of block l (Hugging Face `hidden_states[l + 1]`)."""


def probe_depth(layer: int, n_layers: int, depth_scale: float = 1.0) -> int:
    """Encoder layers of the probe at block `layer`.

    depth = max(1, round(depth_scale · (n_layers − layer))); the reference's rule was 32 − l for a
    32-layer model (depth_scale 1).
    """
    return max(1, round(depth_scale * (n_layers - layer)))


class TransformerProbe(nn.Module):
    """Linear down-projection, `depth` causal pre-norm encoder layers, linear up-projection.

    Attention is causal: the probe stands in for part of a causal LM, so its prediction at token t
    must not depend on tokens after t (otherwise unlearning through it would score information the
    model itself never has at t). Batches are right-padded (`unlearn.data.Batch`), so under the
    causal mask real tokens never attend to padding and an `attention_mask` changes nothing at real
    positions; it is accepted so that training can say which positions are padding explicitly,
    while a `interventions.Lens` translator call (activations only) gives the same real-token
    outputs. Dropout is 0: the probe is a frozen, deterministic decoder during unlearning.
    """

    def __init__(
        self, d_model: int, depth: int, d_probe: int = 64, n_heads: int = 4, d_ffn: int = 256
    ) -> None:
        """Create a randomly initialized probe for a residual stream of width `d_model`."""
        super().__init__()
        if depth < 1:
            raise ValueError(f"a probe needs depth >= 1, got {depth}")
        self.d_model, self.depth = d_model, depth
        self.d_probe, self.n_heads, self.d_ffn = d_probe, n_heads, d_ffn
        self.proj_in = nn.Linear(d_model, d_probe)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_probe,
                n_heads,
                d_ffn,
                dropout=0.0,
                activation="relu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(d_probe, d_model)

    def forward(
        self,
        acts: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Predict the final model's activations from the teacher's (causally)."""
        n_pos = acts.shape[-2]
        # True = may not attend: every later position.
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=acts.device).triu(1)
        padding = None if attention_mask is None else ~attention_mask.bool()
        x = self.proj_in(acts)
        for layer in self.layers:
            x = layer(x, src_mask=causal, src_key_padding_mask=padding, is_causal=True)
        return self.proj_out(x)

    def config(self) -> dict[str, int]:
        """The constructor arguments (saved next to the weights)."""
        return {
            "d_model": self.d_model,
            "depth": self.depth,
            "d_probe": self.d_probe,
            "n_heads": self.n_heads,
            "d_ffn": self.d_ffn,
        }


@dataclass
class ProbeFit:
    """Trained probes and how well they fit."""

    probes: dict[int, TransformerProbe]
    """Probe by block index."""
    mse: dict[str, dict[int, float]]
    """{"probe": {layer: mse}, "identity": {layer: mse}} on held-out tokens (mean over tokens and
    dimensions); the identity row is the MSE of using the teacher's activations unchanged."""
    losses: list[float]
    """Training MSE (mean over layers) at every step."""


def _masked_mse(
    pred: Float[Tensor, "batch pos d_model"],
    target: Float[Tensor, "batch pos d_model"],
    mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    keep = mask.bool()
    return (pred - target).square().mean(-1)[keep].mean()


def _read_pairs(
    teacher: nn.Module, model: nn.Module, batches: Sequence[Batch], layers: list[int]
) -> list[tuple[Tensor, Tensor]]:
    """(teacher acts, model acts), each [layer batch pos d_model], for every batch."""
    step = StepGraph(
        [
            Read("teacher_acts", SITE, layers=layers, model="teacher", grad=False),
            Read("model_acts", SITE, layers=layers, model="model", grad=False),
        ]
    ).compile({"teacher": teacher, "model": model})
    with torch.no_grad():
        outs = [step({"batch": batch}) for batch in batches]
    return [(out["teacher_acts"], out["model_acts"]) for out in outs]


def train_probes(
    teacher: nn.Module,
    model: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[int],
    *,
    num_steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    d_probe: int = 64,
    n_heads: int = 4,
    d_ffn: int = 256,
    depth_scale: float = 1.0,
    n_heldout: int = 1,
) -> ProbeFit:
    """Fit one probe per layer from the teacher's block outputs to the model's (both frozen).

    Both models' activations are read once and kept (they do not change; for a large model, pass
    only as many batches as fit in memory), then the probes are trained with AdamW on the masked
    MSE, all layers in one step (their parameters are disjoint, so this equals training each
    alone), cycling over all but the last `n_heldout` batches.

    Args:
        teacher: The early checkpoint (a Hugging Face causal LM).
        model: The final model, with the teacher's architecture and width.
        batches: Token batches (the last `n_heldout` are held out for the MSE report).
        layers: Block indices to probe.
        num_steps: Optimizer steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        d_probe: Width inside the probe.
        n_heads: Attention heads of the probe.
        d_ffn: Feed-forward width of the probe.
        depth_scale: Multiplies n_layers − layer in the depth rule (`probe_depth`).
        n_heldout: Batches held out for the MSE report.

    Returns:
        The probes (in eval mode, on the model's device), held-out MSE next to the identity map's,
        and the training curve.

    Raises:
        ValueError: A layer outside the model, no layers, or too few batches.
    """
    n_layers = describe_model(model).n_layers
    layers = list(layers)
    _check_probe_layers(layers, n_layers, len(batches), n_heldout)
    d_model = model.config.hidden_size
    device = next(model.parameters()).device
    probes = {
        layer: TransformerProbe(
            d_model, probe_depth(layer, n_layers, depth_scale), d_probe, n_heads, d_ffn
        ).to(device)
        for layer in layers
    }
    pairs = _read_pairs(teacher, model, batches, layers)
    n_train = len(pairs) - n_heldout
    masks = [b.attention_mask for b in batches]
    losses = _fit_probes(
        probes, layers, pairs[:n_train], masks[:n_train], num_steps, lr, weight_decay
    )
    mse = _heldout_mse(probes, layers, pairs[n_train:], masks[n_train:])
    return ProbeFit(probes, mse, losses)


def _check_probe_layers(layers: list[int], n_layers: int, n_batches: int, n_heldout: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if not layers or bad:
        raise ValueError(
            f"probe layers must be a non-empty subset of 0..{n_layers - 1}, got {layers}"
        )
    if n_batches <= n_heldout:
        raise ValueError(f"need more than {n_heldout} batches (the held-out ones), got {n_batches}")


def _fit_probes(
    probes: dict[int, TransformerProbe],
    layers: list[int],
    pairs: list[tuple[Tensor, Tensor]],
    masks: list[Tensor],
    num_steps: int,
    lr: float,
    weight_decay: float,
) -> list[float]:
    """Train every probe with AdamW on the masked MSE, cycling over the batches; the losses."""
    params = [p for probe in probes.values() for p in probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for probe in probes.values():
        probe.train()
    for i in tqdm(range(num_steps), desc="probes", dynamic_ncols=True):
        (source, target), mask = pairs[i % len(pairs)], masks[i % len(masks)]
        loss = torch.stack(
            [
                _masked_mse(probes[layer](source[j], mask), target[j], mask)
                for j, layer in enumerate(layers)
            ]
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _heldout_mse(
    probes: dict[int, TransformerProbe],
    layers: list[int],
    pairs: list[tuple[Tensor, Tensor]],
    masks: list[Tensor],
) -> dict[str, dict[int, float]]:
    """Freeze the probes (eval mode); mean MSE per layer of each probe and of the identity map."""
    errors: dict[str, dict[int, list[float]]] = {"probe": {}, "identity": {}}
    with torch.no_grad():
        for probe in probes.values():
            probe.eval().requires_grad_(False)
        for (source, target), mask in zip(pairs, masks, strict=True):
            for j, layer in enumerate(layers):
                predicted = probes[layer](source[j], mask)
                errors["probe"].setdefault(layer, []).append(
                    float(_masked_mse(predicted, target[j], mask))
                )
                errors["identity"].setdefault(layer, []).append(
                    float(_masked_mse(source[j], target[j], mask))
                )
    return {
        kind: {layer: sum(v) / len(v) for layer, v in per.items()} for kind, per in errors.items()
    }


def save_probes(probes: dict[int, TransformerProbe], path: str | os.PathLike[str]) -> Path:
    """Write `probes.safetensors` (keys `<layer>.<param>`) and `probes.json` into `path`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{layer}.{key}": value.detach().contiguous().cpu()
        for layer, probe in probes.items()
        for key, value in probe.state_dict().items()
    }
    save_file(tensors, out / "probes.safetensors")
    meta = {"site": SITE, "probes": {str(layer): p.config() for layer, p in probes.items()}}
    (out / "probes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_probes(path: str | os.PathLike[str]) -> dict[int, TransformerProbe]:
    """Load probes written by `save_probes` (in eval mode, frozen, on the CPU).

    Raises:
        FileNotFoundError: The directory holds no probes.
    """
    root = Path(path)
    if not (root / "probes.safetensors").exists() or not (root / "probes.json").exists():
        raise FileNotFoundError(
            f"no probes at {root} (expected probes.safetensors and probes.json); train them with "
            "python -m recipes.probe_unlearn or unlearn.probe.train_probes"
        )
    meta = json.loads((root / "probes.json").read_text())
    tensors = load_file(root / "probes.safetensors")
    probes = {}
    for key, config in meta["probes"].items():
        probe = TransformerProbe(**config)
        prefix = f"{key}."
        probe.load_state_dict(
            {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        )
        probes[int(key)] = probe.eval().requires_grad_(False)
    return probes
