"""Feed-forward blocks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """``w3(norm(SiLU(w1 x) * w2 x))``: the gated MLP of EVA-02 with its optional "sub-LN".

    Args:
        dim: Input and output width.
        hidden: Width of the gated hidden layer.
        sub_norm_eps: LayerNorm epsilon of the hidden norm (``ffn_ln``); ``None`` for no norm.
    """

    def __init__(self, dim: int, hidden: int, sub_norm_eps: float | None = 1e-5):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=sub_norm_eps) if sub_norm_eps is not None else nn.Identity()
        self.w3 = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))
