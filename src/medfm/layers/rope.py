"""Rotary position embedding on 3D token grids (EVA-02 style, interleaved channel pairs).

The angle of a token at integer grid position ``(d, h, w)`` is ``d * w_depth + concat(h * w_height,
w * w_width)``: the depth term is added to both halves. Positions count tokens, not millimetres.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import nn

from ..kernels import rope3d_qk, triton_available
from ..kernels.rope_math import (
    grid_token_positions,
    packed_token_positions,
    rope_angles,
    rotate_pairs,
    rotation_tables,
)

__all__ = ["FUSED_ROPE_ENV", "Rope3D", "TokenRotation", "apply_interleaved_rope", "packed_token_positions"]

FUSED_ROPE_ENV = "MEDFM_FUSED_ROPE"


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
        return rope_angles(grid_token_positions(grid, self.rescale_shape, device), *self.frequencies(device))

    def rotation(
        self, grids: Sequence[Sequence[int]], cls_tokens: int = 1, device: torch.device | None = None
    ) -> TokenRotation:
        """The :class:`TokenRotation` of one or more token grids, each preceded by ``cls_tokens`` unrotated
        tokens (one grid: an ordinary sequence; several: a packed stream, each grid with its own positions)."""
        positions = packed_token_positions(grids, cls_tokens, self.rescale_shape, device)
        return TokenRotation(positions, *self.frequencies(device))

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
    return rotate_pairs(x, cos, sin)


def _fused_rope_wanted(x: torch.Tensor) -> bool:
    """``MEDFM_FUSED_ROPE``: ``auto`` (default; the Triton kernel for CUDA tensors when Triton is installed),
    ``1`` (always: CPU tensors need ``TRITON_INTERPRET=1``) or ``0`` (never)."""
    choice = os.environ.get(FUSED_ROPE_ENV, "auto").strip().lower()
    if choice in ("1", "true", "on"):
        return True
    if choice in ("0", "false", "off"):
        return False
    if choice != "auto":
        raise ValueError(f"{FUSED_ROPE_ENV} must be auto, 1 or 0; got {choice!r}")
    return x.is_cuda and triton_available()


class TokenRotation:
    """The rotary embedding of every token of a sequence (or packed stream), applied to queries and keys.

    Holds the tokens' ``(d, h, w)`` positions (negative depth: a token left unrotated, such as a cls token)
    and the frequencies, not per-token cos/sin tables. :meth:`rotate_pair` runs the fused Triton kernel on a
    GPU (see ``MEDFM_FUSED_ROPE``), which computes the angles in registers; elsewhere it rotates with cos/sin
    tables built once per forward pass and shared by every layer.

    Args:
        positions: ``(L, 3)`` shared by the batch, or ``(B, L, 3)`` per sample.
        freq_depth: ``(head_dim / 2,)``.
        freq_height, freq_width: ``(head_dim / 4,)`` each.
    """

    def __init__(
        self,
        positions: torch.Tensor,
        freq_depth: torch.Tensor,
        freq_height: torch.Tensor,
        freq_width: torch.Tensor,
    ):
        self.positions = positions
        self.frequencies = (freq_depth, freq_height, freq_width)

    def select(self, rows: torch.Tensor) -> TokenRotation:
        """The rotation of a subset of tokens: ``rows`` ``(B, V)`` indices gives per-sample ``(B, V, 3)``."""
        return TokenRotation(self.positions[rows], *self.frequencies)

    @cached_property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``(..., L, head_dim / 2)``, identity rows (cos 1, sin 0) for unrotated tokens."""
        return rotation_tables(self.positions, *self.frequencies)

    def rotate_pair(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate token-major ``query`` and ``key`` ``(B, L, heads, head_dim)``."""
        if _fused_rope_wanted(query):
            return rope3d_qk(query, key, self.positions, *self.frequencies)
        return self.rotate_eager(query), self.rotate_eager(key)

    def rotate_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate token-major ``x`` ``(B, L, heads, head_dim)`` with the cos/sin tables (plain PyTorch)."""
        cos, sin = self.tables
        return rotate_pairs(x, cos.unsqueeze(-2), sin.unsqueeze(-2))  # broadcast over heads
