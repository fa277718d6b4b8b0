"""Convolutional building blocks of the decoders, for 2D (``spatial_dims=2``) and 3D maps.

Two of them are written for speed, with the same parameters (and state-dict keys) as the plain modules:

- :class:`InstanceNorm3d` (and 2d) is ``nn.InstanceNorm3d`` computed as a group norm of one channel per group
  (the same numbers; CPU's group-norm kernel is about twice as fast, and stays fast on channels-last maps).
- :class:`ConvNormAct` runs nnU-Net's conv / instance norm / LeakyReLU unit with that norm and the activation
  in place, so no second map-sized buffer is allocated per unit.
- :class:`StrideUpsample3d` (and 2d) is a transposed conv whose kernel equals its stride: each input voxel owns its own
  output block, so it is one matrix product and a reshuffle. oneDNN and cuDNN run such transposed convs as
  general convolutions, an order of magnitude below the matmul rate on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNormAct",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "StrideUpsample2d",
    "StrideUpsample3d",
    "UpStep",
    "conv_channels_last",
    "conv_norm_act",
    "conv_transpose",
    "prefers_channels_last",
    "to_channels_last",
]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def _tuple(value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    values = (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} sizes; got {value!r}")
    return values


class _InstanceNormAsGroupNorm:
    """Instance norm computed, on CPU, as ``group_norm`` with one channel per group: the same numbers, but CPU's
    group-norm kernel is about twice as fast as instance norm's (a batch norm over a reshaped view) on
    contiguous maps, and keeps channels-last maps channels-last where instance norm is several times slower on
    them. Other devices run ``nn.InstanceNorm``'s own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU only, where it was measured: CUDA autocast runs group_norm in float32 (instance_norm is not on its
        # list), and CUDA's group norm makes channels-last maps contiguous.
        if self.track_running_stats or x.dim() != self._spatial_dims + 2 or x.device.type != "cpu":  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)  # type: ignore[attr-defined]


class InstanceNorm3d(_InstanceNormAsGroupNorm, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same arguments and keys) computed as a group norm; see the base class."""

    _spatial_dims = 3


class InstanceNorm2d(_InstanceNormAsGroupNorm, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (same arguments and keys) computed as a group norm; see the base class."""

    _spatial_dims = 2


_INSTANCE_NORM = {2: InstanceNorm2d, 3: InstanceNorm3d}


class ConvNormAct(nn.Sequential):
    """Conv (no bias, "same" padding for odd kernels), InstanceNorm (no affine), LeakyReLU(0.01): nnU-Net's
    unit, as ``nn.Sequential`` children ``0``, ``1``, ``2`` (the keys of checkpoints).

    The norm is :class:`InstanceNorm3d` (a group norm of one channel per group: equal numbers, faster), a
    16-bit convolution runs channels-last (:func:`conv_channels_last`) and the LeakyReLU runs in place on the norm's fresh output (autograd allows it: the norm's backward needs its
    input, and LeakyReLU's with a positive slope its output).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        spatial_dims: int = 3,
    ):
        kernel = _tuple(kernel, spatial_dims)
        super().__init__(
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self[0], self[1], self[2]
        x = conv_channels_last(conv, x) if prefers_channels_last(x) else conv(x)
        return F.leaky_relu_(norm(x), act.negative_slope)


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    spatial_dims: int = 3,
) -> ConvNormAct:
    """nnU-Net's unit (see :class:`ConvNormAct`)."""
    return ConvNormAct(in_channels, out_channels, kernel, stride, spatial_dims)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_HALF_TYPES = (torch.bfloat16, torch.float16)


