"""Building blocks shared by medfm's model families (dimension-agnostic where that is natural)."""

from .attention import eager_attention_forward
from .masking import random_visible_indices, visible_indices_from_mask
from .mlp import SwiGLU
from .position import resample_position_grid
from .rope import FUSED_ROPE_ENV, Rope3D, TokenRotation, apply_interleaved_rope
from .varlen_attention import VARLEN_IMPLEMENTATION, block_diagonal_mask, register_varlen_attention

__all__ = [
    "FUSED_ROPE_ENV",
    "VARLEN_IMPLEMENTATION",
    "Rope3D",
    "SwiGLU",
    "TokenRotation",
    "apply_interleaved_rope",
    "block_diagonal_mask",
    "eager_attention_forward",
    "random_visible_indices",
    "register_varlen_attention",
    "resample_position_grid",
    "visible_indices_from_mask",
]
