"""medfm's Triton flash-attention kernel for packed variable-length sequences against the PyTorch definition,
under the Triton interpreter on CPU: values and gradients in float32, float16 and bfloat16, uneven and empty
sequences, block sizes that do not divide the lengths, strided inputs and bad input."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from medfm.kernels import flash_attention_varlen, triton_available, varlen_attention_reference

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="triton is not installed (pip install 'medfm[triton]')"
)

FLOAT32_TOLERANCE = dict(atol=2e-6, rtol=2e-5)
# fp16/bf16: the kernel's largest error against the float32 definition may be at most this many times that of
# PyTorch's SDPA run per sequence in the same dtype (the peer; the kernel rounds the probabilities to the
# input dtype before the PV product, as flash attention does, so it sits at 1-2x the peer's error).
HALF_PRECISION_ERROR_RATIO = 4.0


def _sdpa_per_sequence(q, k, v, cu_seqlens):
    offsets = cu_seqlens.tolist()
    pieces = [
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        for a, b in itertools.pairwise(offsets)
    ]
    return torch.cat(pieces)


def _inputs(lengths, heads, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(dtype) for _ in range(3))
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    return q, k, v, cu_seqlens


def _values_and_gradients(function, q, k, v, cu_seqlens, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = function(*leaves, cu_seqlens, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize(
    "dtype, lengths, head_dim",
    [
        (torch.float32, [5, 37, 1, 20], 16),  # lengths across 0-3 blocks of 16, a single-token sequence
        (torch.float32, [18, 0, 9], 12),  # an empty sequence; head_dim 12 masks 4 of the 16 channel lanes
        (torch.float16, [33, 7], 16),
        (torch.bfloat16, [33, 7], 16),
    ],
)
def test_values_and_gradients_match_the_definition(dtype, lengths, head_dim) -> None:
    q, k, v, cu_seqlens = _inputs(lengths, heads=2, head_dim=head_dim, dtype=dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, grads = _values_and_gradients(flash_attention_varlen, q, k, v, cu_seqlens, grad_out)
    expected = _values_and_gradients(
        varlen_attention_reference, *(t.float() for t in (q, k, v)), cu_seqlens, grad_out
    )
    assert out.dtype == dtype and out.shape == q.shape and all(g.dtype == dtype for g in grads)
    got = [out, *grads]
    expected = [expected[0], *expected[1]]
    if dtype == torch.float32:
        for name, value, want in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(value, want, **FLOAT32_TOLERANCE, msg=name)
        return
    peer_out, peer_grads = _values_and_gradients(_sdpa_per_sequence, q, k, v, cu_seqlens, grad_out)
    for name, value, peer, want in zip(("out", "dq", "dk", "dv"), got, [peer_out, *peer_grads], expected):
        error = (value.float() - want).abs().max().item()
        peer_error = (peer.float() - want).abs().max().item()
        assert error <= HALF_PRECISION_ERROR_RATIO * peer_error + 1e-4, (name, error, peer_error)


def test_sequences_do_not_see_each_other_and_blocks_do_not_matter() -> None:
    q, k, v, cu_seqlens = _inputs([21, 11], heads=3, head_dim=16, dtype=torch.float32)
    out = flash_attention_varlen(q, k, v, cu_seqlens, scale=0.3)
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[21:] += 5.0
    changed_v[21:] -= 3.0
    other = flash_attention_varlen(q, changed_k, changed_v, cu_seqlens, scale=0.3)
    torch.testing.assert_close(other[:21], out[:21], atol=0, rtol=0)  # the first sequence is untouched
    assert not torch.allclose(other[21:], out[21:])
    for blocks in [(16, 32), (32, 16)]:
        torch.testing.assert_close(
            flash_attention_varlen(q, k, v, cu_seqlens, scale=0.3, block_sizes=blocks),
            out,
            atol=2e-6,
            rtol=2e-5,
        )
    torch.testing.assert_close(
        out, varlen_attention_reference(q, k, v, cu_seqlens, scale=0.3), atol=2e-6, rtol=2e-5
    )


def test_strided_inputs_as_the_model_passes_them() -> None:
    """The model hands (1, heads, total, head_dim) views of token-major tensors; no copy is needed."""
    total, heads, head_dim = 26, 2, 16
    packed = torch.randn(
        1, total, 3, heads, head_dim
    )  # q, k and v interleaved per token, as a fused projection
    q, k, v = (packed[0, :, i] for i in range(3))
    assert not q.is_contiguous()
    cu_seqlens = torch.tensor([0, 9, 26])
    torch.testing.assert_close(
        flash_attention_varlen(q, k, v, cu_seqlens),
        varlen_attention_reference(q, k, v, cu_seqlens),
        atol=2e-6,
        rtol=2e-5,
    )


def test_bad_input_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, cu_seqlens = _inputs([4, 6], heads=2, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="share one"):
        flash_attention_varlen(q, k[:, :1], v, cu_seqlens)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_varlen(q, k.half(), v, cu_seqlens)
    for offsets in ([0, 4, 9], [1, 4, 10], [0, 6, 4, 10]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            flash_attention_varlen(q, k, v, torch.tensor(offsets))
    with pytest.raises(ValueError, match="integer"):
        flash_attention_varlen(q, k, v, cu_seqlens.float())
    for blocks in [(8, 16), (16, 24)]:
        with pytest.raises(ValueError, match="powers of two"):
            flash_attention_varlen(q, k, v, cu_seqlens, block_sizes=blocks)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        flash_attention_varlen(q, k, v, cu_seqlens)


def test_large_negative_scores_stay_finite() -> None:
    """Every score near -700 (log-sum-exp too): the padded lanes of a partial block must not turn
    exp2(0 - lse) into inf and the gradients into NaN."""
    lengths, heads, head_dim = [7, 19], 1, 16
    direction = torch.nn.functional.normalize(torch.ones(head_dim), dim=0)
    noise = torch.randn(sum(lengths), heads, head_dim, generator=torch.Generator().manual_seed(3))
    q = 105.0 * direction + 0.1 * noise
    k = -105.0 * direction + 0.1 * noise.flip(0)
    v = noise.roll(1, 0)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    out, grads = _values_and_gradients(flash_attention_varlen, q, k, v, cu_seqlens, grad_out)
    expected, expected_grads = _values_and_gradients(
        varlen_attention_reference, q, k, v, cu_seqlens, grad_out
    )
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)  # scores of ~1000 bits: fp32 rounding
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected_grad, atol=1e-3, rtol=1e-3)


def test_only_the_needed_gradients_are_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With only v requiring a gradient, the dQ kernel does not run and dv is still exact."""
    kernels = importlib.import_module("medfm.kernels._flash_varlen_kernels")
    launched = []
    for name in ("backward_key_value", "backward_query"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, _Recorder(kernel, name, launched))
    q, k, v, cu_seqlens = _inputs([12, 20], heads=2, head_dim=16, dtype=torch.float32)
    v.requires_grad_(True)
    flash_attention_varlen(q, k, v, cu_seqlens).sum().backward()
    expected = v.detach().clone().requires_grad_(True)
    varlen_attention_reference(q, k, expected, cu_seqlens).sum().backward()
    assert launched == ["backward_key_value"] and q.grad is None
    torch.testing.assert_close(v.grad, expected.grad, **FLOAT32_TOLERANCE)


class _Recorder:
    """Stands in for a kernel: records that it was launched, then launches it."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]
