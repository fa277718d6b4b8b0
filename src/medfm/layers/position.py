"""Learned position tables on a 3D grid, resampled to whatever token grid the input gives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["resample_position_grid"]


def resample_position_grid(table: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a ``(B, C, D, H, W)`` table to spatial ``shape``, one axis direction at a time.

    First every axis that shrinks is brought down with area averaging (the others keep their size), then
    every axis that grows is brought up trilinearly (``align_corners=False``). Doing both in one call gives
    different numbers; this order is what SPAD/PUMIT does.
    """
    shape = tuple(int(n) for n in shape)
    current = tuple(table.shape[2:])
    if current == shape:
        return table
    down = tuple(min(c, s) for c, s in zip(current, shape))
    if down != current:
        table = F.interpolate(table, size=down, mode="area")
    if down != shape:
        table = F.interpolate(table, size=shape, mode="trilinear", align_corners=False)
    return table
