"""The feature pyramid, the conv units and the pyramid UNet decoder: values against plain torch ops, shapes,
strides, and every parameter reached by the gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfm.layers.decoders.conv import (
    InstanceNorm2d,
    InstanceNorm3d,
    StrideUpsample3d,
    UpStep,
    conv_norm_act,
    conv_transpose,
    prefers_channels_last,
    to_channels_last,
)
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


# The fast paths (issue 14): each against the plain torch module it replaces, forward and backward.


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_stride_upsample_equals_the_transposed_conv(spatial_dims: int, bias: bool) -> None:
    torch.manual_seed(0)
    factor = (1, 2, 3)[-spatial_dims:]
    fast = conv_transpose(5, 7, factor, spatial_dims=spatial_dims)
    if not bias:
        fast.bias = None
    plain = (torch.nn.ConvTranspose2d if spatial_dims == 2 else torch.nn.ConvTranspose3d)(
        5, 7, factor, stride=factor, bias=bias
    )
    plain.load_state_dict(fast.state_dict())
    assert isinstance(fast, type(plain))  # same class for isinstance checks, init and state-dict keys
    x = torch.randn(2, 5, *(3, 4, 6)[-spatial_dims:], requires_grad=True)
    out, ref = fast(x), plain(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, fast.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, plain.weight])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # A channels-last input gives a channels-last output with the same values.
    last = to_channels_last(x.detach())
    out_last = fast(last)
    torch.testing.assert_close(out_last, ref.detach(), atol=1e-6, rtol=1e-6)
    assert out_last.is_contiguous(
        memory_format=torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    )


def test_conv_norm_act_gradients_equal_the_plain_modules() -> None:
    torch.manual_seed(0)
    unit = conv_norm_act(4, 6, 3)
    plain = torch.nn.Sequential(unit[0], unit[1], unit[2])
    x = torch.randn(2, 4, 5, 6, 7, requires_grad=True)
    out, ref = unit(x), plain(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sin().sum(), [x, unit[0].weight])
    ref_grads = torch.autograd.grad(ref.sin().sum(), [x, unit[0].weight])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert list(dict(unit.named_parameters())) == ["0.weight"]


def test_prefers_channels_last_only_for_16_bit_convolutions() -> None:
    x = torch.randn(1, 1, 2, 2, 2)
    assert not prefers_channels_last(x)
    assert prefers_channels_last(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prefers_channels_last(x)
    assert not prefers_channels_last(torch.randn(2, 3))


def test_unet_decoder_bf16_channels_last_path_and_head_count() -> None:
    torch.manual_seed(0)
    strides = [(1, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32)]
    decoder = PyramidUNetDecoder(1, 8, (4, 4, 8, 8), (2, 4), num_labels=3, level_strides=strides).eval()
    image = torch.randn(1, 1, 16, 64, 64)
    features = [torch.randn(1, 8, *(n // s for n, s in zip(image.shape[2:], stride))) for stride in strides]
    with torch.no_grad():
        contiguous = decoder(image, features)
        (first,) = decoder(image, features, num_heads=1)
        torch.testing.assert_close(first, contiguous[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (fast,) = decoder(image, features, num_heads=1)
    # The parameters keep their layout (DDP's gradient buckets depend on it); the logits come back contiguous.
    assert all(p.is_contiguous() for p in decoder.parameters())
    assert fast.is_contiguous() and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), contiguous[0], atol=0.1, rtol=0.05)
    with torch.no_grad():  # fp32 after that is unchanged
        torch.testing.assert_close(
            decoder(image, features, num_heads=1)[0], contiguous[0], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_as_group_norm_equals_instance_norm(spatial_dims: int, affine: bool) -> None:
    torch.manual_seed(0)
    fast = (InstanceNorm2d if spatial_dims == 2 else InstanceNorm3d)(6, affine=affine)
    plain = (torch.nn.InstanceNorm2d if spatial_dims == 2 else torch.nn.InstanceNorm3d)(6, affine=affine)
    if affine:
        with torch.no_grad():
            fast.weight.uniform_(0.5, 1.5), fast.bias.uniform_(-0.5, 0.5)
        plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 6, *(5, 6, 7)[-spatial_dims:], requires_grad=True)
    out, ref = fast(x), plain(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    wrt = [x, fast.weight] if affine else [x]
    grads = torch.autograd.grad(out.sin().sum(), wrt)
    ref_grads = torch.autograd.grad(ref.sin().sum(), [x, plain.weight] if affine else [x])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    last = to_channels_last(x.detach())  # channels-last stays channels-last
    memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    assert fast(last).is_contiguous(memory_format=memory_format)
    # Unbatched input goes to the module's own path.
    torch.testing.assert_close(fast(x[0]), plain(x[0]), atol=1e-5, rtol=1e-5)


def test_feature_pyramid_maps_are_channels_last_for_16_bit_convolutions_only() -> None:
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(
        8, (4, 16, 16), fine_factors=((2, 2, 2), (2, 2, 2)), up_factor=(2, 2, 2), down_factor=(2, 2, 2)
    ).eval()
    grid = (2, 4, 4)
    taps = [torch.randn(2, 1 + 32, 8) for _ in range(4)]  # batch 2, a prefix token
    with torch.no_grad():
        plain = pyramid(taps, grid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = pyramid(taps, grid)
    assert all(f.is_contiguous() for f in plain)
    assert all(f.is_contiguous(memory_format=torch.channels_last_3d) for f in fast)
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_stride_upsample_built_otherwise_runs_the_transposed_conv() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 3, 3)
    for kwargs in ({"stride": 1}, {"stride": 2, "padding": 1}, {"stride": 2, "output_padding": 1}):
        fast = StrideUpsample3d(4, 4, 2, **kwargs)
        plain = torch.nn.ConvTranspose3d(4, 4, 2, **kwargs)
        plain.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(x), plain(x))
    fast = conv_transpose(4, 4, 2)
    torch.testing.assert_close(
        fast(x[0]), torch.nn.functional.conv_transpose3d(x, fast.weight, fast.bias, 2)[0]
    )


def test_ddp_gradients_of_a_16_bit_decoder_equal_plain_training(tmp_path) -> None:
    """Channels-last kernels are per-call copies: DDP (which buckets gradients by the parameters' layout at
    wrap time) gets the same gradients as plain training under bf16 autocast."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    strides = [(1, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32)]
    decoder = PyramidUNetDecoder(1, 8, (4, 4, 8, 8), (2, 4), num_labels=3, level_strides=strides)
    image = torch.randn(1, 1, 16, 64, 64)
    features = [torch.randn(1, 8, *(n // s for n, s in zip(image.shape[2:], stride))) for stride in strides]

    def gradients(model) -> list[torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(h.float().square().mean() for h in model(image, features))
        loss.backward()
        return [p.grad.clone() for p in decoder.parameters()]

    plain = gradients(decoder)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = gradients(DistributedDataParallel(decoder))
    finally:
        dist.destroy_process_group()
    for got, want in zip(wrapped, plain):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
