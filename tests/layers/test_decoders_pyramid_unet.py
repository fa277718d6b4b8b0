"""The feature pyramid, the conv units and the pyramid UNet decoder: values against plain torch ops, shapes,
strides, and every parameter reached by the gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfm.layers.decoders.conv import UpStep, conv_norm_act
from medfm.layers.decoders.feature_pyramid import SimpleFeaturePyramid
from medfm.layers.decoders.unet import PyramidUNetDecoder


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_conv_norm_act_is_conv_instance_norm_leaky_relu(spatial_dims: int) -> None:
    torch.manual_seed(0)
    unit = conv_norm_act(3, 5, 3, stride=2, spatial_dims=spatial_dims)
    x = torch.randn(2, 3, *(8,) * spatial_dims)
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    y = conv(x, unit[0].weight, None, stride=2, padding=1)
    dims = tuple(range(2, 2 + spatial_dims))
    y = (y - y.mean(dims, keepdim=True)) / torch.sqrt(y.var(dims, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(unit(x), F.leaky_relu(y, 0.01), atol=1e-5, rtol=1e-5)
    assert unit[0].bias is None


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_up_step_upsamples_and_joins_the_skip(spatial_dims: int) -> None:
    step = UpStep(6, 4, 5, factor=2, kernel=3, spatial_dims=spatial_dims)
    coarse, skip = torch.randn(1, 6, *(4,) * spatial_dims), torch.randn(1, 4, *(8,) * spatial_dims)
    out = step(coarse, skip)
    assert out.shape == (1, 5, *(8,) * spatial_dims)
    joined = torch.cat([step.up(coarse), skip], dim=1)
    torch.testing.assert_close(out, step.convs(joined))


def test_feature_pyramid_levels_and_strides() -> None:
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(
        8, (4, 16, 16), fine_factors=((2, 2, 2), (1, 2, 2)), up_factor=(2, 2, 2), down_factor=(2, 2, 2)
    ).eval()
    assert pyramid.level_strides == [(2, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32)]
    grid = (2, 2, 4)
    taps = [torch.randn(1, 1 + 16, 8) for _ in range(4)]  # a cls token, then the 2 x 2 x 4 grid
    features = pyramid(taps, grid)
    assert [tuple(f.shape[2:]) for f in features] == [(4, 8, 16), (4, 4, 8), (2, 2, 4), (1, 1, 2)]
    # Level 2 is the instance-normalised token map itself (the cls token dropped).
    volume = taps[2][:, 1:].transpose(1, 2).reshape(1, 8, *grid)
    norm = pyramid.norms[2]
    expected = F.instance_norm(volume, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    torch.testing.assert_close(features[2], expected)
    torch.testing.assert_close(features[3], F.max_pool3d(pyramid.norms[3](taps[3][:, 1:].transpose(1, 2)
        .reshape(1, 8, *grid)), 2))  # fmt: skip


def test_feature_pyramid_refuses_a_single_coarse_voxel() -> None:
    pyramid = SimpleFeaturePyramid(4, (4, 16, 16), ((1, 2, 2), (1, 2, 2)), (1, 2, 2), (1, 2, 2)).eval()
    with pytest.raises(ValueError, match="single voxel"):
        pyramid([torch.randn(1, 5, 4) for _ in range(4)], (1, 2, 2))


def test_unet_decoder_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    strides = [(2, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32)]
    decoder = PyramidUNetDecoder(1, 8, (4, 4, 8, 8), (2, 4), num_labels=3, level_strides=strides)
    image = torch.randn(1, 1, 8, 32, 64)
    features = [torch.randn(1, 8, *(n // s for n, s in zip(image.shape[2:], stride))) for stride in strides]
    heads = decoder(image, features)
    assert [tuple(h.shape) for h in heads] == [
        (1, 3, 8, 32, 64),
        (1, 3, 8, 16, 32),  # the half-resolution branch halves depth only where level 0 is 4+ deep
        (1, 3, 4, 8, 16),
        (1, 3, 4, 4, 8),
    ]
    sum(h.square().mean() for h in heads).backward()
    assert all(p.grad is not None for p in decoder.parameters())
