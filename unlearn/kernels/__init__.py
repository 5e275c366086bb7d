"""Fused kernels for hot loss terms, each behind a dispatcher that falls back to PyTorch.

`orthogonality_loss_fused` is the orthogonal circuit breakers' within-batch orthogonality loss, with
a Triton pooling kernel on CUDA (`unlearn.kernels.orth_loss`). Importing this package never imports
triton; install it with `pip install -e .[triton]` to use the kernels.
"""

from unlearn.kernels.orth_loss import Backend, orthogonality_loss_fused, triton_available

__all__ = ["Backend", "orthogonality_loss_fused", "triton_available"]
