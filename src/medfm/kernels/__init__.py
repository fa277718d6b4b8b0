"""Triton kernels for 3D token sequences (optional: ``pip install "medfm[triton]"``)."""

from .rope3d import grid_positions, rope3d, rope3d_reference, triton_available

__all__ = ["grid_positions", "rope3d", "rope3d_reference", "triton_available"]
