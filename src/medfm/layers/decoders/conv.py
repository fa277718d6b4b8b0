"""Convolutional building blocks of the decoders, for 2D (``spatial_dims=2``) and 3D maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["UpStep", "conv_norm_act", "conv_transpose"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _tuple(value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    values = (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} sizes; got {value!r}")
    return values


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    spatial_dims: int = 3,
) -> nn.Sequential:
    """Conv (no bias, "same" padding for odd kernels), InstanceNorm (no affine), LeakyReLU(0.01): nnU-Net's unit."""
    kernel = _tuple(kernel, spatial_dims)
    return nn.Sequential(
        _CONV[spatial_dims](
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=tuple(k // 2 for k in kernel),
            bias=False,
        ),
        _INSTANCE_NORM[spatial_dims](out_channels),
        nn.LeakyReLU(0.01),
    )


def conv_transpose(
    in_channels: int, out_channels: int, factor: int | Sequence[int], spatial_dims: int = 3
) -> nn.Module:
    """A transposed conv upsampling by ``factor`` (kernel = stride)."""
    factor = _tuple(factor, spatial_dims)
    return _CONV_TRANSPOSE[spatial_dims](in_channels, out_channels, factor, stride=factor)


class UpStep(nn.Module):
    """Upsample by a transposed conv, concatenate a skip connection, then two :func:`conv_norm_act` layers.

    Args:
        in_channels: Channels of the coarse input.
        skip_channels: Channels of the skip connection.
        out_channels: Channels out (also of the upsampled map).
        factor: Upsampling factor per axis.
        kernel: Kernel of the two convs.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        factor: int | Sequence[int],
        kernel: int | Sequence[int] = 3,
        spatial_dims: int = 3,
    ):
        super().__init__()
        self.up = conv_transpose(in_channels, out_channels, factor, spatial_dims)
        self.convs = nn.Sequential(
            conv_norm_act(out_channels + skip_channels, out_channels, kernel, spatial_dims=spatial_dims),
            conv_norm_act(out_channels, out_channels, kernel, spatial_dims=spatial_dims),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))
