"""The plain PyTorch arithmetic of 3D RoPE, shared by the fused kernel's reference and :mod:`medfm.layers.rope`.

Token positions are ``(d, h, w)`` rows (negative depth: a token left unrotated, such as a cls token); the
angle of channel pair ``j`` is ``d * freq_depth[j] + concat(h * freq_height, w * freq_width)[j]``. Lives in
the bottom layer so that the kernels never import :mod:`medfm.layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["grid_token_positions", "packed_token_positions", "rope_angles", "rotate_pairs", "rotation_tables"]


def grid_token_positions(
    grid: Sequence[int], rescale_shape: Sequence[int], device: torch.device | None = None
) -> torch.Tensor:
    """``(D'H'W', 3)`` float ``(d, h, w)`` positions of a token grid; per axis, ``R > 0`` rescales index ``t``
    of ``n`` to ``t * R / n``."""
    axes = []
    for n, rescale in zip(grid, rescale_shape):
        index = torch.arange(n, device=device, dtype=torch.float32)
        axes.append(index * rescale / n if rescale > 0 else index)
    return torch.stack([axis.reshape(-1) for axis in torch.meshgrid(*axes, indexing="ij")], dim=-1)


def packed_token_positions(
    grids: Sequence[Sequence[int]],
    cls_tokens: int = 1,
    rescale_shape: Sequence[int] = (-1, -1, -1),
    device: torch.device | None = None,
) -> torch.Tensor:
    """``(total, 3)`` float positions of one or more token grids in a stream: per grid, ``cls_tokens`` rows of
    ``-1`` (left unrotated) then the grid's ``(d, h, w)`` in row-major order."""
    unrotated = torch.full((cls_tokens, 3), -1.0, device=device)
    rows = [part for grid in grids for part in (unrotated, grid_token_positions(grid, rescale_shape, device))]
    return torch.cat(rows)


def rope_angles(
    positions: torch.Tensor, freq_depth: torch.Tensor, freq_height: torch.Tensor, freq_width: torch.Tensor
) -> torch.Tensor:
    """``(..., head_dim / 2)`` angles of ``positions`` ``(..., 3)``."""
    d, h, w = positions[..., 0:1], positions[..., 1:2], positions[..., 2:3]
    return d * freq_depth + torch.cat([h * freq_height, w * freq_width], dim=-1)


def rotation_tables(
    positions: torch.Tensor, freq_depth: torch.Tensor, freq_height: torch.Tensor, freq_width: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``(..., L, head_dim / 2)``, identity rows (cos 1, sin 0) for unrotated tokens."""
    theta = rope_angles(positions, freq_depth, freq_height, freq_width)
    keep = positions[..., :1] < 0
    return theta.cos().masked_fill(keep, 1.0), theta.sin().masked_fill(keep, 0.0)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2j, 2j+1)`` of ``x`` by the angle whose ``cos``/``sin`` are given (broadcast)."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
