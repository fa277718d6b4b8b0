"""Position tables: learned 3D tables resampled to the token grid, and fixed sin-cos tables with an explicit
axis order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resample_position_grid", "sincos_1d_table", "sincos_position_table"]


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


def sincos_1d_table(
    positions: torch.Tensor | np.ndarray, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """``[sin(p w_k) | cos(p w_k)]`` with ``w_k = temperature ** (-k / (dim / 2))``, ``k < dim / 2``.

    The transformer encoding of Vaswani et al. (2017) with sines and cosines in two halves rather than
    interleaved, as MAE (He et al., CVPR 2022) lays it out. It is computed with numpy in float32, the
    arithmetic of the code MiM and VIS-MAE build their stored tables with (torch's float32 ``pow`` and ``sin``
    round differently in the last bit), so the values match those tables bit for bit.

    Args:
        positions: Any shape; flattened.
        dim: Output width; must be even.
        temperature: Base of the frequencies.

    Returns:
        ``(positions.numel(), dim)`` float32.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"a 1D sin-cos table needs a positive even width; got {dim}")
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = np.float32(1.0) / np.power(np.float32(temperature), omega)
    angles = np.outer(np.asarray(positions, dtype=np.float32).reshape(-1), omega)  # float32 (n, dim / 2)
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))


def sincos_position_table(
    grid_size: Sequence[int],
    dim: int,
    axis_order: Sequence[int] | None = None,
    temperature: float = 10000.0,
    cls_token: bool = False,
) -> torch.Tensor:
    """Fixed sin-cos position table over a 1D, 2D or 3D token grid, ``(L, dim)`` with ``L = prod(grid_size)``.

    Tokens are in raster order over ``grid_size`` (last axis fastest). The width is cut into ``n = len(grid)``
    equal chunks; chunk ``i`` is :func:`sincos_1d_table` of the coordinate along grid axis ``axis_order[i]``.
    The default order ``(0, 1, ..., n-1)`` gives the first chunk to the first (slowest) axis. Conventions:

    * MiM 3D (spec §1.2): ``axis_order=(0, 1, 2)``, thirds ``[D1 | D2 | D3]``.
    * MAE / VIS-MAE 2D (``get_2d_sincos_pos_embed``): ``axis_order=(1, 0)``; the first half encodes the
      column (width) coordinate, the second half the row. (MONAI's and HF ViTMAE's tables order the chunks
      differently, which is why neither is reused.)

    Args:
        grid_size: Tokens per spatial axis.
        dim: Table width; must be divisible by ``2 * len(grid_size)``.
        axis_order: Grid axis encoded by each channel chunk, a permutation of ``range(len(grid_size))``.
        temperature: Base of the frequencies.
        cls_token: Prepend one all-zero row for a class token (MAE's convention).

    Returns:
        ``(L, dim)``, or ``(1 + L, dim)`` with ``cls_token``, float32.

    Raises:
        ValueError: Bad grid, a width not divisible by ``2 * n``, or ``axis_order`` not a permutation.
    """
    grid = tuple(int(g) for g in grid_size)
    if not 1 <= len(grid) <= 3 or any(g < 1 for g in grid):
        raise ValueError(f"grid_size must hold 1 to 3 positive sizes; got {grid_size!r}")
    order = tuple(range(len(grid))) if axis_order is None else tuple(int(a) for a in axis_order)
    if sorted(order) != list(range(len(grid))):
        raise ValueError(f"axis_order must be a permutation of {tuple(range(len(grid)))}; got {axis_order!r}")
    if dim <= 0 or dim % (2 * len(grid)):
        raise ValueError(
            f"a {len(grid)}D sin-cos table needs a width divisible by {2 * len(grid)}; got {dim}"
        )
    coords = np.meshgrid(*[np.arange(g, dtype=np.float32) for g in grid], indexing="ij")
    chunk = dim // len(grid)
    table = torch.cat([sincos_1d_table(coords[axis], chunk, temperature) for axis in order], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table], dim=0)
    return table
