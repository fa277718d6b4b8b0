"""The Triton kernels behind :func:`medfm.kernels.flash_attention_varlen` (imports Triton: load lazily).

One program handles one block of rows of one head of one sequence (a 1D grid); the sequence's bounds come from
``cu_seqlens``, and programs past a shorter sequence's end return at once. Tiles are ``BLOCK_M`` query rows by
``BLOCK_N`` key rows by ``BLOCK_D`` channels (the head size rounded up to a power of two, masked).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import triton
import triton.language as tl

__all__ = ["autotuned", "backward_key_value", "backward_query", "forward"]


@triton.jit
def _load_rows(base, stride_token, offset, rows, length, d, HEAD_DIM: tl.constexpr):
    mask = (rows < length)[:, None] & (d < HEAD_DIM)[None, :]
    return tl.load(base + (offset + rows)[:, None] * stride_token + d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, stride_token, offset, rows, length, d, values, HEAD_DIM: tl.constexpr):
    mask = (rows < length)[:, None] & (d < HEAD_DIM)[None, :]
    pointers = base + (offset + rows)[:, None] * stride_token + d[None, :]
    tl.store(pointers, values.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _program(CU, heads, longest, BLOCK: tl.constexpr):
    """``(head, block, start, length)`` of this program: a 1D grid of sequences x heads x
    ``cdiv(longest, BLOCK)`` (no axis limit of 65535 to meet); a block past a shorter sequence's end returns at
    once. ``start`` is 64-bit, so token offsets times strides may pass 2**31."""
    blocks = tl.cdiv(longest, BLOCK)
    program = tl.program_id(0)
    sequence = program // (blocks * heads)
    start = tl.load(CU + sequence).to(tl.int64)
    return (program // blocks) % heads, program % blocks, start, tl.load(CU + sequence + 1) - start


@triton.jit
def _statistics_offsets(head, total, start, rows):
    """Offsets of ``rows`` in the per-row statistics (log-sum-exp, delta), stored ``(heads, total)``."""
    return head.to(tl.int64) * total + start + rows


@triton.jit
def _row_statistics(LSE, DELTA, head, total, start, rows, row_ok):
    """The forward pass's log2-sum-exp and ``delta = dO . O`` of ``rows`` (0 on padded rows)."""
    offsets = _statistics_offsets(head, total, start, rows)
    return (
        tl.load(LSE + offsets, mask=row_ok, other=0.0),
        tl.load(DELTA + offsets, mask=row_ok, other=0.0),
    )


@triton.jit
def _probabilities_and_score_grads(
    q, k, v, do, lse, delta, valid, scale_log2, PRECISION: tl.constexpr, UPCAST: tl.constexpr
):
    """Recompute ``P`` of a (query, key) tile from the saved log-sum-exp, and ``dS = P * (dO V^T - delta)``."""
    scores = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
    # Padded lanes get -inf before exp2: exp2(0 - lse) would overflow where all scores are very negative.
    p = tl.exp2(tl.where(valid, scores, float("-inf")) - lse[:, None])
    return p, p * (_dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32. ``UPCAST`` (set for bf16 under the interpreter, whose bf16 ``tl.dot``
    multiplies raw bit patterns: triton-lang/triton#11584) multiplies in float32 instead: bf16 x bf16 products
    are exact in float32, so only the summation order differs from the GPU's bf16 tensor-core product."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def forward(
    Q, K, V, OUT, LSE, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    heads, total, longest, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    head, block, start, length = _program(CU, heads, longest, BLOCK_M)
    if block * BLOCK_M >= length:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + head * stride_qh, stride_qt, start, rows, length, d, HEAD_DIM)
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for first in range(0, length, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        k = _load_rows(K + head * stride_kh, stride_kt, start, cols, length, d, HEAD_DIM)
        v = _load_rows(V + head * stride_vh, stride_vt, start, cols, length, d, HEAD_DIM)
        scores = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
        scores = tl.where((cols < length)[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        running_max = new_max
    _store_rows(
        OUT + head * stride_oh, stride_ot, start, rows, length, d, acc / running_sum[:, None], HEAD_DIM
    )
    lse = running_max + tl.log2(running_sum)
    tl.store(LSE + _statistics_offsets(head, total, start, rows), lse, mask=rows < length)


@triton.jit
def backward_key_value(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    heads, total, longest, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    head, block, start, length = _program(CU, heads, longest, BLOCK_N)
    if block * BLOCK_N >= length:
        return
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + head * stride_kh, stride_kt, start, cols, length, d, HEAD_DIM)
    v = _load_rows(V + head * stride_vh, stride_vt, start, cols, length, d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for first in range(0, length, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        q = _load_rows(Q + head * stride_qh, stride_qt, start, rows, length, d, HEAD_DIM)
        do = _load_rows(DO + head * stride_doh, stride_dot, start, rows, length, d, HEAD_DIM)
        lse, delta = _row_statistics(LSE, DELTA, head, total, start, rows, row_ok)
        valid = row_ok[:, None] & (cols < length)[None, :]
        p, ds = _probabilities_and_score_grads(q, k, v, do, lse, delta, valid, scale_log2, PRECISION, UPCAST)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    _store_rows(DK + head * stride_dkh, stride_dkt, start, cols, length, d, dk * scale, HEAD_DIM)
    _store_rows(DV + head * stride_dvh, stride_dvt, start, cols, length, d, dv, HEAD_DIM)


@triton.jit
def backward_query(
    Q, K, V, DO, LSE, DELTA, DQ, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    heads, total, longest, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    head, block, start, length = _program(CU, heads, longest, BLOCK_M)
    if block * BLOCK_M >= length:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + head * stride_qh, stride_qt, start, rows, length, d, HEAD_DIM)
    do = _load_rows(DO + head * stride_doh, stride_dot, start, rows, length, d, HEAD_DIM)
    lse, delta = _row_statistics(LSE, DELTA, head, total, start, rows, row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for first in range(0, length, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        k = _load_rows(K + head * stride_kh, stride_kt, start, cols, length, d, HEAD_DIM)
        v = _load_rows(V + head * stride_vh, stride_vt, start, cols, length, d, HEAD_DIM)
        valid = row_ok[:, None] & (cols < length)[None, :]
        _, ds = _probabilities_and_score_grads(q, k, v, do, lse, delta, valid, scale_log2, PRECISION, UPCAST)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    _store_rows(DQ + head * stride_dqh, stride_dqt, start, rows, length, d, dq * scale, HEAD_DIM)


@functools.cache
def autotuned() -> SimpleNamespace:
    """The kernels wrapped in Triton's autotuner (GPU only): configurations that do not fit are skipped."""

    def configs(shapes):
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in shapes
        ]

    forward_shapes = [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 2)]
    backward_shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 32, 4, 1)]
    key = ["HEAD_DIM", "PRECISION", "UPCAST"]
    return SimpleNamespace(
        forward=triton.autotune(configs(forward_shapes), key=key)(forward),
        backward_key_value=triton.autotune(configs(backward_shapes), key=key)(backward_key_value),
        backward_query=triton.autotune(configs(backward_shapes), key=key)(backward_query),
    )
