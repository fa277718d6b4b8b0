"""The fused 3D RoPE Triton kernel against its PyTorch definition and medfm's model RoPE, under the Triton
interpreter on CPU (values and gradients, padded and packed layouts)."""

from __future__ import annotations

import pytest
import torch

from medfm.kernels import grid_positions, rope3d, rope3d_qk, rope3d_reference, triton_available
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


def test_query_key_pair_in_one_launch_with_rescaled_per_sample_positions() -> None:
    """Three heads (not a power of two: masked head lanes), float positions of a rescaled RoPE, one row of
    positions per sample (as MIM's visible-token subsets have), queries and keys rotated together."""
    head_dim = 16
    rope = Rope3D(head_dim, (2333.0, 10000.0, 10000.0), rescale_shape=(4, -1, 8))
    rotation = rope.rotation([(2, 3, 5)])
    rows = torch.stack([torch.randperm(31)[:12] for _ in range(2)])
    positions = rotation.select(rows).positions  # (2, 12, 3), floats
    assert positions.dtype == torch.float32 and not torch.equal(positions, positions.round())
    frequencies = rope.frequencies()
    q, k = (torch.randn(2, 12, 3, head_dim, requires_grad=True) for _ in range(2))
    rotated_q, rotated_k = rope3d_qk(q, k, positions, *frequencies)
    reference = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    expected = [rope3d_reference(t, positions, *frequencies) for t in reference]
    torch.testing.assert_close(rotated_q, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated_k, expected[1], atol=1e-5, rtol=1e-5)
    weights = torch.randn(2, *q.shape)
    ((rotated_q * weights[0]).sum() + (rotated_k * weights[1]).sum()).backward()
    ((expected[0] * weights[0]).sum() + (expected[1] * weights[1]).sum()).backward()
    torch.testing.assert_close(q.grad, reference[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad, reference[1].grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must match"):
        rope3d_qk(q, k[:, :, :2], positions, *frequencies)
    with pytest.raises(ValueError, match="positions must be"):
        rope3d(q, positions[:, :5], *frequencies)


def test_bfloat16_rotation() -> None:
    frequencies = _frequencies(16)
    positions = grid_positions([(3, 2, 4)])
    x = torch.randn(2, positions.shape[0], 2, 16).bfloat16()
    expected = rope3d_reference(x.float(), positions, *frequencies)
    torch.testing.assert_close(rope3d(x, positions, *frequencies).float(), expected, atol=2e-2, rtol=1e-2)


def test_frequencies_are_checked() -> None:
    positions = grid_positions([(1, 2, 2)])
    x = torch.randn(1, positions.shape[0], 2, 16)
    depth, height, width = _frequencies(16)
    with pytest.raises(ValueError, match="needs 8 depth and 4 height and width frequencies"):
        rope3d(x, positions, depth[:3], height, width)
    with pytest.raises(ValueError, match="no gradient for the frequencies"):
        rope3d(x, positions, depth.requires_grad_(True), height, width)


def test_an_unused_key_costs_no_backward_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module = importlib.import_module("medfm.kernels.rope3d")
    launches = []
    original = module._launch
    monkeypatch.setattr(
        module, "_launch", lambda x, y, *rest: launches.append(y is not None) or original(x, y, *rest)
    )
    frequencies = _frequencies(8)
    positions = grid_positions([(2, 2, 2)])
    q, k = (torch.randn(1, positions.shape[0], 2, 8, requires_grad=True) for _ in range(2))
    rotated_q, _ = rope3d_qk(q, k, positions, *frequencies)
    rotated_q.sum().backward()
    assert launches == [True, False] and k.grad is None  # the pair forward, then q alone backward
    expected = q.detach().clone().requires_grad_(True)
    rope3d_reference(expected, positions, *frequencies).sum().backward()
    torch.testing.assert_close(q.grad, expected.grad, atol=1e-5, rtol=1e-5)
