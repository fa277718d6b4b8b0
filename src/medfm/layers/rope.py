"""Rotary position embedding on 3D token grids (EVA-02 style, interleaved channel pairs).

The angle of a token at integer grid position ``(d, h, w)`` is ``d * w_depth + concat(h * w_height,
w * w_width)``: the depth term is added to both halves. Positions count tokens, not millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Rope3D", "apply_interleaved_rope"]


class Rope3D(nn.Module):
    """Angles for a ``(D', H', W')`` token grid, for heads of size ``head_dim``.

    Frequencies (``h2 = head_dim / 2``): depth ``base_d ** -((2i + 1) / h2)`` for ``i < h2 / 2``, the list
    repeated twice (length ``h2``); height and width ``base ** -(2i / h2)`` for ``i < h2 / 2``.

    Args:
        head_dim: Channels per head; a multiple of 4.
        bases: ``(depth, height, width)`` bases, e.g. ``(2333, 10000, 10000)`` for SPAD-ViT.
        rescale_shape: Per axis, ``R > 0`` maps index ``t`` of an axis of length ``n`` to ``t * R / n``;
            ``-1`` keeps integer indices.
    """

    def __init__(self, head_dim: int, bases: Sequence[float], rescale_shape: Sequence[int] = (-1, -1, -1)):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"3D RoPE needs head_dim divisible by 4; got {head_dim}")
        self.head_dim = head_dim
        self.bases = tuple(float(b) for b in bases)
        self.rescale_shape = tuple(int(r) for r in rescale_shape)

    def frequencies(
        self, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Depth ``(h2,)``, height ``(h2/2,)`` and width ``(h2/2,)`` frequencies.

        Computed on the fly (a few numbers) rather than kept as buffers, so they are always right whatever
        device or loading path built the module.
        """
        half = self.head_dim // 2
        quarter = torch.arange(half // 2, dtype=torch.float64)
        depth = self.bases[0] ** (-(2 * quarter + 1) / half)
        height = self.bases[1] ** (-(2 * quarter) / half)
        width = self.bases[2] ** (-(2 * quarter) / half)
        return tuple(
            f.to(device=device, dtype=torch.float32) for f in (torch.cat([depth, depth]), height, width)
        )

    def angles(self, grid: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """``(D'H'W', head_dim / 2)`` angles, tokens in ``(d, h, w)`` row-major order."""
        freq_depth, freq_height, freq_width = self.frequencies(device)
        axes = []
        for n, rescale in zip(grid, self.rescale_shape):
            index = torch.arange(n, device=device, dtype=torch.float32)
            axes.append(index * rescale / n if rescale > 0 else index)
        d, h, w = torch.meshgrid(*axes, indexing="ij")
        d, h, w = d.reshape(-1, 1), h.reshape(-1, 1), w.reshape(-1, 1)
        return d * freq_depth + torch.cat([h * freq_height, w * freq_width], dim=-1)

    def forward(
        self, grid: Sequence[int], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of :meth:`angles`."""
        theta = self.angles(grid, device)
        return theta.cos(), theta.sin()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2j, 2j+1)`` of ``x`` ``(B, heads, L, head_dim)`` by angle ``j``.

    ``cos``/``sin`` are ``(L, head_dim/2)`` or per sample ``(B, L, head_dim/2)``.
    """
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2)
