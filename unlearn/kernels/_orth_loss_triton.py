"""Triton kernels of the fused orthogonality loss: masked mean-pool forward, broadcast backward.

Imported only by `unlearn.kernels.orth_loss` when the Triton backend runs, because importing this
module imports triton. `@triton.jit` reads `TRITON_INTERPRET` when this module is imported, so on a
CPU the variable must be set to 1 before the first import (`IS_INTERPRETED` records which it was).

- `masked_mean_pool`: one launch for every layer, grid (layer * batch, d_model blocks); each program
  loops over the positions of its sequence, accumulates sum_s w_bs h_lbs in fp32 (fp64 for fp64
  inputs) and writes p_lb = that sum * inv_count_b.
- `broadcast_pool_grad`: grid (layer * batch, pos blocks, d_model blocks); writes
  dL/dh_lbs = w_bs inv_count_b g_lb in the activations' dtype, reading only the [layer batch
  d_model] pooled gradient, so nothing larger than [batch d_model] per layer is materialized besides
  the gradient itself.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""

_BLOCK_S = 32
_BLOCK_D = 128


@triton.jit
def _pool_kernel(
    acts_ptr,
    weights_ptr,
    inv_count_ptr,
    pooled_ptr,
    batch_size,
    seq_len,
    d_model,
    stride_al,
    stride_ab,
    stride_as,
    stride_ad,
    stride_wb,
    stride_ws,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    layer_batch = tl.program_id(0)
    d_block = tl.program_id(1)
    layer = layer_batch // batch_size
    batch = layer_batch % batch_size
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d_model
    acc_dtype = pooled_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_D], dtype=acc_dtype)
    base = acts_ptr + layer.to(tl.int64) * stride_al + batch.to(tl.int64) * stride_ab
    for s0 in range(0, seq_len, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_s = offs_s < seq_len
        w = tl.load(weights_ptr + batch * stride_wb + offs_s * stride_ws, mask=in_s, other=0.0)
        tile = tl.load(
            base + offs_s[:, None].to(tl.int64) * stride_as + offs_d[None, :] * stride_ad,
            mask=in_s[:, None] & in_d[None, :],
            other=0.0,
        ).to(acc_dtype)
        acc += tl.sum(tile * w.to(acc_dtype)[:, None], axis=0)
    inv_count = tl.load(inv_count_ptr + batch).to(acc_dtype)
    out = pooled_ptr + layer_batch * d_model + offs_d
    tl.store(out, acc * inv_count, mask=in_d)


@triton.jit
def _broadcast_grad_kernel(
    grad_pooled_ptr,
    weights_ptr,
    inv_count_ptr,
    grad_acts_ptr,
    batch_size,
    seq_len,
    d_model,
    stride_wb,
    stride_ws,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    layer_batch = tl.program_id(0)
    s_block = tl.program_id(1)
    d_block = tl.program_id(2)
    batch = layer_batch % batch_size
    offs_s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_s = offs_s < seq_len
    in_d = offs_d < d_model
    acc_dtype = grad_pooled_ptr.dtype.element_ty
    grad = tl.load(grad_pooled_ptr + layer_batch * d_model + offs_d, mask=in_d, other=0.0)
    w = tl.load(weights_ptr + batch * stride_wb + offs_s * stride_ws, mask=in_s, other=0.0)
    scale = w.to(acc_dtype) * tl.load(inv_count_ptr + batch).to(acc_dtype)
    tile = scale[:, None] * grad[None, :]
    # grad_acts is a fresh contiguous [layer batch pos d_model] tensor.
    row = layer_batch.to(tl.int64) * seq_len + offs_s[:, None].to(tl.int64)
    out = grad_acts_ptr + row * d_model + offs_d[None, :]
    tl.store(out, tile.to(grad_acts_ptr.dtype.element_ty), mask=in_s[:, None] & in_d[None, :])


def masked_mean_pool(acts: Tensor, weights: Tensor, inv_count: Tensor) -> Tensor:
    """Pool [layer batch pos d_model] activations to [layer batch d_model] in one launch.

    Args:
        acts: Activations, any strides, any float dtype.
        weights: [batch pos] mask weights in the accumulation dtype.
        inv_count: [batch] 1 / max(1, sum_s w_bs) in the accumulation dtype.

    Returns:
        sum_s w_bs h_lbs * inv_count_b, contiguous, in the accumulation dtype.
    """
    num_layers, batch_size, seq_len, d_model = acts.shape
    pooled = torch.empty((num_layers, batch_size, d_model), dtype=weights.dtype, device=acts.device)
    grid = (num_layers * batch_size, triton.cdiv(d_model, _BLOCK_D))
    _pool_kernel[grid](
        acts,
        weights,
        inv_count,
        pooled,
        batch_size,
        seq_len,
        d_model,
        *acts.stride(),
        *weights.stride(),
        BLOCK_S=_BLOCK_S,
        BLOCK_D=_BLOCK_D,
    )
    return pooled


def broadcast_pool_grad(
    grad_pooled: Tensor, weights: Tensor, inv_count: Tensor, seq_len: int, dtype: torch.dtype
) -> Tensor:
    """Gradient of `masked_mean_pool` w.r.t. the activations: w_bs inv_count_b g_lb at (l, b, s).

    Args:
        grad_pooled: [layer batch d_model] gradient of the pooled tensor, accumulation dtype.
        weights: [batch pos] mask weights in the accumulation dtype.
        inv_count: [batch] 1 / max(1, sum_s w_bs) in the accumulation dtype.
        seq_len: Number of positions.
        dtype: The activations' dtype, which the gradient takes.

    Returns:
        The contiguous [layer batch pos d_model] gradient.
    """
    grad_pooled = grad_pooled.contiguous()
    num_layers, batch_size, d_model = grad_pooled.shape
    grad_acts = torch.empty(
        (num_layers, batch_size, seq_len, d_model), dtype=dtype, device=grad_pooled.device
    )
    grid = (
        num_layers * batch_size,
        triton.cdiv(seq_len, _BLOCK_S),
        triton.cdiv(d_model, _BLOCK_D),
    )
    _broadcast_grad_kernel[grid](
        grad_pooled,
        weights,
        inv_count,
        grad_acts,
        batch_size,
        seq_len,
        d_model,
        *weights.stride(),
        BLOCK_S=_BLOCK_S,
        BLOCK_D=_BLOCK_D,
    )
    return grad_acts