def prefers_channels_last(x: torch.Tensor) -> bool:
    """Whether convolutions on ``x`` run faster channels-last: when they compute in 16 bits (``x`` is, or
    autocast is on for its device with a 16-bit type).

    Measured on CPU (oneDNN, 2 threads) for SPAD-ViT's decoder on a 48x192x192 window: channels-last made the
    bf16 forward 3.2x faster and the fp32 forward 1.5x slower, so fp32 maps stay contiguous. cuDNN's 16-bit
    tensor-core convolutions also take channels-last natively.
    """
    if x.dim() not in _CHANNELS_LAST:
        return False
    if x.dtype in _HALF_TYPES:
        return True
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _HALF_TYPES


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last layout of its rank (4-D or 5-D)."""
    return x.contiguous(memory_format=_CHANNELS_LAST[x.dim()])


def conv_channels_last(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with a channels-last copy of its kernel, in the dtype the convolution computes in (autocast's
    when on). oneDNN and cuDNN pick their fast 16-bit paths only when kernel and map are both channels-last;
    the copy is made per call (autograd carries the gradient back to the parameter in its own layout), so the
    module's parameters never change layout (which DDP's gradient buckets, for one, would not survive)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    weight = conv.weight.to(dtype=dtype, memory_format=_CHANNELS_LAST[conv.weight.dim()])
    bias = conv.bias.to(dtype) if conv.bias is not None else None
    return conv._conv_forward(x, weight, bias)


class _StrideUpsampleMixin:
    """The forward of a transposed conv with kernel = stride, no padding, groups or dilation: per input voxel,
    ``(C_in) @ (C_in, C_out * prod(kernel))``, then each voxel's block is put in its place. The output has the
    input's layout (channels-last in, channels-last out), as convolutions do."""

    def _is_stride_upsample(self, x: torch.Tensor) -> bool:
        n = len(self.kernel_size)  # type: ignore[attr-defined]
        return (
            tuple(self.stride) == tuple(self.kernel_size)  # type: ignore[attr-defined]
            and not any(self.padding)  # type: ignore[attr-defined]
            and not any(self.output_padding)  # type: ignore[attr-defined]
            and all(d == 1 for d in self.dilation)  # type: ignore[attr-defined]
            and self.groups == 1  # type: ignore[attr-defined]
            and self.padding_mode == "zeros"  # type: ignore[attr-defined]
            and x.dim() == n + 2
        )

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None or not self._is_stride_upsample(
            x
        ):  # built otherwise: the parent's forward
            return super().forward(x, output_size)  # type: ignore[misc]
        factor = tuple(self.kernel_size)  # type: ignore[attr-defined]
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        batch, in_channels, *spatial = x.shape
        out_channels, n = weight.shape[1], len(spatial)
        tokens = x.movedim(1, -1).reshape(-1, in_channels)  # a view when x is channels-last (or batch 1)
        matrix = weight.reshape(in_channels, -1)
        if bias is None:
            blocks = tokens @ matrix
        else:
            blocks = torch.addmm(bias.repeat_interleave(math.prod(factor)), tokens, matrix)
        blocks = blocks.view(batch, *spatial, out_channels, *factor)
        upsampled = tuple(s * f for s, f in zip(spatial, factor))
        interleaved = [axis for d in range(n) for axis in (1 + d, n + 2 + d)]  # S_1, k_1, ..., S_n, k_n
        if x.dim() in _CHANNELS_LAST and x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()]):
            # (B, S_1, k_1, ..., C) written once; viewed as (B, C, ...) channels-last.
            out = blocks.permute([0, *interleaved, n + 1]).reshape(batch, *upsampled, out_channels)
            return out.movedim(-1, 1)
        return blocks.permute([0, n + 1, *interleaved]).reshape(batch, out_channels, *upsampled)


class StrideUpsample3d(_StrideUpsampleMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d(in, out, factor, stride=factor)`` computed as a matrix product."""


class StrideUpsample2d(_StrideUpsampleMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in, out, factor, stride=factor)`` computed as a matrix product."""


_STRIDE_UPSAMPLE = {2: StrideUpsample2d, 3: StrideUpsample3d}


def conv_transpose(
    in_channels: int, out_channels: int, factor: int | Sequence[int], spatial_dims: int = 3
) -> nn.Module:
    """A transposed conv upsampling by ``factor`` (kernel = stride), as a :class:`StrideUpsample3d` (or 2d)."""
    factor = _tuple(factor, spatial_dims)
    return _STRIDE_UPSAMPLE[spatial_dims](in_channels, out_channels, factor, stride=factor)


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
