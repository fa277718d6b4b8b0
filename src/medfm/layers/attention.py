"""The eager attention function models pass to ``ALL_ATTENTION_FUNCTIONS.get_interface`` as the default."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["eager_attention_forward"]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scaling + mask) v`` on ``(B, heads, L, head_dim)``; returns ``(B, L, heads, head_dim)``
    and the attention weights (softmax in float32 for stability)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights
