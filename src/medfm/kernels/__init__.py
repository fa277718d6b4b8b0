"""Triton kernels for 3D token sequences (optional: ``pip install "medfm[triton]"``).

* :func:`rope3d` / :func:`rope3d_qk`: fused 3D rotary position embedding, forward and backward.
* :func:`flash_attention_varlen`: flash attention over packed variable-length sequences, forward and backward.

Each has a plain PyTorch reference (:func:`rope3d_reference`, :func:`varlen_attention_reference`) it is tested
against. The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from ._triton import interpreting, triton_available
from .flash_varlen import flash_attention_varlen, varlen_attention_reference
from .rope3d import grid_positions, rope3d, rope3d_qk, rope3d_reference

__all__ = [
    "flash_attention_varlen",
    "grid_positions",
    "interpreting",
    "rope3d",
    "rope3d_qk",
    "rope3d_reference",
    "triton_available",
    "varlen_attention_reference",
]
