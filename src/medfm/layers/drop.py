"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016) and its rate schedule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DropPath", "drop_path", "drop_path_rates"]


def drop_path(
    x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``drop_prob``.

    One Bernoulli draw per sample (dimension 0) is broadcast over all other dimensions, so any layout works
    (tokens ``(B, L, C)`` or maps ``(B, C, *spatial)``). Kept samples are divided by ``1 - drop_prob`` when
    ``scale_by_keep`` so the expected value is unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        keep.div_(keep_prob)
    return x * keep


class DropPath(nn.Module):
    """Per-sample stochastic depth for residual branches; the identity in eval mode or when ``drop_prob == 0``.

    Args:
        drop_prob: Probability of dropping a sample's branch, in ``[0, 1]``.
        scale_by_keep: Divide kept samples by ``1 - drop_prob``.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> torch.Tensor:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1]; got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def drop_path_rates(
    drop_path_rate: float, depth: int | None = None, *, depths: Sequence[int] | None = None
) -> list[float] | list[list[float]]:
    """Drop-path rates rising linearly from 0 to ``drop_path_rate`` over all blocks.

    Values are ``torch.linspace(0, rate, n)`` converted to Python floats, the float32 numbers the MAE/Swin/timm
    code bases compute. With ``depths`` the schedule runs over ``sum(depths)`` blocks and is cut into one list
    per stage: MiM spreads 0.2 over its 2+2+2+11 conv and transformer blocks, VIS-MAE spreads 0.1 over the
    Swin stages (its decoder stages reuse the encoder's slices, so index the result by stage).

    Args:
        drop_path_rate: The rate of the last block.
        depth: Number of blocks of a single stack; returns one flat list.
        depths: Blocks per stage; returns one list per stage. Give exactly one of ``depth`` and ``depths``.

    Raises:
        ValueError: Neither or both of ``depth``/``depths`` given, a negative count, or a rate outside [0, 1].
    """
    if (depth is None) == (depths is None):
        raise ValueError("give exactly one of depth (one stack) or depths (blocks per stage)")
    if not 0.0 <= drop_path_rate <= 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1]; got {drop_path_rate}")
    counts = [depth] if depths is None else [int(d) for d in depths]
    if any(c < 0 for c in counts):
        raise ValueError(f"block counts must be non-negative; got {counts}")
    rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(counts))]
    if depths is None:
        return rates
    stages, start = [], 0
    for count in counts:
        stages.append(rates[start : start + count])
        start += count
    return stages
