"""Affine maps between two models' activations: ridge regression and SVCCA, fitted by streaming.

`AffineStats` streams float64 sufficient statistics of a teacher's activations x and the model's y
(Σ x̃x̃ᵀ, Σ x̃yᵀ with x̃ = [x, 1], and Σ yyᵀ), so any number of tokens fits in O(d²) memory. From them
it fits a map y ≈ W x + b two ways:

- `solve`: ridge regression (the reference's fitter).
- `svcca`: SVCCA (Raghu et al. 2017): reduce each side to the top principal directions that hold a
  share of its variance, run CCA between the reduced sides, and predict y from x through the
  canonical pairs, y ≈ μ_y + P_y C_yy^½ V diag(ρ) Uᵀ C_xx^-½ P_xᵀ (x − μ_x); equivalently the
  least-squares regression of reduced y on reduced x, mapped back. It returns an `SvccaFit` (the
  map, canonical correlations and directions, kept dimensions).

Both are `AffineMap`s, so the method applies either unchanged. `fit_affine_maps` streams retain
batches through both models at one site per layer, fits on all but the held-out batches, and
reports the held-out MSE of each fitted map next to the identity map's. Maps are fitted and applied
at the same site (the reference fitted on block inputs and applied to block outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interventions import Execution, capture_acts
from unlearn.data import Batch


@dataclass
class AffineMap:
    """y = x @ weight.T + bias."""

    weight: Float[Tensor, "d_out d_in"]
    bias: Float[Tensor, " d_out"]

    def __call__(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Apply the map on the input's device, in its dtype."""
        weight = self.weight.to(device=x.device, dtype=x.dtype)
        return x @ weight.T + self.bias.to(device=x.device, dtype=x.dtype)

    def to(self, device: torch.device | str) -> AffineMap:
        """The map with its tensors on `device` (once, instead of at every call)."""
        return AffineMap(self.weight.to(device), self.bias.to(device))


class AffineStats:
    """Streamed sufficient statistics for maps y ≈ W x + b (ridge or SVCCA), in float64."""

    def __init__(self, d_in: int, d_out: int) -> None:
        """Empty statistics for inputs of width `d_in` and targets of width `d_out`."""
        self.xx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
        self.xy = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
        self.yy = torch.zeros(d_out, d_out, dtype=torch.float64)
        self.n = 0

    def update(self, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"]) -> None:
        """Add rows (tokens) to the statistics."""
        x1 = torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], dim=1).cpu()
        y64 = y.double().cpu()
        self.xx += x1.T @ x1
        self.xy += x1.T @ y64
        self.yy += y64.T @ y64
        self.n += len(x)

    def solve(self, ridge: float = 1e-3) -> AffineMap:
        """The ridge solution (the penalty, scaled by the mean input energy, spares the bias).

        Raises:
            ValueError: No rows were added.
        """
        if self.n == 0:
            raise ValueError("no activations were added; check that the batches have tokens")
        d = self.xx.shape[0] - 1
        scale = self.xx.diagonal()[:d].mean().clamp_min(1e-12)
        penalty = torch.zeros_like(self.xx)
        penalty.diagonal()[:d] = ridge * scale
        solution = torch.linalg.solve(self.xx + penalty, self.xy)  # [d_in + 1, d_out]
        return AffineMap(weight=solution[:d].T.float(), bias=solution[d].float())

    def svcca(self, variance: float = 0.99) -> SvccaFit:
        """The SVCCA map, keeping on each side the top directions that hold `variance` of it.

        Covariances are centred and normalized by n. Each side is reduced to its top-k principal
        directions P (k smallest with a cumulative variance share >= `variance`), then whitened by
        its reduced covariance C^-½ (diagonal in that basis); the SVD U diag(ρ) Vᵀ of the whitened
        cross-covariance gives the canonical correlations ρ. With `variance` 1.0 and full-rank data
        the map is ordinary least squares (`solve(ridge=0)`).

        Raises:
            ValueError: `variance` is outside (0, 1], no rows were added, or a side has no variance.
        """
        _check_variance(variance)
        if self.n == 0:
            raise ValueError("no activations were added; check that the batches have tokens")
        d = self.xx.shape[0] - 1
        mean_x, mean_y = self.xx[d, :d] / self.n, self.xy[d] / self.n
        cov_xx = self.xx[:d, :d] / self.n - torch.outer(mean_x, mean_x)
        cov_xy = self.xy[:d] / self.n - torch.outer(mean_x, mean_y)
        cov_yy = self.yy / self.n - torch.outer(mean_y, mean_y)
        basis_x, var_x = _principal_directions(cov_xx, variance, "inputs")
        basis_y, var_y = _principal_directions(cov_yy, variance, "targets")
        whiten_x = basis_x / var_x.sqrt()  # [d_in, k_x]: P_x C_xx^-½
        whiten_y = basis_y / var_y.sqrt()  # [d_out, k_y]: P_y C_yy^-½
        u, rho, vh = torch.linalg.svd(whiten_x.T @ cov_xy @ whiten_y, full_matrices=False)
        # E[v | u] = ρ u for canonical variates u, v; then y − μ_y = P_y C_yy^½ V v.
        weight = (basis_y * var_y.sqrt()) @ vh.T @ torch.diag(rho) @ u.T @ whiten_x.T
        return SvccaFit(
            map=AffineMap(weight=weight.float(), bias=(mean_y - weight @ mean_x).float()),
            correlations=rho,
            x_directions=whiten_x @ u,
            y_directions=whiten_y @ vh.T,
            dims_in=len(var_x),
            dims_out=len(var_y),
        )


def _check_variance(variance: float) -> None:
    if not 0.0 < variance <= 1.0:
        raise ValueError(
            f"svcca variance share must be in (0, 1] (the share of each side's variance its SVD "
            f"keeps; e.g. 0.99), got {variance}"
        )


