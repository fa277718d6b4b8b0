"""Fixed sin-cos tables against numpy transcriptions of the MiM and VIS-MAE specs and their stored tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medfm.layers.position import resample_position_grid, sincos_1d_table, sincos_position_table


def _one_axis(width: int, positions: np.ndarray) -> np.ndarray:
    # [sin(p w_k) | cos(p w_k)], w_k = 10000^(-k / (width / 2)), in float32 as the upstream numpy code.
    k = np.arange(width // 2, dtype=np.float32)
    k /= width / 2.0
    omega = 1.0 / 10000**k
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def _mim_3d(grid, dim: int) -> np.ndarray:
    """MiM spec §1.2: thirds [D1 | D2 | D3], D1 the slowest token axis."""
    d1, d2, d3 = np.meshgrid(*[np.arange(g) for g in grid], indexing="ij")
    return np.concatenate([_one_axis(dim // 3, d1), _one_axis(dim // 3, d2), _one_axis(dim // 3, d3)], axis=1)


def _mae_2d(grid, dim: int) -> np.ndarray:
    """MAE's 2D table (VIS-MAE's stored ``pos_embed``): first half the column coordinate, then the row."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    return np.concatenate([_one_axis(dim // 2, cols), _one_axis(dim // 2, rows)], axis=1)


@pytest.mark.parametrize(("grid", "dim"), [((6, 6, 6), 384), ((2, 3, 4), 24), ((4, 4, 2), 576)])
def test_mim_3d_table(grid, dim) -> None:
    table = sincos_position_table(grid, dim, axis_order=(0, 1, 2))
    assert table.shape == (math.prod(grid), dim) and table.dtype == torch.float32
    np.testing.assert_array_equal(table.numpy(), _mim_3d(grid, dim))
    assert torch.equal(sincos_position_table(grid, dim), table)  # the default order is (0, 1, 2)


@pytest.mark.parametrize(("grid", "dim"), [((56, 56), 96), ((16, 16), 12), ((3, 5), 8)])
def test_mae_2d_table(grid, dim) -> None:
    table = sincos_position_table(grid, dim, axis_order=(1, 0))
    np.testing.assert_array_equal(table.numpy(), _mae_2d(grid, dim))


def test_1d_table_and_cls_row() -> None:
    table = sincos_position_table((5,), 8, cls_token=True)
    assert table.shape == (6, 8)
    assert not table[0].any()
    np.testing.assert_array_equal(table[1:].numpy(), _one_axis(8, np.arange(5)))
    assert torch.equal(sincos_1d_table(torch.arange(5), 8), table[1:])


def test_temperature_changes_the_frequencies() -> None:
    table = sincos_position_table((4,), 4, temperature=100.0)
    angles = torch.arange(4.0)[:, None] * torch.tensor([1.0, 0.1])
    torch.testing.assert_close(table, torch.cat([angles.sin(), angles.cos()], 1))


def test_axis_order_permutes_the_chunks() -> None:
    grid, dim = (2, 3, 4), 12
    base = sincos_position_table(grid, dim)
    swapped = sincos_position_table(grid, dim, axis_order=(2, 0, 1))
    assert torch.equal(swapped, torch.cat([base[:, 8:], base[:, :8]], 1))


def test_matches_stored_mim_tables(upstream_fixtures) -> None:
    state = load_file(upstream_fixtures("mim") / "upstream_state_dict.safetensors")
    for key in ("pos_embed", "decoder_pos_embed"):
        stored = state[key][0]
        grid = (round(stored.shape[0] ** (1 / 3)),) * 3  # upstream's pre-training grid is cubic (6^3)
        assert torch.equal(sincos_position_table(grid, stored.shape[1], axis_order=(0, 1, 2)), stored), key


def test_matches_stored_vis_mae_table(upstream_fixtures) -> None:
    stored = load_file(upstream_fixtures("vis_mae") / "upstream_state_dict.safetensors")["pos_embed"][0]
    side = math.isqrt(stored.shape[0])
    assert torch.equal(sincos_position_table((side, side), stored.shape[1], axis_order=(1, 0)), stored)
    assert not torch.equal(sincos_position_table((side, side), stored.shape[1], axis_order=(0, 1)), stored)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_position_table((2, 2, 2), 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_table((2, 2), 6)
    with pytest.raises(ValueError, match="permutation"):
        sincos_position_table((2, 2), 8, axis_order=(0, 0))
    with pytest.raises(ValueError, match="1 to 3 positive sizes"):
        sincos_position_table((2, 2, 2, 2), 16)
    with pytest.raises(ValueError, match="positive even width"):
        sincos_1d_table(torch.arange(3), 5)


def test_resample_position_grid_is_unchanged() -> None:
    table = torch.randn(1, 4, 2, 3, 4)
    assert resample_position_grid(table, (2, 3, 4)) is table
