"""What the Triton kernels share: availability, the interpreter check and device checks."""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["interpreting", "require_kernel_device", "triton_available"]


def triton_available() -> bool:
    """Whether Triton can be imported (``pip install "medfm[triton]"``)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_kernel_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error where a kernel cannot run: no Triton, or CPU tensors outside the interpreter."""
    if not triton_available():
        raise ImportError('the medfm kernels need Triton: pip install "medfm[triton]"')
    for tensor in tensors:
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                f"the medfm Triton kernels run on CUDA tensors (got one on {tensor.device}); set "
                "TRITON_INTERPRET=1 before importing triton to run them on CPU (slow: for tests)"
            )
