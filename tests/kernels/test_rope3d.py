"""The fused 3D RoPE Triton kernel against its PyTorch definition and medfm's model RoPE, under the Triton
interpreter on CPU (values and gradients, padded and packed layouts)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from medfm.kernels import grid_positions, rope3d, rope3d_reference, triton_available
from medfm.layers import Rope3D, apply_interleaved_rope

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="triton is not installed (pip install 'medfm[triton]')"
)


def _frequencies(head_dim: int):
    return Rope3D(head_dim, (2333.0, 10000.0, 10000.0)).frequencies()


def test_reference_equals_the_model_rope() -> None:
    """The kernel's definition is the model's RoPE: same angles, same interleaved rotation, cls untouched."""
    head_dim, grid = 16, (2, 3, 4)
    rope = Rope3D(head_dim, (2333.0, 10000.0, 10000.0))
    cos, sin = rope(grid)
    x = torch.randn(2, 1 + 24, 3, head_dim)
    expected = torch.cat(
        [x[:, :1], apply_interleaved_rope(x[:, 1:].transpose(1, 2), cos, sin).transpose(1, 2)], dim=1
    )
    got = rope3d_reference(x, grid_positions([grid]), *rope.frequencies())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kernel_values_and_gradients(layout: str) -> None:
    head_dim = 12  # HALF = 6: not a power of two, so the masked lanes are exercised
    frequencies = _frequencies(head_dim)
    if layout == "padded":
        positions = grid_positions([(2, 2, 3)])[None].expand(2, -1, -1).contiguous()
        x = torch.randn(2, positions.shape[1], 2, head_dim, requires_grad=True)
    else:
        positions = grid_positions([(1, 3, 4), (3, 2, 2), (2, 1, 1)])[None]
        x = torch.randn(1, positions.shape[1], 2, head_dim, requires_grad=True)
    out = rope3d(x, positions, *frequencies)
    reference_input = x.detach().clone().requires_grad_(True)
    expected = rope3d_reference(reference_input, positions, *frequencies)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, reference_input.grad, atol=1e-5, rtol=1e-5)
    cls_rows = positions[0, :, 0] < 0
    torch.testing.assert_close(out[:, cls_rows], x[:, cls_rows])  # cls tokens pass through


def test_rotation_keeps_norms() -> None:
    frequencies = _frequencies(8)
    positions = grid_positions([(2, 3, 2)])
    x = torch.randn(1, positions.shape[0], 4, 8, dtype=torch.float64)
    out = rope3d(x.float(), positions, *frequencies)
    torch.testing.assert_close(out.norm(dim=-1), x.float().norm(dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope3d(torch.randn(1, 3, 1, 6), grid_positions([(1, 1, 2)]), *_frequencies(8))
