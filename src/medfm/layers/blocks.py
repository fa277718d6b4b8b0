"""The pre-norm transformer block: ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``.

Families pass their own norm, attention and feed-forward modules (and subclass it, so that
``_no_split_modules`` and FSDP wrapping can name the family's block class). It is a transformers
``GradientCheckpointingLayer``, so activation checkpointing applies to it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .drop import DropPath

__all__ = ["PreNormBlock"]


class PreNormBlock(GradientCheckpointingLayer):
    """A residual pre-norm block.

    Args:
        norm1: Norm before the attention.
        attn: Attention module; called as ``attn(hidden, *args, **kwargs)`` and returning ``(output, weights)``.
        norm2: Norm before the feed-forward module.
        mlp: Feed-forward module.
        drop_path: Stochastic-depth probability of both residual branches.
    """

    def __init__(
        self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        attended, _ = self.attn(self.norm1(hidden_states), *args, **kwargs)
        hidden_states = hidden_states + self.drop_path(attended)
        return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
