"""Sparse-autoencoder latents: tokens where enough forget-specific latents fire.

ALGORITHMS.md section 4.4. The reference loaded EleutherAI `sparsify.SparseCoder`s trained
elsewhere, with a hand-made latent list. Neither EleutherAI's sparsify nor SAELens is a dependency:
the local package index (/opt/pypi) has neither, and although pip here does reach pypi.org
(`pip download --no-deps eai-sparsify` fetches eai-sparsify 1.3.3, `sae-lens` fetches 6.54.12),
SAELens pins transformer-lens < 4 (this project needs >= 4.3) and eai-sparsify would add
accelerate, schedulefree and natsort for a few dozen lines of model. So `TopKSAE` is a small TopK
sparse autoencoder in plain torch following sparsify's design (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"): latents = TopK(ReLU(W_enc (x − b_dec) + b_enc)), reconstruction
x̂ = W_dec latents + b_dec with unit-norm decoder rows (renormalized after every step, the
gradient component parallel to each row removed before it), loss = the fraction of variance
unexplained (MSE over the variance), Adam with sparsify's learning-rate rule
2e-4 / sqrt(n_latents / 2^14), b_dec started at the data mean (sparsify: the geometric median).
sparsify's AuxK loss for dead latents is left out; the share of latents that never fire is
reported instead.

It is trained on block `layer`'s output over forget and retain tokens (BOS left out). A latent's
firing rate is the share of tokens of a class where it is among the active top k; the latents most
specific to forget text are those with the largest share of firing on forget tokens,
rate_f / (rate_f + rate_r), among latents firing on at least `min_rate` of forget tokens (ties:
the more frequent first). The `n_latents` most specific are chosen, and a forget token is marked
when at least `min_active` of them fire on it.

The defaults were chosen on the documents of the forget dev entities (`benchmarks/token_selection.py
--tune`), never on test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearn.selection.base import (
    Selection,
    SelectionInputs,
    selectable,
    single_threaded,
    site_activations,
    unflatten,
)


@dataclass(frozen=True)
class SaeSettings:
    """A TopK sparse autoencoder and the forget-specific latents it marks tokens with."""

    layer: int = -1
    """Block whose output is read (negative counts from the end)."""
    expansion_factor: int = 8
    """Latents per residual dimension."""
    k: int = 16
    """Active latents per token (TopK)."""
    num_steps: int = 2000
    """Adam steps."""
    batch_tokens: int = 1024
    """Tokens per step."""
    lr: float | None = None
    """Learning rate (None: sparsify's 2e-4 / sqrt(n_latents / 2^14))."""
    n_latents: int = 64
    """Forget-specific latents chosen."""
    min_active: int = 3
    """A forget token is marked when at least this many chosen latents fire on it."""
    min_rate: float = 0.001
    """A latent must fire on at least this share of forget tokens to be chosen."""
    seed: int = 0
    """Seed of the initialization and the token order."""

    def __post_init__(self) -> None:
        small = {
            name: getattr(self, name)
            for name in ("expansion_factor", "k", "num_steps", "batch_tokens", "n_latents")
            if getattr(self, name) < 1
        }
        if small:
            raise ValueError(f"these settings must be >= 1: {small}")
        if not 1 <= self.min_active <= min(self.k, self.n_latents):
            raise ValueError(
                f"--min_active must be in 1..min(k, n_latents) = {min(self.k, self.n_latents)}, "
                f"got {self.min_active}"
            )
        if not 0 <= self.min_rate < 1 or (self.lr is not None and not self.lr > 0):
            raise ValueError(
                f"need 0 <= --min_rate < 1 and --lr > 0, got {self.min_rate}, {self.lr}"
            )


class TopKSAE(nn.Module):
    """sparsify's `SparseCoder`, reduced to what selection needs."""

    def __init__(self, d_in: int, n_latents: int, k: int) -> None:
        """Random encoder, decoder rows = the encoder's rows normalized, zero biases."""
        super().__init__()
        if k > n_latents:
            raise ValueError(f"k ({k}) cannot exceed the number of latents ({n_latents})")
        self.k = k
        self.encoder = nn.Linear(d_in, n_latents)
        with torch.no_grad():
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.set_decoder_norm_to_unit_norm()

    def encode(
        self, x: Float[Tensor, "token d_model"]
    ) -> tuple[Float[Tensor, "token k"], Int[Tensor, "token k"]]:
        """The top k latent activations and their indices."""
        pre = torch.relu(self.encoder(x - self.b_dec))
        return pre.topk(self.k, dim=-1, sorted=False)

    def decode(
        self, acts: Float[Tensor, "token k"], indices: Int[Tensor, "token k"]
    ) -> Float[Tensor, "token d_model"]:
        """The reconstruction from the active latents."""
        # Dense latents times the decoder: on a CPU faster than gathering k decoder rows a token.
        dense = torch.zeros(len(acts), self.W_dec.shape[0], dtype=acts.dtype, device=acts.device)
        return dense.scatter(1, indices, acts) @ self.W_dec + self.b_dec

    def fvu(self, x: Float[Tensor, "token d_model"]) -> Float[Tensor, ""]:
        """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean x‖²."""
        recon = self.decode(*self.encode(x))
        return (x - recon).square().sum() / (x - x.mean(0)).square().sum()

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Give every decoder row unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo().eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Drop the part of each decoder row's gradient along the row (it only changes its norm)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec


def train_sae(acts: Float[Tensor, "token d_model"], settings: SaeSettings) -> tuple[TopKSAE, dict]:
    """Train a TopK SAE on activations (a tenth held out for the reported FVU).

    Raises:
        ValueError: Fewer than 20 tokens to train on.
    """
    if len(acts) < 20:
        raise ValueError(f"an SAE needs at least 20 tokens to train on, got {len(acts)}")
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(acts), generator=generator)
    n_heldout = max(1, len(acts) // 10)
    heldout, train = acts[order[:n_heldout]], acts[order[n_heldout:]]
    n_latents = settings.expansion_factor * acts.shape[1]
    with torch.random.fork_rng(devices=[]):  # seeded init, the caller's random state untouched
        torch.manual_seed(settings.seed)
        sae = TopKSAE(acts.shape[1], n_latents, settings.k)
    with torch.no_grad():
        sae.b_dec.copy_(train.mean(0))
    lr = settings.lr or 2e-4 / math.sqrt(n_latents / 2**14)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    with torch.enable_grad(), single_threaded():
        for step in tqdm(range(settings.num_steps), desc="sae", dynamic_ncols=True, leave=False):
            # Full batches only, wrapping around the end (FVU needs more than one token).
            start = step * settings.batch_tokens
            batch = train[torch.arange(start, start + settings.batch_tokens) % len(train)]
            loss = sae.fvu(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        heldout_fvu = float(sae.fvu(heldout))
    return sae.eval().requires_grad_(False), {"heldout_fvu": heldout_fvu, "lr": lr}


class Firing(NamedTuple):
    """Which latents fire on each token: the top k indices, and whether each is positive."""

    indices: Int[Tensor, "token k"]
    """The top k latents of every token."""
    fired: Bool[Tensor, "token k"]
    """Whether each of them has a positive activation."""

    def rates(self, n_latents: int) -> Float[Tensor, " latent"]:
        """Per latent, the share of tokens it fires on."""
        counts = torch.bincount(self.indices[self.fired], minlength=n_latents)
        return counts.float() / max(len(self.indices), 1)

    def counts(self, latents: Int[Tensor, " latent"]) -> Int[Tensor, " token"]:
        """Per token, how many of `latents` fire on it."""
        return (torch.isin(self.indices, latents) & self.fired).sum(1)


def firing(sae: TopKSAE, acts: Float[Tensor, "token d_model"], chunk: int = 8192) -> Firing:
    """The latents firing on every token."""
    indices, fired = [], []
    with torch.no_grad():
        for start in range(0, len(acts), chunk):
            values, top = sae.encode(acts[start : start + chunk])
            indices.append(top)
            fired.append(values > 0)
    return Firing(torch.cat(indices), torch.cat(fired))


def choose_latents(
    rate_f: Float[Tensor, " latent"],
    rate_r: Float[Tensor, " latent"],
    n_latents: int,
    min_rate: float,
) -> tuple[Int[Tensor, " latent"], dict]:
    """The `n_latents` latents with the largest share of their firing on forget tokens.

    Args:
        rate_f: Per latent, the share of forget tokens it fires on.
        rate_r: The same on retain tokens.
        n_latents: How many to choose.
        min_rate: Latents firing on fewer forget tokens than this are never chosen.

    Raises:
        ValueError: No latent fires often enough on forget tokens.
    """
    share = rate_f / (rate_f + rate_r).clamp_min(1e-12)
    eligible = rate_f >= max(min_rate, 1e-12)
    # Largest share first, then the more frequent: sort by frequency, then stably by share.
    by_rate = torch.sort(rate_f, descending=True, stable=True).indices
    order = by_rate[torch.sort(share[by_rate], descending=True, stable=True).indices]
    chosen = order[eligible[order]][:n_latents]
    if len(chosen) == 0:
        raise ValueError(
            f"no SAE latent fires on at least {min_rate} of forget tokens: lower --min_rate"
        )
    info = {
        "latents": chosen.tolist(),
        "forget_rate": rate_f[chosen].tolist(),
        "retain_rate": rate_r[chosen].tolist(),
        "dead_latent_share": float(((rate_f + rate_r) == 0).float().mean()),
    }
    return chosen, info


def sae_firing(settings: SaeSettings, inputs: SelectionInputs) -> tuple[Firing, Firing, dict]:
    """Train the SAE and read which latents fire where.

    Returns:
        The firing on every forget token, on every retain token but the BOS, and what training
        measured.
    """
    allowed = {"forget": selectable(inputs.forget), "retain": selectable(inputs.retain)}
    acts = {
        name: site_activations(inputs.model, docs, settings.layer, inputs.batch_size, desc=name)
        for name, docs in (("forget", inputs.forget), ("retain", inputs.retain))
    }
    sae, info = train_sae(
        torch.cat([acts["forget"][allowed["forget"]], acts["retain"][allowed["retain"]]]),
        settings,
    )
    info["n_latents_total"] = sae.encoder.out_features
    return firing(sae, acts["forget"]), firing(sae, acts["retain"][allowed["retain"]]), info


def sae_counts(
    forget: Firing,
    retain: Firing,
    allowed: Bool[Tensor, " token"],
    n_total: int,
    n_latents: int,
    min_rate: float,
) -> tuple[Int[Tensor, " token"], dict]:
    """Per forget token, how many of the chosen forget-specific latents fire, and the choice."""
    rate_f = Firing(forget.indices[allowed], forget.fired[allowed]).rates(n_total)
    latents, info = choose_latents(rate_f, retain.rates(n_total), n_latents, min_rate)
    return forget.counts(latents), info


def select(settings: SaeSettings, inputs: SelectionInputs) -> Selection:
    """Mark forget tokens where at least `min_active` forget-specific latents fire."""
    forget, retain, info = sae_firing(settings, inputs)
    allowed = selectable(inputs.forget)
    counts, chosen = sae_counts(
        forget, retain, allowed, info["n_latents_total"], settings.n_latents, settings.min_rate
    )
    info |= chosen
    keep = (counts >= settings.min_active) & allowed
    return Selection(unflatten(keep, [len(row) for row in inputs.forget.ids]), info)
