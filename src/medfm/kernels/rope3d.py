"""Fused 3D rotary position embedding (Triton), forward and backward.

:func:`rope3d` rotates the channel pairs ``(2j, 2j+1)`` of every head of ``x`` ``(B, L, heads, head_dim)``
by ``theta_j = d * freq_depth[j] + (h * freq_height[j] if j < head_dim / 4 else w * freq_width[j - head_dim / 4])``,
computing the angles in the kernel from each token's integer grid position ``(d, h, w)``: no per-token
cos/sin table is built. A negative depth marks a token left as it is (a cls token). Padded batches pass
``positions`` ``(B, L, 3)``; packed streams pass ``(1, total, 3)`` with each sequence's own grid positions.

The backward pass is the same kernel rotating by ``-theta`` (a rotation's inverse is its transpose). The
kernel needs Triton: on a GPU natively, on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
:func:`rope3d_reference` is the plain PyTorch definition it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["grid_positions", "rope3d", "rope3d_reference", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def grid_positions(grids: Sequence[Sequence[int]], cls_tokens: int = 1, device=None) -> torch.Tensor:
    """``(total, 3)`` integer positions of packed sequences: per grid, ``cls_tokens`` rows of ``-1`` then the
    grid's ``(d, h, w)`` in row-major order."""
    rows = []
    for grid in grids:
        rows.append(torch.full((cls_tokens, 3), -1, dtype=torch.int32, device=device))
        d, h, w = torch.meshgrid(
            *(torch.arange(n, dtype=torch.int32, device=device) for n in grid), indexing="ij"
        )
        rows.append(torch.stack([d.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1))
    return torch.cat(rows)


def _angles(positions: torch.Tensor, freq_depth: torch.Tensor, freq_hw: torch.Tensor) -> torch.Tensor:
    quarter = freq_hw.shape[0] // 2
    position = positions.to(torch.float32)
    in_plane = torch.cat(
        [
            position[..., 1:2].expand(*position.shape[:-1], quarter),
            position[..., 2:3].expand(*position.shape[:-1], quarter),
        ],
        dim=-1,
    )
    return position[..., 0:1] * freq_depth + in_plane * freq_hw


def rope3d_reference(
    x: torch.Tensor,
    positions: torch.Tensor,
    freq_depth: torch.Tensor,
    freq_height: torch.Tensor,
    freq_width: torch.Tensor,
) -> torch.Tensor:
    """The definition, in PyTorch: ``x`` ``(B, L, heads, head_dim)``, ``positions`` ``(B, L, 3)`` or ``(L, 3)``."""
    if positions.ndim == 2:
        positions = positions[None].expand(x.shape[0], -1, -1)
    theta = _angles(positions, freq_depth.float(), torch.cat([freq_height, freq_width]).float())
    keep = positions[..., 0] < 0
    cos = torch.where(keep[..., None], torch.ones_like(theta), theta.cos())[:, :, None].to(x.dtype)
    sin = torch.where(keep[..., None], torch.zeros_like(theta), theta.sin())[:, :, None].to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope3d_kernel(
        x_ptr,
        out_ptr,
        pos_ptr,
        fd_ptr,
        fhw_ptr,
        tokens,
        heads,
        pos_batch_stride,
        HALF: tl.constexpr,
        QUARTER: tl.constexpr,
        BLOCK: tl.constexpr,
        SIGN: tl.constexpr,
    ):
        row = tl.program_id(0)  # one (batch, token, head) row of head_dim channels
        head_row = row // heads  # (batch, token)
        batch = head_row // tokens
        token = head_row % tokens
        position = pos_ptr + batch * pos_batch_stride + token * 3
        d = tl.load(position).to(tl.float32)
        h = tl.load(position + 1).to(tl.float32)
        w = tl.load(position + 2).to(tl.float32)
        j = tl.arange(0, BLOCK)
        valid = j < HALF
        fd = tl.load(fd_ptr + j, mask=valid, other=0.0)
        fhw = tl.load(fhw_ptr + j, mask=valid, other=0.0)
        coordinate = tl.where(j < QUARTER, h, w)
        theta = d * fd + coordinate * fhw
        keep = d < 0.0
        cos = tl.where(keep, 1.0, tl.cos(theta))
        sin = tl.where(keep, 0.0, tl.sin(theta)) * SIGN
        base = row * (2 * HALF)
        even = tl.load(x_ptr + base + 2 * j, mask=valid, other=0.0).to(tl.float32)
        odd = tl.load(x_ptr + base + 2 * j + 1, mask=valid, other=0.0).to(tl.float32)
        out_even = even * cos - odd * sin
        out_odd = odd * cos + even * sin
        tl.store(out_ptr + base + 2 * j, out_even.to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(out_ptr + base + 2 * j + 1, out_odd.to(out_ptr.dtype.element_ty), mask=valid)

    return rope3d_kernel


_KERNEL = None


def _launch(
    x: torch.Tensor, positions: torch.Tensor, freq_depth: torch.Tensor, freq_hw: torch.Tensor, sign: float
):
    import triton

    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    x = x.contiguous()
    batch, tokens, heads, head_dim = x.shape
    positions = positions.to(device=x.device, dtype=torch.int32).contiguous()
    pos_batch_stride = 0 if positions.ndim == 2 else tokens * 3
    out = torch.empty_like(x)
    half = head_dim // 2
    _KERNEL[(batch * tokens * heads,)](
        x,
        out,
        positions,
        freq_depth.float().contiguous(),
        freq_hw.float().contiguous(),
        tokens,
        heads,
        pos_batch_stride,
        HALF=half,
        QUARTER=half // 2,
        BLOCK=triton.next_power_of_2(half),
        SIGN=sign,
    )
    return out


class _Rope3D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, freq_depth, freq_hw):
        ctx.save_for_backward(positions, freq_depth, freq_hw)
        return _launch(x, positions, freq_depth, freq_hw, 1.0)

    @staticmethod
    def backward(ctx, grad):
        positions, freq_depth, freq_hw = ctx.saved_tensors
        return _launch(grad, positions, freq_depth, freq_hw, -1.0), None, None, None


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
        positions: ``(B, L, 3)`` or ``(L, 3)`` integer ``(d, h, w)``; negative depth leaves a token unrotated.
        freq_depth: ``(head_dim / 2,)`` depth frequencies.
        freq_height, freq_width: ``(head_dim / 4,)`` each.

    Raises:
        ImportError: Triton is not installed (``pip install "medfm[triton]"``).
    """
    if x.shape[-1] % 4:
        raise ValueError(f"3D RoPE needs head_dim divisible by 4; got {x.shape[-1]}")
    return _Rope3D.apply(x, positions, freq_depth, torch.cat([freq_height, freq_width]))
