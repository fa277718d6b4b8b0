"""Patch masking for masked image modeling, driven by explicit noise so every mask can be replayed.

MAE convention (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022): per sample, the
tokens with the smallest noise stay visible. Block-wise masks (SimMIM-style mask units in VIS-MAE, MiM's
group masking) come from noise drawn per block and repeated to the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "block_mask",
    "block_noise",
    "gather_tokens",
    "mask_from_noise",
    "mask_from_visible_indices",
    "random_masking",
    "random_visible_indices",
    "repeat_group_noise",
    "replace_tokens",
    "scatter_tokens",
    "visible_indices_from_mask",
]


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


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")


def mask_from_noise(
    noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's mask from ``(B, L)`` noise: the ``V = int(L * (1 - mask_ratio))`` smallest values stay visible.

    The sort is stable, so repeated (block) noise always breaks ties the same way.

    Returns:
        ``mask`` ``(B, L)`` float32, 1 = masked, in token order; ``ids_restore`` ``(B, L)``, the inverse of the
        shuffle (feed it to :func:`scatter_tokens`); ``ids_keep`` ``(B, V)``, visible token indices in
        ascending-noise order (MAE's order, not sorted by position).

    Raises:
        ValueError: ``noise`` is not 2D or the ratio is outside ``[0, 1)``.
    """
    _check_ratio(mask_ratio)
    if noise.ndim != 2:
        raise ValueError(f"noise must be (batch, tokens); got shape {tuple(noise.shape)}")
    batch, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return mask, ids_restore, ids_shuffle[:, :keep]


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``tokens[b, ids[b, k]]`` for ``(B, L, E)`` tokens and ``(B, K)`` indices, giving ``(B, K, E)``."""
    if tokens.ndim != 3 or ids.ndim != 2 or ids.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"expected tokens (B, L, E) and ids (B, K) with the same B; got {tuple(tokens.shape)} "
            f"and {tuple(ids.shape)}"
        )
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(
    visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """Undo :func:`random_masking`: append mask tokens after the visible ones and unshuffle to ``(B, L, E)``.

    Args:
        visible: ``(B, V, E)`` tokens in the order of ``ids_keep``.
        ids_restore: ``(B, L)`` from :func:`mask_from_noise`.
        mask_token: Broadcastable to ``(B, L - V, E)``, e.g. a ``(1, 1, E)`` parameter.
    """
    if visible.ndim != 3 or ids_restore.ndim != 2 or ids_restore.shape[0] != visible.shape[0]:
        raise ValueError(
            f"expected visible (B, V, E) and ids_restore (B, L) with the same B; got {tuple(visible.shape)} "
            f"and {tuple(ids_restore.shape)}"
        )
    batch, kept, width = visible.shape
    missing = ids_restore.shape[1] - kept
    if missing < 0:
        raise ValueError(f"{kept} visible tokens do not fit {ids_restore.shape[1]} positions")
    fill = mask_token.to(visible.dtype).expand(batch, missing, width)
    return gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)


def random_masking(
    tokens: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop a random ``mask_ratio`` of each sample's tokens, as MAE's encoder does.

    Args:
        tokens: ``(B, L, E)``.
        mask_ratio: Fraction to mask, in ``[0, 1)``; ``V = int(L * (1 - mask_ratio))`` tokens stay.
        noise: ``(B, L)`` scores to replay a mask (smallest stay visible); drawn ``U(0, 1)`` when ``None``.
        generator: Used to draw the noise, on the generator's device.

    Returns:
        ``(visible (B, V, E), mask (B, L) float32 with 1 = masked, ids_restore (B, L), ids_keep (B, V))``.

    Raises:
        ValueError: ``tokens`` is not 3D, or ``noise`` does not have shape ``(B, L)``.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (batch, length, width); got shape {tuple(tokens.shape)}")
    batch, length = tokens.shape[:2]
    if noise is None:
        device = generator.device if generator is not None else tokens.device
        noise = torch.rand(batch, length, generator=generator, device=device)
    elif tuple(noise.shape) != (batch, length):
        raise ValueError(f"noise must have shape {(batch, length)}; got {tuple(noise.shape)}")
    mask, ids_restore, ids_keep = mask_from_noise(noise.to(tokens.device), mask_ratio)
    return gather_tokens(tokens, ids_keep), mask, ids_restore, ids_keep


def repeat_group_noise(noise: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat ``(B, G)`` noise to ``(B, G * group_size)``: groups of **consecutive** token indices.

    This is MiM's up-level group masking (spec §2.2, quirk Q1): noise ``(B, 8)`` repeated 27 times masks
    runs of 27 raster-order tokens of the 6x6x6 grid, not 3x3x3 cubes. Pick a ratio that keeps whole groups
    (``int(L * (1 - ratio))`` a multiple of ``group_size``); for spatial blocks use :func:`block_noise`.
    """
    if noise.ndim != 2 or group_size < 1:
        raise ValueError(f"expected noise (B, G) and group_size >= 1; got {tuple(noise.shape)}, {group_size}")
    return noise.repeat_interleave(group_size, dim=1)


