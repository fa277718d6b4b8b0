"""A UNet-style decoder over a four-level feature pyramid plus full-resolution branches on the raw input
(SPAD/PUMIT's segmentation decoder, spec §e; nnU-Net's conv units)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .conv import UpStep, conv_norm_act, prefers_channels_last, to_channels_last

__all__ = ["PyramidUNetDecoder"]


def _ratio(fine: Sequence[int], coarse: Sequence[int]) -> tuple[int, ...]:
    return tuple(c // f for f, c in zip(fine, coarse))


class PyramidUNetDecoder(nn.Module):
    """Laterals on the four pyramid levels, three up-steps fine-wards, then a half- and a full-resolution
    branch computed from the raw input that the last two up-steps join.

    Heads (1x1x1 convs) sit on the full-resolution, half-resolution, level-0 and level-1 maps; head 0 is the
    prediction, the others deep supervision.

    Args:
        in_channels: Channels of the raw input.
        feature_channels: Channels of the pyramid levels.
        lateral_channels: Widths of the four lateral levels (fine to coarse).
        full_res_channels: Widths of the full- and half-resolution branches.
        num_labels: Output classes.
        level_strides: Strides of the pyramid levels relative to the input (finest first).
    """

    def __init__(
        self,
        in_channels: int,
        feature_channels: int,
        lateral_channels: Sequence[int],
        full_res_channels: Sequence[int],
        num_labels: int,
        level_strides: Sequence[Sequence[int]],
    ):
        super().__init__()
        lateral = list(lateral_channels)
        full, half = full_res_channels
        self.laterals = nn.ModuleList([conv_norm_act(feature_channels, c, 1) for c in lateral])
        self.up_steps = nn.ModuleList(
            [
                UpStep(
                    lateral[i + 1], lateral[i], lateral[i], _ratio(level_strides[i], level_strides[i + 1]), 3
                )
                for i in (2, 1, 0)
            ]
        )
        depth0 = level_strides[0][0]
        half_depth = max(depth0 // 2, 1)
        self.full_res = conv_norm_act(in_channels, full, (1, 3, 3))
        # In-plane only, as upstream, unless depth is downsampled too: then 3 deep, so no slice is skipped.
        half_kernel = (1, 3, 3) if half_depth == 1 else (3, 3, 3)
        self.half_res = conv_norm_act(full, half, half_kernel, stride=(half_depth, 2, 2))
        factor_to_half = (depth0 // half_depth, level_strides[0][1] // 2, level_strides[0][2] // 2)
        self.up_to_half = UpStep(lateral[0], half, half, factor_to_half, (1, 3, 3))
        self.up_to_full = UpStep(half, full, full, (half_depth, 2, 2), (1, 3, 3))
        self.heads = nn.ModuleList(
            [nn.Conv3d(c, num_labels, 1) for c in (full, half, lateral[0], lateral[1])]
        )

    def forward(
        self, pixel_values: torch.Tensor, features: list[torch.Tensor], num_heads: int = 4
    ) -> list[torch.Tensor]:
        """Logits of the first ``num_heads`` heads, finest first, from the input and the pyramid levels (finest
        first). Inference needs only head 0; the others are deep supervision."""
        if prefers_channels_last(pixel_values):
            # 16-bit convolutions run several times faster with maps and kernels channels-last (each unit takes
            # a channels-last copy of its kernel per call: the parameters keep their layout).
            pixel_values, features = to_channels_last(pixel_values), [to_channels_last(f) for f in features]
        laterals = [lateral(f) for lateral, f in zip(self.laterals, features)]
        x = laterals[3]
        level_maps = {}
        for step, skip_index in zip(self.up_steps, (2, 1, 0)):
            x = step(x, laterals[skip_index])
            level_maps[skip_index] = x
        full = self.full_res(pixel_values)
        half = self.half_res(full)
        half_map = self.up_to_half(level_maps[0], half)
        full_map = self.up_to_full(half_map, full)
        maps = [full_map, half_map, level_maps[0], level_maps[1]]
        return [head(m).contiguous() for head, m in zip(self.heads[:num_heads], maps)]
