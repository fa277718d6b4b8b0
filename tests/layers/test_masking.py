"""Noise-driven masking against a plain MAE-style definition and the MiM and VIS-MAE fixture masks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medfm.layers.masking import (
    block_mask,
    block_noise,
    gather_tokens,
    mask_from_noise,
    random_masking,
    random_visible_indices,
    repeat_group_noise,
    scatter_tokens,
    visible_indices_from_mask,
)


def _mae_reference(x: torch.Tensor, ratio: float, noise: torch.Tensor):
    # MAE's random_masking, written out.
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore, ids_keep


@pytest.mark.parametrize(("length", "ratio"), [(216, 0.6), (49, 0.75), (10, 0.0), (7, 0.5)])
def test_random_masking_matches_mae(length, ratio) -> None:
    x = torch.randn(3, length, 5)
    noise = torch.rand(3, length)
    got = random_masking(x, ratio, noise=noise)
    want = _mae_reference(x, ratio, noise)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert got[0].shape == (3, int(length * (1 - ratio)), 5)
    assert got[1].dtype == torch.float32


def test_random_masking_draws_with_the_generator() -> None:
    x = torch.randn(2, 20, 3)
    a = random_masking(x, 0.5, generator=torch.Generator().manual_seed(3))
    b = random_masking(x, 0.5, noise=torch.rand(2, 20, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_scatter_undoes_the_shuffle() -> None:
    x = torch.randn(2, 12, 4)
    noise = torch.rand(2, 12)
    visible, mask, ids_restore, ids_keep = random_masking(x, 0.25, noise=noise)
    token = torch.full((1, 1, 4), 7.0)
    full = scatter_tokens(visible, ids_restore, token)
    # MAE's decoder input: concatenate mask tokens, then unshuffle.
    cat = torch.cat([visible, token.repeat(2, 12 - visible.shape[1], 1)], 1)
    assert torch.equal(full, torch.gather(cat, 1, ids_restore.unsqueeze(-1).repeat(1, 1, 4)))
    keep = mask == 0
    assert torch.equal(full[keep], x[keep])
    assert bool((full[~keep] == 7.0).all())
    assert torch.equal(gather_tokens(x, ids_keep), visible)


def test_mim_masks_replay_from_the_fixture_noise(upstream_fixtures) -> None:
    """MiM spec §2.2: up = 27x repeated group noise (consecutive raster tokens), mid/down = token masking."""
    folder = upstream_fixtures("mim")
    inputs = load_file(folder / "inputs.safetensors")
    expected = load_file(folder / "expected.safetensors")
    args = json.loads((folder / "upstream_config.json").read_text())["pretraining"]["args"]
    groups = inputs["pretrain.noise_up_groups"]
    tokens = expected["pretrain.mask_up"].shape[1]
    up_noise = repeat_group_noise(groups, tokens // groups.shape[1])
    assert torch.equal(mask_from_noise(up_noise, args["mask_ratio_up"])[0], expected["pretrain.mask_up"])
    for level in ("mid", "down"):
        mask, ids_restore, _ = mask_from_noise(inputs[f"pretrain.noise_{level}"], args[f"mask_ratio_{level}"])
        assert torch.equal(mask, expected[f"pretrain.mask_{level}"])
        assert torch.equal(ids_restore, expected[f"pretrain.ids_restore_{level}"])


def test_vis_mae_mask_replays_from_the_fixture_noise(upstream_fixtures) -> None:
    """VIS-MAE spec §2: noise per 4x4-patch unit, the smallest int(U(1-r)) units visible."""
    folder = upstream_fixtures("vis_mae")
    noise = load_file(folder / "inputs.safetensors")["noise"]
    expected = load_file(folder / "expected.safetensors")["mae_mask"]
    config = json.loads((folder / "upstream_config.json").read_text())["mae"]
    grid = config["img_size"] // config["patch_size"]
    assert torch.equal(block_mask(noise, (grid, grid), 4, config["mask_ratio"]), expected)


def _plain_block_mask(noise: torch.Tensor, grid: int, unit: int, ratio: float) -> torch.Tensor:
    # The spec's rule, patch by patch: unit u covers rows unit*(u // d) .. and cols unit*(u % d) ..
    d = grid // unit
    keep = int(d * d * (1 - ratio))
    visible_units = noise.argsort(1)[:, :keep]
    mask = torch.ones(noise.shape[0], grid * grid)
    for b in range(noise.shape[0]):
        for u in visible_units[b].tolist():
            for r in range(unit):
                for c in range(unit):
                    mask[b, (unit * (u // d) + r) * grid + unit * (u % d) + c] = 0
    return mask


@pytest.mark.parametrize(("grid", "unit", "ratio"), [(8, 2, 0.6), (12, 4, 0.75), (6, 3, 0.5)])
def test_block_mask_2d_matches_a_patch_loop(grid, unit, ratio) -> None:
    noise = torch.rand(3, (grid // unit) ** 2)
    assert torch.equal(
        block_mask(noise, (grid, grid), unit, ratio), _plain_block_mask(noise, grid, unit, ratio)
    )


def test_block_noise_3d_repeats_over_boxes() -> None:
    noise = torch.rand(2, 2 * 3 * 1)
    full = block_noise(noise, (4, 6, 2), (2, 2, 2)).view(2, 4, 6, 2)
    for i in range(4):
        for j in range(6):
            for k in range(2):
                unit = (i // 2) * 3 + (j // 2)
                assert torch.equal(full[:, i, j, k], noise[:, unit])
    mask = block_mask(noise, (4, 6, 2), 2, 0.5).view(2, 4, 6, 2)
    assert mask.sum().item() == 2 * 3 * 8  # three of six boxes of 8 tokens per sample


def test_repeat_group_noise_is_consecutive() -> None:
    noise = torch.tensor([[0.3, 0.1]])
    assert torch.equal(repeat_group_noise(noise, 3), torch.tensor([[0.3, 0.3, 0.3, 0.1, 0.1, 0.1]]))


def test_bad_inputs() -> None:
    x = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 8\)"):
        random_masking(x, 0.5, noise=torch.rand(2, 7))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(x, 1.0)
    with pytest.raises(ValueError, match="tokens must be"):
        random_masking(torch.randn(8, 3), 0.5)
    with pytest.raises(ValueError, match="not a multiple of the mask block"):
        block_noise(torch.rand(1, 4), (6, 6), 4)
    with pytest.raises(ValueError, match=r"noise must be \(B, 4\)"):
        block_noise(torch.rand(1, 5), (4, 4), 2)
    with pytest.raises(ValueError, match="do not fit"):
        scatter_tokens(torch.randn(2, 9, 3), torch.zeros(2, 8, dtype=torch.long), torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="same B"):
        gather_tokens(x, torch.zeros(3, 2, dtype=torch.long))


def test_existing_helpers_are_unchanged() -> None:
    indices = random_visible_indices(2, 10, 0.5, generator=torch.Generator().manual_seed(0))
    assert indices.shape == (2, 5)
    mask = torch.ones(2, 10, dtype=torch.bool).scatter(1, indices, False)
    assert torch.equal(visible_indices_from_mask(mask), indices)
