"""A simple feature pyramid on a plain ViT's tokens (Li et al., ViTDet, arXiv 2203.16527), as SPAD/PUMIT's
segmentation adapter builds it: four taps of the token sequence become maps at four scales."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .conv import InstanceNorm3d, conv_transpose, prefers_channels_last

__all__ = ["SimpleFeaturePyramid"]


class SimpleFeaturePyramid(nn.Module):
    """InstanceNorm per tap, then: level 0 upsampled twice (transposed conv, InstanceNorm, GELU, transposed
    conv), level 1 upsampled once, level 2 kept, level 3 max-pooled.

    Args:
        width: Token width.
        patch_size: The backbone's patch ``(D, H, W)``: the stride of level 2.
        fine_factors: Upsampling factors of level 0's two transposed convs (first, second).
        up_factor: Upsampling factor of level 1 (the same as level 0's first).
        down_factor: Pooling factor of level 3.
        num_prefix_tokens: Tokens before the patch tokens in each tap (dropped).

    Attributes:
        level_strides: Strides of the four levels relative to the input, finest first.
    """

    def __init__(
        self,
        width: int,
        patch_size: Sequence[int],
        fine_factors: tuple[Sequence[int], Sequence[int]],
        up_factor: Sequence[int],
        down_factor: Sequence[int],
        num_prefix_tokens: int = 1,
    ):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        first, second = (tuple(f) for f in fine_factors)
        self.norms = nn.ModuleList([InstanceNorm3d(width, affine=True) for _ in range(4)])
        self.fpn = nn.ModuleList(
            [
                nn.Sequential(
                    conv_transpose(width, width, first),
                    InstanceNorm3d(width, affine=True),
                    nn.GELU(),
                    conv_transpose(width, width, second),
                ),
                conv_transpose(width, width, tuple(up_factor)),
                nn.Identity(),
                nn.MaxPool3d(tuple(down_factor), stride=tuple(down_factor)),
            ]
        )
        patch = tuple(int(p) for p in patch_size)
        self.level_strides = [
            tuple(p // (a * b) for p, a, b in zip(patch, first, second)),
            tuple(p // u for p, u in zip(patch, up_factor)),
            patch,
            tuple(p * d for p, d in zip(patch, down_factor)),
        ]

    def forward(self, taps: list[torch.Tensor], grid: Sequence[int]) -> list[torch.Tensor]:
        """Maps ``(B, E, *level_grid)`` of four ``(B, prefix + N, E)`` taps on a token ``grid`` ``(D', H', W')``."""
        features = []
        for tap, norm, fpn in zip(taps, self.norms, self.fpn):
            volume = tap[:, self.num_prefix_tokens :].transpose(1, 2).unflatten(2, tuple(grid))
            # A small copy into the layout the convolutions want: channels-last for 16-bit ones (the upsampled
            # maps then come out channels-last with no reshuffle), contiguous for fp32. (The token view itself
            # is channels-last only up to the batch stride, which some kernels then do not take as such.)
            if prefers_channels_last(volume):
                volume = volume.clone(memory_format=torch.channels_last_3d)
            else:
                volume = volume.contiguous()
            features.append(fpn(norm(volume)))
        if features[-1].shape[2:].numel() < 2:
            raise ValueError(
                f"a token grid of {tuple(grid)} leaves the coarsest feature a single voxel, which instance norm "
                "cannot normalise; use a larger input (at least 2 x the level-3 stride on one axis)"
            )
        return features
