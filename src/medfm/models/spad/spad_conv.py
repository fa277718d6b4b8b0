"""The SPAD rule and spacing-adaptive convolutions (spec §0).

A volume's anisotropy level ``aniso_d`` says how many of the network's 2x downsamplings act in-plane
only before they act on all three axes. A SPAD-conv keeps one full 3D kernel and, for thick-slice
inputs, merges its depth taps by **summing** them, so the same weights serve every spacing. ``aniso_d`` is
passed explicitly with the tensor count ``n`` of downsamplings applied so far (upstream hid both on a
tensor subclass, which breaks activation checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.anisotropy import TWO_D_ANISO_D, aniso_d_from_spacing

__all__ = [
    "TWO_D_ANISO_D",
    "SpadConv3d",
    "SpadConvTranspose3d",
    "aniso_d_from_spacing",
    "merge_depth_taps",
]


def merge_depth_taps(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum adjacent depth taps (dim 2) of a conv kernel into ``groups`` taps.

    ``(O, I, k, kh, kw) -> (O, I, groups, kh, kw)``; ``k`` must be a multiple of ``groups``.
    """
    depth = weight.shape[2]
    if groups == depth:
        return weight
    if depth % groups:
        raise ValueError(f"cannot merge {depth} depth taps into {groups} equal groups")
    return weight.unflatten(2, (groups, depth // groups)).sum(dim=3)


def _log2(stride: int) -> int:
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"SPAD strides are powers of 2; got {stride}")
    return stride.bit_length() - 1


class SpadConv3d(nn.Conv3d):
    """A Conv3d with isotropic kernel ``k``, stride ``s = 2^m`` and padding ``p`` that follows the SPAD rule.

    With ``pending = max(aniso_d - n, 0)`` in-plane-only downsamplings still to come, the depth stride is
    ``max(s >> pending, 1)``. When that is ``s`` and nothing is pending, this is a plain conv. Otherwise the
    depth padding is 0 and the depth taps are summed: all of them when the depth stride is 1 (a per-slice
    2D conv; only for ``k == s`` or ``k == 3``), else into groups of ``k / s_d`` (``k == s``).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.downsample_steps = _log2(stride)

    def spad_forward(self, x: torch.Tensor, aniso_d: int, n: int) -> tuple[torch.Tensor, int]:
        """Convolve ``x``; return the output and the new downsampling count."""
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        pending = max(aniso_d - n, 0)
        depth_stride = max(s >> pending, 1)
        if depth_stride == s and pending == 0:
            out = F.conv3d(x, self.weight, self.bias, stride=s, padding=p)
        else:
            if depth_stride == 1 and k not in (s, 3):
                raise ValueError(f"a {k}^3 kernel with stride {s} cannot run in-plane only")
            if depth_stride > 1 and k != s:
                raise ValueError(f"merging depth taps into {depth_stride} groups needs kernel == stride")
            weight = merge_depth_taps(self.weight, depth_stride)
            out = F.conv3d(x, weight, self.bias, stride=(depth_stride, s, s), padding=(0, p, p))
        return out, n + self.downsample_steps


class SpadConvTranspose3d(nn.ConvTranspose3d):
    """A transposed conv with kernel = stride = ``2^m`` that follows the SPAD rule.

    With ``remaining = max(n - aniso_d, 0)`` depth upsamplings still available, the depth stride is
    ``min(2^remaining, s)``; depth taps are summed into that many groups.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size=stride, stride=stride)
        self.downsample_steps = _log2(stride)

    def spad_forward(self, x: torch.Tensor, aniso_d: int, n: int) -> tuple[torch.Tensor, int]:
        s = self.stride[0]
        remaining = max(n - aniso_d, 0)
        depth_stride = min(2**remaining, s)
        weight = merge_depth_taps(self.weight, depth_stride)
        out = F.conv_transpose3d(x, weight, self.bias, stride=(depth_stride, s, s))
        return out, n - self.downsample_steps
