"""Building blocks shared by medfm's model families (dimension-agnostic, ``spatial_dims``, where natural).

Each module is small and tested on its own in ``tests/layers/``; a family subclasses or composes them and
keeps only what is its own. Decoders live in :mod:`medfm.layers.decoders` (one module each).
"""

from .anisotropy import TWO_D_ANISO_D, aniso_d_from_spacing, grid_anisotropy
from .attention import AttentionCore, eager_attention_forward, merge_heads, split_heads
from .blocks import PreNormBlock
from .drop import DropPath, drop_path, drop_path_rates
from .heads import ClassificationHead, pool_tokens
from .losses import (
    deep_supervision_loss,
    deep_supervision_weights,
    masked_reconstruction_loss,
    soft_target_cross_entropy,
)
from .masking import (
    block_mask,
    block_noise,
    gather_tokens,
    mask_from_noise,
    random_masking,
    random_visible_indices,
    repeat_group_noise,
    scatter_tokens,
    visible_indices_from_mask,
)
from .mlp import SwiGLU
from .norm import ChannelsFirstLayerNorm
from .patch_embed import PatchEmbed, check_divisible, patchify, unpatchify
from .position import resample_position_grid, sincos_1d_table, sincos_position_table
from .relative_position import RelativePositionBias, relative_position_index
from .rope import FUSED_ROPE_ENV, Rope3D, TokenRotation, apply_interleaved_rope
from .varlen_attention import VARLEN_IMPLEMENTATION, block_diagonal_mask, register_varlen_attention

__all__ = [
    "FUSED_ROPE_ENV",
    "TWO_D_ANISO_D",
    "VARLEN_IMPLEMENTATION",
    "AttentionCore",
    "ChannelsFirstLayerNorm",
    "ClassificationHead",
    "DropPath",
    "PatchEmbed",
    "PreNormBlock",
    "RelativePositionBias",
    "Rope3D",
    "SwiGLU",
    "TokenRotation",
    "aniso_d_from_spacing",
    "apply_interleaved_rope",
    "block_diagonal_mask",
    "block_mask",
    "block_noise",
    "check_divisible",
    "deep_supervision_loss",
    "deep_supervision_weights",
    "drop_path",
    "drop_path_rates",
    "eager_attention_forward",
    "gather_tokens",
    "grid_anisotropy",
    "mask_from_noise",
    "masked_reconstruction_loss",
    "merge_heads",
    "patchify",
    "pool_tokens",
    "random_masking",
    "random_visible_indices",
    "register_varlen_attention",
    "relative_position_index",
    "repeat_group_noise",
    "resample_position_grid",
    "scatter_tokens",
    "sincos_1d_table",
    "sincos_position_table",
    "soft_target_cross_entropy",
    "split_heads",
    "unpatchify",
    "visible_indices_from_mask",
]
