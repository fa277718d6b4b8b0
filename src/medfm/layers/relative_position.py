"""N-dimensional relative position bias (Liu et al., "Swin Transformer", ICCV 2021), for 2D and 3D windows.

A learned table holds one value per head for every possible offset between two positions of a window of size
``(w_1, ..., w_n)``: ``prod(2 w_i - 1)`` rows. A fixed index maps each (query, key) pair to its row. MiM's
fine-tuning encoder uses the 3D form over its whole stage-4 grid (spec §1.2); VIS-MAE the 2D Swin form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RelativePositionBias", "relative_position_index"]


def _window(window_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(w) for w in window_size)
    if not size or any(w < 1 for w in size):
        raise ValueError(f"window_size must be a non-empty sequence of positive ints; got {window_size!r}")
    return size


def relative_position_index(window_size: Sequence[int]) -> torch.Tensor:
    """Row of the bias table for every (query, key) pair of a window, ``(N, N)`` int64 with ``N = prod(w)``.

    Positions are enumerated in raster order (``meshgrid(indexing="ij")``, last axis fastest). The offset
    along axis ``i`` is shifted by ``w_i - 1`` to be non-negative, and offsets are combined as mixed-radix
    digits with radices ``2 w_i - 1``, most significant first: in 3D ``r0 (2w1-1)(2w2-1) + r1 (2w2-1) + r2``.

    Raises:
        ValueError: ``window_size`` is empty or holds a non-positive size.
    """
    size = _window(window_size)
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in size], indexing="ij")).flatten(1)  # (n, N)
    relative = coords[:, :, None] - coords[:, None, :]  # (n, N, N)
    index = torch.zeros(relative.shape[1:], dtype=torch.long)
    for axis, w in enumerate(size):
        index = index * (2 * w - 1) + relative[axis] + (w - 1)
    return index


class RelativePositionBias(nn.Module):
    """Learned relative position bias for one attention layer, returned as ``(heads, N, N)``.

    The index is a non-persistent buffer: it is rebuilt from ``window_size`` and never read from (or written
    to) a checkpoint, so upstream ``relative_position_index`` keys are dropped on conversion.

    Args:
        window_size: Window (or whole grid) size per spatial axis, 2 or 3 entries in practice.
        num_heads: Attention heads.

    Attributes:
        relative_position_bias_table: ``(prod(2 w - 1), heads)``, zero-initialised (MiM's init; Swin draws
            trunc-normal(0.02), which a model's ``_init_weights`` may apply).
    """

    def __init__(self, window_size: Sequence[int], num_heads: int):
        super().__init__()
        self.window_size = _window(window_size)
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive; got {num_heads}")
        rows = 1
        for w in self.window_size:
            rows *= 2 * w - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window_size), persistent=False
        )

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()
