"""Patch masking for masked image modeling."""

from __future__ import annotations

import torch

__all__ = ["random_visible_indices", "visible_indices_from_mask"]


def random_visible_indices(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted indices ``(B, V)`` of visible tokens, ``V = int(num_tokens * (1 - mask_ratio))``, drawn
    uniformly without replacement per sample."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")
    visible = max(1, int(num_tokens * (1 - mask_ratio)))
    scores = torch.rand(batch_size, num_tokens, generator=generator, device="cpu")
    indices = scores.argsort(dim=1)[:, :visible].sort(dim=1).values
    return indices.to(device) if device is not None else indices


def visible_indices_from_mask(bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` sorted visible indices from a ``(B, L)`` mask (True = masked).

    Raises:
        ValueError: Samples have different numbers of visible tokens.
    """
    visible = ~bool_masked_pos.bool()
    counts = visible.sum(dim=1)
    if bool(counts.ne(counts[0]).any()):
        raise ValueError(f"every sample needs the same number of visible tokens; got {counts.tolist()}")
    positions = torch.arange(bool_masked_pos.shape[1], device=bool_masked_pos.device).expand_as(visible)
    return positions[visible].view(bool_masked_pos.shape[0], -1)
