"""The attention core every family's attention layer shares.

A family's attention module projects its inputs its own way (separate or fused q/k/v, biases, rotary
embeddings, spatial reduction) and hands ``(B, heads, L, head_dim)`` tensors to :meth:`AttentionCore.attend`,
which dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS`` (``eager``, ``sdpa``, ``flash``,
``medfm_varlen``...) according to ``config._attn_implementation``, as transformers' own models do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["AttentionCore", "eager_attention_forward", "merge_heads", "split_heads"]


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


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, heads * head_dim)`` -> ``(B, L, heads, head_dim)`` (a view)."""
    return x.view(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, L, heads, head_dim)`` -> ``(B, L, heads * head_dim)``."""
    return x.reshape(*x.shape[:-2], -1)


class AttentionCore(nn.Module):
    """Base of attention layers: the ``config``, head sizes, scaling and the dispatch to the configured kernel.

    Args:
        config: A config with ``_attn_implementation`` (and ``attention_dropout``, 0 if absent).
        num_heads: Attention heads.
        head_dim: Width of a head.
    """

    def __init__(self, config: Any, num_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5
        self.is_causal = False

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``(B, heads, L, head_dim)`` inputs: ``(B, L, heads, head_dim)`` output and the weights
        (``None`` from fused kernels)."""
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = getattr(self.config, "attention_dropout", 0.0) if self.training else 0.0
        return interface(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=dropout, **kwargs
        )
