"""The Triton kernel behind :func:`medfm.kernels.rope3d` (imports Triton: load lazily).

One program rotates one token: it reads the token's ``(d, h, w)`` position, computes the ``head_dim / 2``
angles once, and rotates every head of the query row and (``PAIR``) of the key row with them. Channel pairs
are loaded as a ``(heads, head_dim / 2, 2)`` tile (contiguous memory) and split into even and odd lanes.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rope3d_kernel"]


@triton.jit
def _rotate(source, target, offsets, mask, cos, sin):
    pairs = tl.load(source + offsets, mask=mask, other=0.0).to(tl.float32)
    even, odd = tl.split(pairs)
    rotated = tl.join(even * cos[None, :] - odd * sin[None, :], odd * cos[None, :] + even * sin[None, :])
    tl.store(target + offsets, rotated.to(target.dtype.element_ty), mask=mask)


@triton.jit
def rope3d_kernel(
    X, Y, X_OUT, Y_OUT, POSITIONS, FREQ_DEPTH, FREQ_IN_PLANE,
    tokens, heads, positions_batch_stride,
    HEAD_DIM: tl.constexpr, QUARTER: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    SIGN: tl.constexpr, PAIR: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # one (batch, token); 64-bit: row x heads x head_dim passes 2**31
    position = POSITIONS + (row // tokens) * positions_batch_stride + (row % tokens) * 3
    depth = tl.load(position).to(tl.float32)
    height = tl.load(position + 1).to(tl.float32)
    width = tl.load(position + 2).to(tl.float32)
    j = tl.arange(0, BLOCK_HALF)
    valid = j < 2 * QUARTER
    theta = depth * tl.load(FREQ_DEPTH + j, mask=valid, other=0.0) + tl.where(
        j < QUARTER, height, width
    ) * tl.load(FREQ_IN_PLANE + j, mask=valid, other=0.0)
    keep = depth < 0.0  # a cls token: left as it is
    cos = tl.where(keep, 1.0, tl.cos(theta))
    sin = tl.where(keep, 0.0, tl.sin(theta)) * SIGN
    head = tl.arange(0, BLOCK_HEADS)
    lane = tl.arange(0, 2)
    offsets = head[:, None, None] * HEAD_DIM + j[None, :, None] * 2 + lane[None, None, :]
    mask = (head < heads)[:, None, None] & valid[None, :, None] & (lane < 2)[None, None, :]
    base = row * heads * HEAD_DIM
    _rotate(X + base, X_OUT + base, offsets, mask, cos, sin)
    if PAIR:
        _rotate(Y + base, Y_OUT + base, offsets, mask, cos, sin)
