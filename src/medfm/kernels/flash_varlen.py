"""Flash attention over packed variable-length sequences (Triton), forward and backward.

:func:`flash_attention_varlen` takes ``q``, ``k``, ``v`` as ``(total_tokens, heads, head_dim)`` (several
sequences concatenated, as flash-attn's ``flash_attn_varlen_func`` does) with ``cu_seqlens``
``[0, n1, n1 + n2, ...]``; each token attends to every token of its own sequence and to no other. Nothing of
size ``tokens x tokens`` is ever stored: the forward pass streams key blocks through an online softmax
(running maximum and sum, in base 2) and keeps one log-sum-exp per query row; the backward pass recomputes
the probabilities block by block from it, one kernel accumulating ``dK``/``dV`` per key block and one ``dQ``
per query block, so no atomics are needed and the result is deterministic.

Every product accumulates in float32. fp16 and bf16 are the GPU formats; float32 inputs use IEEE (not TF32)
products, which makes the kernel a reference-grade check. On a GPU the block sizes are autotuned per head
size; under ``TRITON_INTERPRET=1`` (CPU, how the tests run it) small blocks keep shapes cheap.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.autograd.function import once_differentiable

from ._triton import interpreting, require_kernel_device

__all__ = ["flash_attention_varlen", "varlen_attention_reference"]

_LOG2_E = 1 / math.log(2)  # exp(x) = exp2(x * log2(e))
_INTERPRETER_BLOCKS = (16, 16)


def _launcher(block_sizes: tuple[int, int] | None):
    """``(kernels, extra launch arguments)``: fixed blocks when given (and in the interpreter), else autotuned."""
    from . import _flash_varlen_kernels as kernels  # imports Triton

    if block_sizes is None and interpreting():
        block_sizes = _INTERPRETER_BLOCKS
    if block_sizes is None:
        return kernels.autotuned(), {}
    return kernels, {"BLOCK_M": block_sizes[0], "BLOCK_N": block_sizes[1]}


def _grid(longest: int, sequences: int, heads: int, block_key: str):
    def grid(meta):
        return (sequences * heads * -(-longest // meta[block_key]),)

    return grid


def _constants(head_dim: int, dtype: torch.dtype) -> dict:
    import triton

    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": dtype == torch.bfloat16 and interpreting(),
    }


def _token_strides(*tensors: torch.Tensor) -> list[int]:
    return [stride for tensor in tensors for stride in tensor.stride()[:2]]


class _FlashAttentionVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, longest, scale, block_sizes):
        kernels, blocks = _launcher(block_sizes)
        total, heads, head_dim = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
        sequences = cu_seqlens.numel() - 1
        kernels.forward[_grid(longest, sequences, heads, "BLOCK_M")](
            q, k, v, out, lse, cu_seqlens, *_token_strides(q, k, v, out), heads, total, longest, scale * _LOG2_E,
            **_constants(head_dim, q.dtype), **blocks,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.longest, ctx.scale, ctx.block_sizes = longest, scale, block_sizes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        grad_out = _inner_contiguous(grad_out)
        kernels, blocks = _launcher(ctx.block_sizes)
        total, heads, head_dim = q.shape
        sequences = cu_seqlens.numel() - 1
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward's row term.
        delta = (grad_out.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
        dq = dk = dv = None
        scalars = (heads, total, ctx.longest, ctx.scale, ctx.scale * _LOG2_E)
        constants = _constants(head_dim, q.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            kernels.backward_key_value[_grid(ctx.longest, sequences, heads, "BLOCK_N")](
                q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, *_token_strides(q, k, v, grad_out, dk, dv),
                *scalars, **constants, **blocks,
            )  # fmt: skip
        if ctx.needs_input_grad[0]:
            dq = torch.empty_like(q)
            kernels.backward_query[_grid(ctx.longest, sequences, heads, "BLOCK_M")](
                q, k, v, grad_out, lse, delta, dq, cu_seqlens, *_token_strides(q, k, v, grad_out, dq),
                *scalars, **constants, **blocks,
            )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def _inner_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _check_offsets(cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None) -> int:
    """Validate ``cu_seqlens`` and return the longest sequence's length (read back from the device only when
    ``max_seqlen`` is not given: then the offsets are trusted)."""
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1D integer tensor [0, n1, n1 + n2, ...]; got {cu_seqlens}")
    if max_seqlen is not None:
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0; got {max_seqlen}")
        return int(max_seqlen)
    offsets = cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(offsets)]
    if offsets[0] != 0 or offsets[-1] != total or min(lengths) < 0:
        raise ValueError(
            f"cu_seqlens must rise from 0 to the {total} packed tokens; got {offsets[:8]}"
            f"{'...' if len(offsets) > 8 else ''}"
        )
    return max(lengths)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    max_seqlen: int | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence with medfm's Triton flash-attention kernel (differentiable).

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)``, the same shape and dtype (fp16/bf16 on a GPU; float32
            is exact). Any strides with a contiguous last dimension.
        cu_seqlens: ``(sequences + 1,)`` cumulative lengths ``[0, n1, n1 + n2, ..., total_tokens]``.
        scale: Softmax scale; ``head_dim ** -0.5`` by default.
        max_seqlen: The longest sequence's length, if known on the host (as flash-attn takes it): saves reading
            ``cu_seqlens`` back from the GPU (a synchronisation per call) and trusts it without checking.
        block_sizes: ``(BLOCK_M, BLOCK_N)`` query and key tile sizes, fixed instead of autotuned (tests,
            experiments): powers of two, at least 16.

    Returns:
        ``(total_tokens, heads, head_dim)``, contiguous, in ``q``'s dtype.

    Raises:
        ValueError: Mismatched shapes or dtypes, or bad ``cu_seqlens``.
        ImportError / RuntimeError: No Triton, or CPU tensors outside ``TRITON_INTERPRET=1``.
    """
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k and v must share one (total_tokens, heads, head_dim) shape; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"q, k and v must share one dtype of fp16, bf16 or float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if block_sizes is not None and not all(b >= 16 and b & (b - 1) == 0 for b in block_sizes):
        raise ValueError(f"block_sizes must be two powers of two >= 16; got {block_sizes}")
    require_kernel_device(q, k, v)
    longest = _check_offsets(cu_seqlens, q.shape[0], max_seqlen)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (_inner_contiguous(t) for t in (q, k, v))
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    return _FlashAttentionVarlen.apply(q, k, v, cu_seqlens, max(longest, 1), scale, block_sizes)


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The definition in plain PyTorch (float32 softmax per sequence), same layout as :func:`flash_attention_varlen`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    offsets = cu_seqlens.tolist()
    pieces = []
    for start, end in itertools.pairwise(offsets):
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))
        weights = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        pieces.append((weights @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(pieces) if pieces else q.new_empty(q.shape)
