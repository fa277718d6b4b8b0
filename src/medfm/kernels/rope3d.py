"""Fused 3D rotary position embedding (Triton), forward and backward.

:func:`rope3d` rotates the channel pairs ``(2j, 2j+1)`` of every head of ``x`` ``(B, L, heads, head_dim)``
by ``theta_j = d * freq_depth[j] + (h * freq_height[j] if j < head_dim / 4 else w * freq_width[j - head_dim / 4])``,
computing the angles in the kernel from each token's grid position ``(d, h, w)`` (integers, or floats for a
rescaled RoPE): no per-token cos/sin table is built. One program handles one token: its angles are computed
once and rotate every head, of the queries and keys together with :func:`rope3d_qk`. A negative depth marks
a token left as it is (a cls token). Padded batches pass ``positions`` ``(L, 3)`` or ``(B, L, 3)``; packed
streams pass ``(total, 3)`` with each sequence's own grid positions.

The backward pass is the same kernel rotating by ``-theta`` (a rotation's inverse is its transpose). The
kernel needs Triton: on a GPU natively, on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
:func:`rope3d_reference` is the plain PyTorch definition it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from ._triton import require_kernel_device
from .rope_math import packed_token_positions, rotate_pairs, rotation_tables

__all__ = ["grid_positions", "rope3d", "rope3d_qk", "rope3d_reference"]


def grid_positions(grids: Sequence[Sequence[int]], cls_tokens: int = 1, device=None) -> torch.Tensor:
    """``(total, 3)`` integer positions of packed sequences: per grid, ``cls_tokens`` rows of ``-1`` then the
    grid's ``(d, h, w)`` in row-major order."""
    return packed_token_positions(grids, cls_tokens, device=device).to(torch.int32)


def rope3d_reference(
    x: torch.Tensor,
    positions: torch.Tensor,
    freq_depth: torch.Tensor,
    freq_height: torch.Tensor,
    freq_width: torch.Tensor,
) -> torch.Tensor:
    """The definition, in PyTorch (medfm's eager rotation): same arguments as :func:`rope3d`."""
    cos, sin = rotation_tables(positions.float(), freq_depth, freq_height, freq_width)
    return rotate_pairs(x, cos.unsqueeze(-2), sin.unsqueeze(-2))  # broadcast over heads


def _launch(x, y, positions, freq_depth, freq_in_plane, sign: float):
    """Rotate ``x`` (and ``y``, when not None, in the same launch) by ``sign * theta``."""
    import triton

    from ._rope3d_kernel import rope3d_kernel

    batch, tokens, heads, head_dim = x.shape
    x_out = torch.empty_like(x)
    y_out = torch.empty_like(y) if y is not None else x_out
    rope3d_kernel[(batch * tokens,)](
        x,
        y if y is not None else x,
        x_out,
        y_out,
        positions,
        freq_depth,
        freq_in_plane,
        tokens,
        heads,
        0 if positions.ndim == 2 else tokens * 3,
        HEAD_DIM=head_dim,
        QUARTER=head_dim // 4,
        BLOCK_HEADS=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        SIGN=sign,
        PAIR=y is not None,
    )
    return x_out if y is None else (x_out, y_out)


class _Rope3D(torch.autograd.Function):
    """Rotation of ``x`` (and ``y`` when given, in the same launch); the backward rotates by ``-theta``."""

    @staticmethod
    def forward(ctx, x, y, positions, freq_depth, freq_in_plane):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no launch for it
        ctx.save_for_backward(positions, freq_depth, freq_in_plane)
        return _launch(x, y, positions, freq_depth, freq_in_plane, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        tables = ctx.saved_tensors
        if len(grads) == 2 and grads[0] is not None and grads[1] is not None:
            return *_launch(grads[0].contiguous(), grads[1].contiguous(), *tables, -1.0), None, None, None
        rotated = [None if g is None else _launch(g.contiguous(), None, *tables, -1.0) for g in grads]
        return *rotated, *([None] * (5 - len(rotated)))


def _prepare(
    x: torch.Tensor,
    positions: torch.Tensor,
    freq_depth: torch.Tensor,
    freq_height: torch.Tensor,
    freq_width: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes and devices; return float32 positions and depth and in-plane frequencies on ``x``'s device."""
    if x.ndim != 4 or x.shape[-1] % 4:
        raise ValueError(
            f"x must be (batch, tokens, heads, head_dim) with head_dim divisible by 4; got {tuple(x.shape)}"
        )
    expected = (x.shape[1], 3) if positions.ndim == 2 else (x.shape[0], x.shape[1], 3)
    if tuple(positions.shape) != expected:
        raise ValueError(
            f"positions must be {expected} for x of shape {tuple(x.shape)}; got {tuple(positions.shape)}"
        )
    half = x.shape[-1] // 2
    sizes = (freq_depth.numel(), freq_height.numel(), freq_width.numel())
    if sizes != (half, half // 2, half // 2):
        raise ValueError(
            f"head_dim {x.shape[-1]} needs {half} depth and {half // 2} height and width frequencies; got {sizes}"
        )
    if any(f.requires_grad for f in (freq_depth, freq_height, freq_width)):
        raise ValueError("the fused RoPE kernel has no gradient for the frequencies; pass them detached")
    require_kernel_device(x)
    as_float = dict(device=x.device, dtype=torch.float32)
    return (
        positions.to(**as_float).contiguous(),
        freq_depth.to(**as_float).contiguous(),
        torch.cat([freq_height, freq_width]).to(**as_float).contiguous(),
    )


def rope3d(
    x: torch.Tensor,
    positions: torch.Tensor,
    freq_depth: torch.Tensor,
    freq_height: torch.Tensor,
    freq_width: torch.Tensor,
) -> torch.Tensor:
    """Rotate ``x`` ``(B, L, heads, head_dim)`` by the 3D RoPE of ``positions`` with the fused kernel.

    Args:
        x: Queries or keys, token-major.
        positions: ``(B, L, 3)`` or ``(L, 3)`` ``(d, h, w)`` (integers, or rescaled floats); negative depth
            leaves a token unrotated.
        freq_depth: ``(head_dim / 2,)`` depth frequencies.
        freq_height, freq_width: ``(head_dim / 4,)`` each.

    Raises:
        ValueError: Bad shapes, or frequencies that require gradients.
        ImportError / RuntimeError: No Triton, or a CPU tensor outside ``TRITON_INTERPRET=1``.
    """
    tables = _prepare(x, positions, freq_depth, freq_height, freq_width)
    return _Rope3D.apply(x.contiguous(), None, *tables)


def rope3d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: torch.Tensor,
    freq_depth: torch.Tensor,
    freq_height: torch.Tensor,
    freq_width: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope3d` of queries and keys in one launch: each token's angles are computed once for both."""
    if query.shape != key.shape or query.dtype != key.dtype or query.device != key.device:
        raise ValueError(
            f"query and key must match; got {tuple(query.shape)} {query.dtype} {query.device}, "
            f"{tuple(key.shape)} {key.dtype} {key.device}"
        )
    tables = _prepare(query, positions, freq_depth, freq_height, freq_width)
    return _Rope3D.apply(query.contiguous(), key.contiguous(), *tables)
