"""Patch embedding and patchify/unpatchify for 2D and 3D images (Dosovitskiy et al., "An Image is Worth
16x16 Words", ICLR 2021; He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["PatchEmbed", "check_divisible", "patchify", "unpatchify"]


def _as_tuple(value: int | Sequence[int], spatial_dims: int, what: str) -> tuple[int, ...]:
    size = (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != spatial_dims or any(v < 1 for v in size):
        raise ValueError(f"{what} must be a positive int or {spatial_dims} positive ints; got {value!r}")
    return size


def check_divisible(
    spatial_shape: Sequence[int], multiple: int | Sequence[int], what: str = "the patch"
) -> None:
    """Raise a ValueError that says how to fix it when ``spatial_shape`` is not a multiple of ``multiple``."""
    shape = tuple(int(s) for s in spatial_shape)
    size = _as_tuple(multiple, len(shape), what)
    if any(s % m for s, m in zip(shape, size)):
        raise ValueError(
            f"input size {shape} is not a multiple of {what} {size}; "
            "pad the input (e.g. a pad_to_multiple processor step)"
        )


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a ``ConvNd`` with kernel = stride = patch, then an optional norm.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        hidden_size: Embedding width.
        patch_size: One int or one per spatial axis.
        bias: Bias of the projection.
        norm_layer: Called with ``hidden_size`` to build a norm over the channel (last) dimension of the
            tokens, e.g. ``partial(nn.LayerNorm, eps=1e-6)``; ``None`` for none.
        flatten: Return tokens ``(B, L, hidden)`` in raster order over the patch grid; otherwise the map
            ``(B, hidden, *grid)``.

    Attributes:
        proj: The convolution (upstream ``patch_embed.proj``); norm: the norm or ``nn.Identity``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_size: int,
        patch_size: int | Sequence[int],
        bias: bool = True,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten: bool = True,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.patch_size = _as_tuple(patch_size, spatial_dims, "patch_size")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, hidden_size, self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(hidden_size) if norm_layer is not None else nn.Identity()
        self.flatten = flatten

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != self.spatial_dims + 2 or pixel_values.shape[1] != self.in_channels:
            raise ValueError(
                f"expected pixel_values (B, {self.in_channels}, {'D, H, W' if self.spatial_dims == 3 else 'H, W'});"
                f" got shape {tuple(pixel_values.shape)}"
            )
        check_divisible(pixel_values.shape[2:], self.patch_size)
        x = self.proj(pixel_values)
        grid = x.shape[2:]
        x = self.norm(x.flatten(2).transpose(1, 2))  # the norm acts on channel-last tokens
        if self.flatten:
            return x
        return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)


def patchify(
    pixel_values: torch.Tensor, patch_size: int | Sequence[int], channels_last: bool = True
) -> torch.Tensor:
    """Cut ``(B, C, *spatial)`` (2D or 3D) into ``(B, L, prod(patch) * C)`` non-overlapping patches.

    Patches are in raster order over the patch grid (last axis fastest). Inside a patch the values are ordered
    ``(p_1, ..., p_n, c)`` when ``channels_last`` (MAE and VIS-MAE, spec §2: ``(p, q, c)``), or
    ``(c, p_1, ..., p_n)`` otherwise. MiM's targets are single-channel, ``(p1, p2, p3)``: both orders agree.

    Raises:
        ValueError: Not a 4D/5D tensor, or spatial size not a multiple of the patch.
    """
    if pixel_values.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W); got shape {tuple(pixel_values.shape)}")
    n = pixel_values.ndim - 2
    patch = _as_tuple(patch_size, n, "patch_size")
    check_divisible(pixel_values.shape[2:], patch)
    batch, channels = pixel_values.shape[:2]
    grid = [s // p for s, p in zip(pixel_values.shape[2:], patch)]
    # (B, C, g1, p1, ..., gn, pn) -> (B, g1..gn, p1..pn, C) or (B, g1..gn, C, p1..pn)
    x = pixel_values.reshape(batch, channels, *[v for gp in zip(grid, patch) for v in gp])
    grid_axes = [2 + 2 * i for i in range(n)]
    patch_axes = [3 + 2 * i for i in range(n)]
    inner = [*patch_axes, 1] if channels_last else [1, *patch_axes]
    x = x.permute(0, *grid_axes, *inner)
    return x.reshape(batch, -1, channels * math.prod(patch))


def unpatchify(
    tokens: torch.Tensor,
    patch_size: int | Sequence[int],
    grid: Sequence[int],
    channels: int,
    channels_last: bool = True,
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, prod(patch) * C)`` to ``(B, C, *(grid * patch))``.

    Raises:
        ValueError: ``L`` or the patch width do not match ``grid``, ``patch_size`` and ``channels``.
    """
    grid = tuple(int(g) for g in grid)
    n = len(grid)
    if n not in (2, 3):
        raise ValueError(f"grid must have 2 or 3 axes; got {grid}")
    patch = _as_tuple(patch_size, n, "patch_size")
    length = math.prod(grid)
    width = channels * math.prod(patch)
    if tokens.ndim != 3 or tokens.shape[1] != length or tokens.shape[2] != width:
        raise ValueError(
            f"expected tokens (B, {length}, {width}) for grid {grid}, patch {patch} and {channels} "
            f"channels; got shape {tuple(tokens.shape)}"
        )
    batch = tokens.shape[0]
    inner = [*patch, channels] if channels_last else [channels, *patch]
    x = tokens.reshape(batch, *grid, *inner)
    patch_axes = [1 + n + i + (0 if channels_last else 1) for i in range(n)]
    channel_axis = 1 + 2 * n if channels_last else 1 + n
    order = [0, channel_axis] + [a for i in range(n) for a in (1 + i, patch_axes[i])]
    x = x.permute(*order)
    return x.reshape(batch, channels, *[g * p for g, p in zip(grid, patch)])
