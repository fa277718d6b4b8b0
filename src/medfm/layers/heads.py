"""Token pooling and a linear classification head for ViT-style encoders."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["ClassificationHead", "pool_tokens"]

Pooling = Literal["cls", "mean"]


def pool_tokens(
    hidden_states: torch.Tensor, pooling: Pooling = "cls", num_prefix_tokens: int = 1
) -> torch.Tensor:
    """One vector per sample from ``(B, L, C)`` tokens.

    Args:
        hidden_states: ``(B, L, C)``; the first ``num_prefix_tokens`` are class/register tokens.
        pooling: ``"cls"``: the first token; ``"mean"``: the mean of the patch tokens (prefix tokens excluded,
            as MAE's ``global_pool`` and MiM's classifier do).
        num_prefix_tokens: Tokens before the patch tokens.

    Raises:
        ValueError: Unknown pooling, ``"cls"`` without a prefix token, or no patch token to average.
    """
    if hidden_states.ndim != 3:
        raise ValueError(
            f"hidden_states must be (batch, tokens, width); got shape {tuple(hidden_states.shape)}"
        )
    if pooling == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("cls pooling needs a class token (num_prefix_tokens >= 1); use pooling='mean'")
        return hidden_states[:, 0]
    if pooling == "mean":
        if hidden_states.shape[1] <= num_prefix_tokens:
            raise ValueError(
                f"no patch tokens to average: {hidden_states.shape[1]} tokens, {num_prefix_tokens} prefix"
            )
        return hidden_states[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pooling must be 'cls' or 'mean'; got {pooling!r}")


class ClassificationHead(nn.Module):
    """Pool, optionally LayerNorm, dropout, then ``Linear(hidden_size, num_labels)``.

    Args:
        hidden_size: Token width.
        num_labels: Output classes.
        pooling: See :func:`pool_tokens`.
        num_prefix_tokens: Tokens before the patch tokens.
        norm: ``None`` or ``"layernorm"``.
        dropout: Dropout before the classifier.
        layer_norm_eps: Epsilon of the norm.
        norm_before_pool: Normalise every token and then pool (VIS-MAE's classifier, spec §6: LN, then mean)
            instead of pooling first and normalising the pooled vector (MiM's classifier, spec §4.2).

    Attributes:
        norm: the LayerNorm or ``nn.Identity``; classifier: the Linear layer.
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        pooling: Pooling = "cls",
        num_prefix_tokens: int = 1,
        norm: Literal["layernorm"] | None = None,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-6,
        norm_before_pool: bool = False,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean'; got {pooling!r}")
        if norm not in (None, "layernorm"):
            raise ValueError(f"norm must be None or 'layernorm'; got {norm!r}")
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.norm_before_pool = norm_before_pool
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if norm == "layernorm" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.norm_before_pool:
            pooled = pool_tokens(self.norm(hidden_states), self.pooling, self.num_prefix_tokens)
        else:
            pooled = self.norm(pool_tokens(hidden_states, self.pooling, self.num_prefix_tokens))
        return self.classifier(self.dropout(pooled))