def _block_grid(
    grid_size: Sequence[int], block_size: int | Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(block, coarse grid) after checking that the blocks tile the token grid."""
    grid = tuple(int(g) for g in grid_size)
    block = (
        (int(block_size),) * len(grid) if isinstance(block_size, int) else tuple(int(b) for b in block_size)
    )
    if len(grid) not in (2, 3) or len(block) != len(grid) or min(block) < 1:
        raise ValueError(f"expected a 2D or 3D grid and a matching block size; got {grid_size}, {block_size}")
    if any(g % b for g, b in zip(grid, block)):
        raise ValueError(f"token grid {grid} is not a multiple of the mask block {block}")
    return block, tuple(g // b for g, b in zip(grid, block))


def block_noise(
    noise: torch.Tensor, grid_size: Sequence[int], block_size: int | Sequence[int]
) -> torch.Tensor:
    """Repeat noise drawn on a coarse grid of blocks to a 2D/3D token grid: ``(B, U)`` to ``(B, L)``.

    Blocks (mask units) are enumerated in raster order over the coarse grid ``grid_size / block_size``, and
    each covers a ``block_size`` box of tokens; the result is in raster order over the token grid.
    """
    block, coarse = _block_grid(grid_size, block_size)
    units = math.prod(coarse)
    if noise.ndim != 2 or noise.shape[1] != units:
        raise ValueError(f"noise must be (B, {units}) for {coarse} blocks; got {tuple(noise.shape)}")
    out = noise.reshape(noise.shape[0], *coarse)
    for axis, b in enumerate(block):
        out = out.repeat_interleave(b, dim=axis + 1)
    return out.reshape(noise.shape[0], -1)


def block_mask(
    noise: torch.Tensor, grid_size: Sequence[int], block_size: int | Sequence[int], mask_ratio: float
) -> torch.Tensor:
    """Block-wise mask ``(B, L)`` (float32, 1 = masked) in token raster order, from per-block noise ``(B, U)``.

    The ``int(U * (1 - mask_ratio))`` blocks with the smallest noise stay visible, counted on blocks rather
    than tokens: VIS-MAE's window masking (spec §2; 4x4-patch units, SimMIM's "mask patch" of 16 px over a
    4 px model patch). Nothing is dropped here: a model replaces masked tokens by a mask token.
    """
    unit_mask = mask_from_noise(noise, mask_ratio)[0]
    return block_noise(unit_mask, grid_size, block_size)


def mask_from_visible_indices(
    bool_masked_pos: torch.Tensor | None,
    visible_indices: torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device | str,
) -> torch.Tensor | None:
    """The ``(B, L)`` mask (True = masked) given as a mask, as sorted visible indices, or both (which must agree);
    ``None`` when neither is given.

    Raises:
        ValueError: A mask of the wrong shape, or a mask and indices that disagree.
    """
    if visible_indices is not None:
        masked = torch.ones(batch, length, dtype=torch.bool, device=device)
        masked.scatter_(1, visible_indices.to(device), False)
        if bool_masked_pos is not None and not torch.equal(masked, bool_masked_pos.bool().to(device)):
            raise ValueError("bool_masked_pos and visible_indices disagree; pass one of them")
        return masked
    if bool_masked_pos is None:
        return None
    if tuple(bool_masked_pos.shape) != (batch, length):
        raise ValueError(
            f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}; expected ({batch}, {length})"
        )
    return bool_masked_pos.bool().to(device)


def replace_tokens(tokens: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``tokens`` ``(B, L, E)`` with rows ``ids`` ``(B, V)`` replaced by ``values`` ``(B, V, E)`` (out of place):
    the inverse of :func:`gather_tokens` for layers that run on the visible tokens only."""
    return tokens.scatter(1, ids[..., None].expand(-1, -1, tokens.shape[-1]), values)