_TAIL_SHARE = 1e-10
"""A variance tail holding less than this share counts as numerical zero (never whitened)."""


def _principal_directions(
    cov: Float[Tensor, "d d"], variance: float, side: str
) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """Top eigenvectors of `cov` holding `variance` of its trace, and their eigenvalues."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
    total = eigvals.sum()
    if total <= 0:
        raise ValueError(f"the {side} have no variance; SVCCA needs varying activations")
    share = eigvals.cumsum(0) / total
    k = min(int((share < variance - _TAIL_SHARE).sum()) + 1, len(eigvals))
    return eigvecs[:, :k], eigvals[:k]


@dataclass
class SvccaFit:
    """An SVCCA map and what it kept."""

    map: AffineMap
    """The map y ≈ W x + b through the canonical pairs."""
    correlations: Float[Tensor, " k"]
    """Canonical correlations, descending (k = min(dims_in, dims_out))."""
    x_directions: Float[Tensor, "d_in k"]
    """Canonical directions of the inputs: (x − μ_x) @ x_directions has identity covariance."""
    y_directions: Float[Tensor, "d_out k"]
    """Canonical directions of the targets, paired with `x_directions` column by column."""
    dims_in: int
    """Principal directions kept on the input (teacher) side."""
    dims_out: int
    """Principal directions kept on the target (model) side."""


@dataclass
class FittedMaps:
    """Maps fitted by `fit_affine_maps`, with their held-out errors."""

    affine: dict[int, AffineMap]
    """Ridge maps by layer."""
    svcca: dict[int, SvccaFit]
    """SVCCA fits by layer (empty unless asked for)."""
    mse: dict[str, dict[int, float]]
    """Held-out MSE by kind ("affine", "svcca" if fitted, "identity") and layer (mean over tokens
    and dimensions)."""


def _tokens(
    model: nn.Module, batch: Batch, site: str, layers: Sequence[int], remote: Execution
) -> list[Tensor]:
    acts = capture_acts(model, batch, site, layers=list(layers), remote=remote)
    mask = batch.attention_mask.bool()
    return [acts[site.format(l=layer)][mask] for layer in layers]


def fit_affine_maps(
    teacher: nn.Module,
    student: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[int],
    *,
    site: str = "blocks.{l}.hook_resid_post",
    ridge: float = 1e-3,
    svcca_variance: float | None = None,
    n_heldout: int = 1,
    remote: Execution = False,
) -> FittedMaps:
    """Fit teacher -> student maps per layer on all but the last `n_heldout` batches.

    Ridge maps are always fitted; SVCCA maps too when `svcca_variance` (the share of each side's
    variance to keep) is given. Only activations are read, so `remote` can run the reads elsewhere
    (the statistics are accumulated here).

    Raises:
        ValueError: Fewer batches than `n_heldout` + 1, or `svcca_variance` outside (0, 1].
    """
    if len(batches) <= n_heldout:
        raise ValueError(
            f"need more than {n_heldout} batches (the held-out ones), got {len(batches)}"
        )
    if svcca_variance is not None:
        _check_variance(svcca_variance)
    stats: dict[int, AffineStats] = {}
    with torch.no_grad():
        for batch in batches[: len(batches) - n_heldout]:
            for layer, x, y in zip(
                layers,
                _tokens(teacher, batch, site, layers, remote),
                _tokens(student, batch, site, layers, remote),
                strict=True,
            ):
                stats.setdefault(layer, AffineStats(x.shape[-1], y.shape[-1])).update(x, y)
        affine = {layer: s.solve(ridge) for layer, s in stats.items()}
        svcca = (
            {layer: s.svcca(svcca_variance) for layer, s in stats.items()}
            if svcca_variance is not None
            else {}
        )
        maps = {"affine": affine, "svcca": {layer: fit.map for layer, fit in svcca.items()}}
        kinds = [kind for kind in maps if maps[kind]]
        errors: dict[str, dict[int, list[float]]] = {kind: {} for kind in [*kinds, "identity"]}
        for batch in batches[len(batches) - n_heldout :]:
            for layer, x, y in zip(
                layers,
                _tokens(teacher, batch, site, layers, remote),
                _tokens(student, batch, site, layers, remote),
                strict=True,
            ):
                for kind in kinds:
                    errors[kind].setdefault(layer, []).append(
                        float(((maps[kind][layer](x) - y) ** 2).mean())
                    )
                errors["identity"].setdefault(layer, []).append(float(((x - y) ** 2).mean()))
    mse = {
        kind: {layer: sum(v) / len(v) for layer, v in per.items()} for kind, per in errors.items()
    }
    return FittedMaps(affine=affine, svcca=svcca, mse=mse)


def save_maps(maps: dict[int, AffineMap], path: str | Path) -> Path:
    """Write maps to `path/maps.safetensors` (keys `<layer>.weight`, `<layer>.bias`)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{layer}.{part}": getattr(m, part).contiguous()
        for layer, m in maps.items()
        for part in ("weight", "bias")
    }
    save_file(tensors, out / "maps.safetensors")
    return out


def load_maps(path: str | Path) -> dict[int, AffineMap]:
    """Read maps written by `save_maps`.

    Raises:
        FileNotFoundError: The directory holds no maps.
    """
    from safetensors.torch import load_file

    file = Path(path) / "maps.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"no maps at {file}; fit them with unlearn.maps.fit_affine_maps")
    tensors = load_file(file)
    layers = sorted({int(key.split(".")[0]) for key in tensors})
    return {
        layer: AffineMap(tensors[f"{layer}.weight"], tensors[f"{layer}.bias"]) for layer in layers
    }
