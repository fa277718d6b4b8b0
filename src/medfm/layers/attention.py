"""Attention through transformers' ``ALL_ATTENTION_FUNCTIONS``: ``eager`` here, ``sdpa`` and others from there."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["eager_attention_forward", "run_attention"]


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


def run_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    implementation: str | None,
    scaling: float,
    dropout: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to the configured attention implementation (``config._attn_implementation``).

    ``module`` must define ``is_causal = False`` for the transformers implementations. Extra keyword
    arguments (``cu_seqlens`` for packed sequences) reach implementations that take them.
    """
    interface = eager_attention_forward
    if implementation not in (None, "eager"):
        interface = ALL_ATTENTION_FUNCTIONS[implementation]
    return interface(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
