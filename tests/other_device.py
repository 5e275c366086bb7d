"""A second device on a CPU-only machine, strict the way CUDA is, for device-placement tests.

Inside `other_device()`, tensors "on the device" report ``device(type="meta")`` but hold real CPU
data (a wrapper tensor subclass), so models run, losses have values and optimizers step. Every
operator is checked as CUDA would check it:

- an operator that mixes device tensors with CPU tensors of one or more dimensions raises
  "Expected all tensors to be on the same device" (0-dim CPU tensors pass, as on CUDA; so do CPU
  index tensors, which CUDA's indexing accepts);
- a random operator that writes device tensors with a CPU generator raises, as
  ``torch.randint(..., generator=cpu_generator, device="cuda")`` does.

``x.to("meta")``, ``module.to("meta")`` and factory calls with ``device="meta"`` (or an existing
tensor's ``.device``) put data on the device; ``.cpu()``, ``.to("cpu")`` and ``.tolist()`` bring it
back (``tolist`` copies to the host, as on CUDA). So code that derives devices from the tensors it
meets runs here unchanged, and code that leaves a tensor, generator, map or lens on the CPU fails
as it would on a GPU. Plain PyTorch meta tensors (no data) would catch fewer mismatches (matmul
and random generators do not check) and cannot be read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
"""What tensors on the second device report as their device."""

_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default}
_COPY_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class OnDevice(torch.Tensor):
    """A tensor on the second device: reports `DEVICE`, keeps its data on the CPU in `data_`."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> OnDevice:  # noqa: D102
        tensor = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            layout=data.layout,
            device=DEVICE,
            requires_grad=data.requires_grad,
        )
        tensor.data_ = data
        return tensor

    def __repr__(self) -> str:  # noqa: D105
        return f"OnDevice({self.data_!r})"

    def tolist(self) -> Any:  # noqa: D102
        # Copies to the host, as on CUDA (torch refuses tolist on any tensor subclass).
        return self.data_.tolist()

    def __reduce_ex__(self, protocol: Any) -> Any:  # torch.save of a state on the device
        return (OnDevice, (self.data_,))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: D105
        raise RuntimeError(f"{func} met a second-device tensor outside other_device()")


def _is_device(device: Any) -> bool:
    if device is None or isinstance(device, int):
        return False
    return torch.device(device) == DEVICE


class _Checks(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        args, kwargs = tree_map(_empty_meta, (args, kwargs))
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        cpu = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
        to_device = _is_device(kwargs.get("device"))
        if on_device and cpu and func not in _COPY_OPS:
            if not (func in _INDEX_OPS and isinstance(args[0], OnDevice)):
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two "
                    f"devices, {DEVICE} and cpu! (in {func})"
                )
        generator = kwargs.get("generator")
        if generator is not None and (on_device or to_device) and generator.device != DEVICE:
            raise RuntimeError(
                f"Expected a '{DEVICE.type}' device type for generator but found "
                f"'{generator.device.type}' (in {func})"
            )
        if to_device:
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_data, args), **tree_map(_data, kwargs))
        if func is torch.ops.aten._local_scalar_dense.default:
            return out
        if func is torch.ops.aten.copy_.default:  # in place: the destination keeps its device
            return args[0]
        if func is torch.ops.aten._to_copy.default and "device" in kwargs and not to_device:
            return out  # .cpu() / .to("cpu")
        if not (on_device or to_device):
            return out
        return tree_map(_wrap, out)


def _data(x: Any) -> Any:
    return x.data_ if isinstance(x, OnDevice) else x


def _wrap(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice):
        return OnDevice(x)
    return x


def _empty_meta(x: Any) -> Any:
    """Plain meta tensors that C++ code made from a device tensor's options: only empty ones."""
    if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) and x.device == DEVICE:
        if x.numel():
            raise RuntimeError("a data-less meta tensor met a second-device tensor")
        return OnDevice(torch.empty(x.shape, dtype=x.dtype))
    return x


@contextlib.contextmanager
def other_device() -> Iterator[torch.device]:
    """Run the body with the second device available; yields the device to move things to."""
    with _Checks():
        yield DEVICE


def is_on_device(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives on the second device (with data)."""
    return isinstance(tensor, OnDevice)
