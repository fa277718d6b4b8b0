"""The anisotropy level of a voxel grid (the SPAD rule, Luo et al., arXiv 2312.07630, spec §0).

``aniso_d`` counts how many of a stride-``P`` network's 2x downsamplings act in-plane only before they act on
all three axes. Spacing-adaptive layers use it, and so do the samplers that batch volumes of one level
together, which is why it lives here rather than in a family's folder.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TWO_D_ANISO_D", "aniso_d_from_spacing", "grid_anisotropy"]

#: ``aniso_d`` of a 2D image (z-spacing 1e8): every downsampling of a 16-stride network is in-plane.
TWO_D_ANISO_D = 5


def aniso_d_from_spacing(spacing: torch.Tensor | list | tuple, max_stride: int = 16) -> int:
    """The SPAD anisotropy level of a batch: ``floor(log2(floor(clip(sz / min(sy, sx), 1, 2 * max_stride))))``.

    Args:
        spacing: ``(3,)`` or ``(B, 3)`` voxel spacing ``(z, y, x)`` in mm.
        max_stride: The network's total stride ``P`` (16 for SPAD-ViT and SPAD-VT).

    Raises:
        ValueError: Wrong shape, non-positive spacing, or samples with different levels (a batch must
            share one; group samples by level, as upstream's sampler does).
    """
    if isinstance(spacing, torch.Tensor):
        values = spacing.detach().to("cpu", torch.float64).reshape(-1, 3)
    else:
        values = torch.as_tensor(spacing, dtype=torch.float64).reshape(-1, 3)
    if values.numel() == 0 or bool((values <= 0).any()) or not bool(torch.isfinite(values).all()):
        raise ValueError(f"spacing must be finite and positive (z, y, x) mm; got {values.tolist()}")
    ratio = (values[:, 0] / values[:, 1:].min(dim=1).values).clamp(1.0, 2.0 * max_stride)
    levels = {math.floor(r).bit_length() - 1 for r in ratio.tolist()}
    if len(levels) > 1:
        raise ValueError(
            f"samples of one batch have different anisotropy levels {sorted(levels)} (spacing {values.tolist()}); "
            "batch volumes of the same spacing class together"
        )
    return levels.pop()


def grid_anisotropy(depth: int, spacing: torch.Tensor | list | tuple, max_stride: int = 16) -> int:
    """The anisotropy level of a grid ``depth`` slices deep: a single slice is a 2D image, level
    :data:`TWO_D_ANISO_D`, whatever its slice thickness (spec: 2D images get z-spacing 1e8); otherwise
    :func:`aniso_d_from_spacing`."""
    return TWO_D_ANISO_D if int(depth) == 1 else aniso_d_from_spacing(spacing, max_stride=max_stride)
