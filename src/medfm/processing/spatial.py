"""Spatial helpers on ``(C, D, H, W)`` tensors: resizing, symmetric padding, and their exact inverses.

Every resize maps voxel *centres* the same way (``align_corners=False``): the field of view is kept,
and the new grid's affine follows from the old one (:func:`resized_affine`). Padding and cropping are
index shifts (:func:`shifted_affine`). Recording these operations as plain dicts lets a prediction on
the model's grid be mapped back onto the input's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ProcessorConfigError, VolumeShapeError
from ..memory import array_bytes, check_allocation

__all__ = [
    "INTERPOLATION_MODES",
    "crop",
    "pad_symmetric",
    "padding_to_multiple",
    "resize",
    "resized_affine",
    "shape_for_spacing",
    "shifted_affine",
    "undo_operations",
]

# Beyond this many voxels per axis a shape is only a number to refuse (the memory check does).
_MAX_AXIS = 10**30

#: Modes accepted by :func:`resize`. ``nearest`` is torch's ``nearest-exact`` (centre-aligned).
INTERPOLATION_MODES = ("nearest", "linear", "bilinear", "bicubic", "area")


def shape_for_spacing(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float | None]
) -> tuple[int, int, int]:
    """Grid shape that covers the same field of view at ``target`` spacing (``None`` keeps an axis).

    The shape is not checked against memory here (:func:`resize` does that); an axis that overflows a float
    is capped at 10^30 voxels, which no budget admits.
    """
    out = []
    for n, s, t in zip(shape, spacing, target):
        if t is None or n == 1:
            out.append(int(n))
            continue
        count = int(n) * float(s) / float(t)
        out.append(_MAX_AXIS if not count < _MAX_AXIS else max(1, round(count)))
    return tuple(out)  # type: ignore[return-value]


def resize(
    volume: torch.Tensor, shape: Sequence[int], mode: str = "linear", *, purpose: str = "a resize"
) -> torch.Tensor:
    """Resize a ``(C, D, H, W)`` float tensor to spatial ``shape``.

    ``linear`` is trilinear; ``bilinear``/``bicubic`` resize each slice in-plane and require ``D`` to stay
    the same (2D images, or in-plane resampling); ``nearest`` is for label maps; ``area`` averages.

    Args:
        volume: ``(C, D, H, W)`` float tensor.
        shape: Target ``(D, H, W)``.
        mode: One of :data:`INTERPOLATION_MODES`.
        purpose: What the resize is for, named in a memory error (``"the 'resample' step"``...).

    Raises:
        ProcessorConfigError: Unknown mode, or an in-plane mode asked to change the depth.
        MemoryBudgetError: The new grid (and the interpolation's temporary copy) would exceed the budget.
    """
    if mode not in INTERPOLATION_MODES:
        raise ProcessorConfigError(f"interpolation mode {mode!r} is not one of {INTERPOLATION_MODES}")
    shape = tuple(int(n) for n in shape)
    if tuple(volume.shape[1:]) == shape:
        return volume
    if any(n < 1 for n in shape):
        raise VolumeShapeError(f"cannot resize to {shape}; every axis needs at least one voxel")
    grid = (int(volume.shape[0]), *shape)
    check_allocation(
        2 * array_bytes(grid, np.float32),
        f"a {grid} float32 grid and an interpolation temporary of the same size ({purpose}, "
        f"{mode} from {tuple(int(n) for n in volume.shape)})",
        hint="check the input's spacing and the target spacing or size",
    )
    if mode in ("bilinear", "bicubic"):
        if shape[0] != volume.shape[1]:
            raise ProcessorConfigError(
                f"{mode} resizes in-plane only; depth {volume.shape[1]} -> {shape[0]} needs 'linear'"
            )
        slices = volume.permute(1, 0, 2, 3)  # slices become the batch
        out = F.interpolate(slices, size=shape[1:], mode=mode, align_corners=False)
        return out.permute(1, 0, 2, 3).contiguous()
    torch_mode = {"linear": "trilinear", "nearest": "nearest-exact", "area": "area"}[mode]
    kwargs: dict[str, Any] = {"align_corners": False} if torch_mode == "trilinear" else {}
    return F.interpolate(volume[None], size=shape, mode=torch_mode, **kwargs)[0]


def resized_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of a centre-aligned resize: new index ``i`` sits at old index ``(i + 0.5) * r - 0.5``."""
    ratio = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(ratio)
    index_map[:3, 3] = 0.5 * (ratio - 1.0)
    return affine @ index_map


def shifted_affine(affine: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """Affine after the grid origin moves by ``shift`` voxels (negative for padding before)."""
    index_map = np.eye(4)
    index_map[:3, 3] = shift
    return affine @ index_map


def padding_to_multiple(shape: Sequence[int], multiple: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric ``(before, after)`` pads that make each axis a multiple (the extra voxel goes after)."""
    pads = []
    for n, m in zip(shape, multiple):
        total = (-int(n)) % int(m)
        pads.append((total // 2, total - total // 2))
    return pads


def pad_symmetric(
    volume: torch.Tensor, pads: Sequence[tuple[int, int]], mode: str = "constant", value: float = 0.0
) -> torch.Tensor:
    """Pad the spatial axes of ``(C, D, H, W)`` by ``pads`` (one ``(before, after)`` per axis).

    Raises:
        VolumeShapeError: ``reflect`` padding wider than an axis allows (torch needs pad < axis length).
        MemoryBudgetError: The padded grid would exceed the memory budget.
    """
    flat: list[int] = []
    for before, after in reversed(pads):  # F.pad lists the last axis first
        flat += [before, after]
    if not any(flat):
        return volume
    grid = (int(volume.shape[0]), *(int(n) + b + a for n, (b, a) in zip(volume.shape[1:], pads)))
    check_allocation(
        array_bytes(grid, np.float32),
        f"a {grid} float32 padded grid ({mode} padding of {tuple(int(n) for n in volume.shape)})",
        hint="check the padding multiple",
    )
    if mode == "reflect":
        for n, (before, after) in zip(volume.shape[1:], pads):
            if max(before, after) >= int(n):
                raise VolumeShapeError(
                    f"reflect padding {tuple(pads)} needs every padded axis longer than its pad; "
                    f"the grid is {tuple(int(m) for m in volume.shape[1:])} (use mode 'replicate' or 'constant')"
                )
    if mode == "constant":
        return F.pad(volume, flat, mode="constant", value=value)
    return F.pad(volume[None], flat, mode=mode)[0]


def crop(volume: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Remove ``pads`` from the spatial axes of a ``(C, D, H, W)`` tensor (the inverse of padding)."""
    index = [slice(None)]
    for (before, after), n in zip(pads, volume.shape[1:]):
        index.append(slice(before, n - after))
    return volume[tuple(index)]


def undo_operations(volume: torch.Tensor, operations: Sequence[dict[str, Any]], mode: str) -> torch.Tensor:
    """Map a ``(C, D, H, W)`` tensor on a processed grid back to the grid before ``operations``.

    Args:
        volume: Values on the final grid (probabilities, or labels as float for ``mode="nearest"``).
        operations: The records the processor kept, in the order they were applied.
        mode: ``"linear"`` for probabilities and images, ``"nearest"`` for label maps.
    """
    for operation in reversed(operations):
        if operation["op"] == "pad":
            volume = crop(volume, operation["pads"])
        elif operation["op"] == "resize":
            volume = resize(
                volume,
                operation["from"],
                mode="nearest" if mode == "nearest" else "linear",
                purpose="mapping a prediction back onto the input grid",
            )
        else:
            raise ProcessorConfigError(f"unknown spatial operation record {operation!r}")
    return volume
