"""Patch embedding and patchify/unpatchify against einsum/loop definitions and the VIS-MAE fixture."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from medfm.layers.patch_embed import PatchEmbed, check_divisible, patchify, unpatchify


def _mae_patchify_2d(imgs: torch.Tensor, p: int) -> torch.Tensor:
    # MAE's patchify (last axis ordered (p, q, c)), generalised to C channels.
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def _loop_patchify_3d(imgs: torch.Tensor, patch, channels_last: bool) -> torch.Tensor:
    n, _, d, h, w = imgs.shape
    p1, p2, p3 = patch
    rows = []
    for i in range(d // p1):
        for j in range(h // p2):
            for k in range(w // p3):
                box = imgs[:, :, i * p1 : (i + 1) * p1, j * p2 : (j + 1) * p2, k * p3 : (k + 1) * p3]
                box = box.permute(0, 2, 3, 4, 1) if channels_last else box
                rows.append(box.reshape(n, -1))
    return torch.stack(rows, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_2d_matches_mae(channels) -> None:
    x = torch.randn(2, channels, 8, 12)
    tokens = patchify(x, 4)
    assert torch.equal(tokens, _mae_patchify_2d(x, 4))
    assert torch.equal(unpatchify(tokens, 4, (2, 3), channels), x)


@pytest.mark.parametrize("channels_last", [True, False])
def test_patchify_3d_matches_a_loop(channels_last) -> None:
    x = torch.randn(2, 2, 4, 6, 8)
    tokens = patchify(x, (2, 3, 4), channels_last=channels_last)
    assert tokens.shape == (2, 2 * 2 * 2, 2 * 3 * 4 * 2)
    assert torch.equal(tokens, _loop_patchify_3d(x, (2, 3, 4), channels_last))
    assert torch.equal(unpatchify(tokens, (2, 3, 4), (2, 2, 2), 2, channels_last=channels_last), x)


def test_channel_first_2d_order() -> None:
    x = torch.randn(1, 3, 4, 4)
    tokens = patchify(x, 2, channels_last=False)
    assert torch.equal(tokens[0, 0], x[0, :, :2, :2].reshape(-1))


def test_unpatchify_reproduces_vis_mae_reconstruction(upstream_fixtures) -> None:
    expected = load_file(upstream_fixtures("vis_mae") / "expected.safetensors")
    pred, image = expected["mae_pred"], expected["mae_reconstruction"]
    patch = int((pred.shape[2] // image.shape[1]) ** 0.5)
    grid = (image.shape[2] // patch, image.shape[3] // patch)
    assert torch.equal(unpatchify(pred, patch, grid, image.shape[1]), image)
    assert torch.equal(patchify(image, patch), pred)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patch_embed_is_a_strided_conv(spatial_dims) -> None:
    patch = (2, 4) if spatial_dims == 2 else (2, 2, 4)
    embed = PatchEmbed(spatial_dims, 2, 6, patch, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    shape = (2, 2, 4, 8) if spatial_dims == 2 else (2, 2, 4, 6, 8)
    x = torch.randn(shape)
    tokens = embed(x)
    grid = [s // p for s, p in zip(shape[2:], patch)]
    assert tokens.shape == (2, int(torch.tensor(grid).prod()), 6)
    # A linear map of each flattened (c, p...) patch, then LayerNorm over the width.
    flat = patchify(x, patch, channels_last=False)
    linear = flat @ embed.proj.weight.reshape(6, -1).T + embed.proj.bias
    want = nn.functional.layer_norm(linear, (6,), embed.norm.weight, embed.norm.bias, eps=1e-6)
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)
    spatial = PatchEmbed(spatial_dims, 2, 6, patch, flatten=False)
    spatial.load_state_dict(embed.state_dict(), strict=False)
    out = spatial(x)
    assert out.shape == (2, 6, *grid)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), linear, atol=1e-5, rtol=1e-5)
    assert sorted(embed.state_dict()) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]


def test_check_divisible_message() -> None:
    check_divisible((32, 64), 16)
    with pytest.raises(ValueError) as info:
        check_divisible((30, 64, 64), 16)
    message = str(info.value)
    assert "input size (30, 64, 64) is not a multiple of the patch (16, 16, 16)" in message
    assert "pad_to_multiple" in message
    with pytest.raises(ValueError, match="of the fpn"):
        check_divisible((24, 24), 32, what="the fpn")


def test_bad_inputs() -> None:
    embed = PatchEmbed(3, 1, 4, 2)
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        embed(torch.randn(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match=r"expected pixel_values \(B, 1, D, H, W\)"):
        embed(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        PatchEmbed(1, 1, 4, 2)
    with pytest.raises(ValueError, match="patch_size must be"):
        PatchEmbed(2, 1, 4, (2, 2, 2))
    with pytest.raises(ValueError, match="expected tokens"):
        unpatchify(torch.randn(1, 4, 10), 2, (2, 2), 3)
    with pytest.raises(ValueError, match="expected"):
        patchify(torch.randn(4, 4), 2)
