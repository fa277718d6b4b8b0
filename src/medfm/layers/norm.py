"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelsFirstLayerNorm"]


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``(B, C, *spatial)`` tensor, for 2D and 3D feature maps alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)
