"""Pre-training objectives: one base class (:class:`PretrainingObjective`), one module per family, and the
:data:`OBJECTIVES` table built from the family records."""

from .base import (
    OBJECTIVES,
    DataRecipe,
    PretrainingObjective,
    build_objective,
    clip_gradients,
    default_parameter_groups,
    per_tensor_clip,
    unwrap_objective,
)
from .spad import SpadMaskedImageModeling, SpadTokenizerTraining, random_projection_tokenizer

__all__ = [
    "OBJECTIVES",
    "DataRecipe",
    "PretrainingObjective",
    "SpadMaskedImageModeling",
    "SpadTokenizerTraining",
    "build_objective",
    "clip_gradients",
    "default_parameter_groups",
    "per_tensor_clip",
    "random_projection_tokenizer",
    "unwrap_objective",
]
