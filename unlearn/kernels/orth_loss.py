"""Fused orthogonality loss: a Triton masked mean-pool with a Triton backward, and its dispatcher.

`orthogonality_loss_fused(acts, mask)` computes exactly `unlearn.losses.orthogonality_loss`
(`ALGORITHMS.md` section 3.1) and is what the circuit-breakers "orth" term calls. On CUDA tensors it
runs the Triton path, elsewhere the PyTorch reference; `backend="triton"` or `"torch"` forces one::

    loss = orthogonality_loss_fused(acts, forget_mask)                    # auto
    loss = orthogonality_loss_fused(acts, forget_mask, backend="torch")   # the reference

How the Triton path splits the work. Almost all of the bytes are in the [layer batch pos d_model]
activations, and the loss only sees them through the pooled [layer batch d_model] tensor, so:

- `MaskedMeanPool` (a `torch.autograd.Function`) pools every layer in one Triton launch, reading
  each activation once and accumulating in fp32 (fp64 for fp64 inputs). Its backward is a second
  Triton kernel that writes dL/dh_lbs = m_bs / max(1, n_b) * g_lb straight into the gradient, so no
  intermediate larger than [batch d_model] per layer exists besides the gradient itself.
- The tiny [layer batch d_model] -> scalar part (normalize, cosine Gram, off-diagonal ReLU, sum,
  scaling) is plain PyTorch in the accumulation dtype, with ordinary autograd giving g_lb. It costs
  O(layer batch^2 d_model) on a tensor `pos` times smaller than the input, so a kernel would save
  nothing measurable, and keeping it in torch keeps the reference's exact conventions (eps, the
  clamped pair count, ReLU'(0) = 0, the zero-norm gradient of an empty sequence) for free.

Importing this module does not import triton; the first Triton call does. On a CPU the Triton path
needs Triton's interpreter (`TRITON_INTERPRET=1` set before triton is first imported; about 10^4
times slower, for tests only).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from unlearn.losses import TokenMask, orthogonality_loss

__all__ = ["Backend", "MaskedMeanPool", "orthogonality_loss_fused", "triton_available"]

Backend = Literal["auto", "triton", "torch"]

_NORMALIZE_EPS = 1e-8  # unlearn.losses._NORMALIZE_EPS: the reference's p / (||p|| + 1e-8)
_INSTALL_HINT = "install it with `pip install -e .[triton]`"


def triton_available() -> bool:
    """Whether triton is installed, without importing it (a None in sys.modules blocks it)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def _triton_ops() -> Any:
    """Import the kernel module lazily, so that `import unlearn` never needs triton."""
    if not triton_available():
        raise ImportError(
            f"The Triton backend of the orthogonality loss needs triton: {_INSTALL_HINT}."
        )
    from unlearn.kernels import _orth_loss_triton

    return _orth_loss_triton


class MaskedMeanPool(torch.autograd.Function):
    """p_lb = sum_s w_bs h_lbs * inv_count_b with Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx: Any, acts: Tensor, weights: Tensor, inv_count: Tensor) -> Tensor:
        """Pool the activations; `weights` and `inv_count` are in the accumulation dtype."""
        ctx.save_for_backward(weights, inv_count)
        ctx.acts_shape = acts.shape
        ctx.acts_dtype = acts.dtype
        return _triton_ops().masked_mean_pool(acts, weights, inv_count)

    @staticmethod
    def backward(ctx: Any, grad_pooled: Tensor) -> tuple[Tensor | None, None, None]:
        """Broadcast the pooled gradient to every masked position."""
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weights, inv_count = ctx.saved_tensors
        grad_acts = _triton_ops().broadcast_pool_grad(
            grad_pooled.to(weights.dtype),
            weights,
            inv_count,
            seq_len=ctx.acts_shape[2],
            dtype=ctx.acts_dtype,
        )
        return grad_acts, None, None


def _orthogonality_loss_triton(
    acts: Float[Tensor, "layer batch pos d_model"], mask: TokenMask
) -> Float[Tensor, ""]:
    """The Triton path: fused pooling, then the reference's math on the pooled tensor."""
    num_layers, batch_size = acts.shape[0], acts.shape[1]
    acc_dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32
    weights = mask.to(acc_dtype)
    token_count = weights.sum(-1)
    inv_count = token_count.clamp_min(1.0).reciprocal()
    pooled = MaskedMeanPool.apply(acts, weights, inv_count)
    unit = pooled / (torch.linalg.vector_norm(pooled, dim=-1, keepdim=True) + _NORMALIZE_EPS)
    overlaps = unit @ unit.transpose(-1, -2)  # [layer batch batch]
    off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=acts.device)
    pair_sum = (overlaps.relu() * off_diagonal).sum()
    num_pairs = max(1, batch_size * (batch_size - 1))
    loss = pair_sum / (num_pairs * num_layers) * token_count.mean()
    return loss.to(acts.dtype)


def orthogonality_loss_fused(
    acts: Float[Tensor, "layer batch pos d_model"],
    mask: TokenMask,
    backend: Backend = "auto",
) -> Float[Tensor, ""]:
    """`unlearn.losses.orthogonality_loss` with a fused Triton pooling kernel where one can run.

    Same math, conventions and return dtype as the reference (see its docstring): the masked mean
    pool over positions, normalization, the off-diagonal ReLU of the cosine Gram, / (B(B-1)|L|) x
    the mean number of masked tokens. The Triton path accumulates in fp32 (fp64 for fp64 inputs),
    so on bf16/fp16 inputs it is more accurate than the reference, which works in the input dtype.

    Args:
        acts: Trained-model activations on a forget batch at the target layers.
        mask: Forget tokens to pool (attention mask, optionally AND a keyword mask).
        backend: "auto" runs Triton on CUDA tensors when triton is installed and the reference
            otherwise; "triton" forces the kernels (on a CPU only under `TRITON_INTERPRET=1`);
            "torch" forces the reference.

    Returns:
        The orthogonality loss.

    Raises:
        ImportError: `backend="triton"` and triton is not installed.
        RuntimeError: `backend="triton"` on CPU tensors without Triton's interpreter.
        ValueError: An unknown backend.
    """
    if backend == "auto":
        use_triton = acts.is_cuda and triton_available()
    elif backend == "triton":
        use_triton = True
    elif backend == "torch":
        use_triton = False
    else:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not use_triton:
        return orthogonality_loss(acts, mask)
    ops = _triton_ops()
    if not acts.is_cuda and not ops.IS_INTERPRETED:
        interpret_env = os.environ.get("TRITON_INTERPRET")
        raise RuntimeError(
            f"backend='triton' on {acts.device.type} tensors needs Triton's CPU interpreter: set "
            "TRITON_INTERPRET=1 before triton and unlearn.kernels are first imported (the kernels "
            f"were built with TRITON_INTERPRET={interpret_env!r}), or use backend='auto'/'torch'."
        )
    return _orthogonality_loss_triton(acts, mask)
