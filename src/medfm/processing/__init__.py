"""Preprocessing: :class:`MedicalImageProcessor`, its serialisable steps, and task presets."""

from .image_processing_medical import MedicalBatchFeature, MedicalImageProcessor, ProcessedGrid
from .presets import PRESETS, Preset, get_preset, list_presets
from .steps import STEP_TYPES, ProcessingState, Step, step_from_dict

__all__ = [
    "PRESETS",
    "STEP_TYPES",
    "MedicalBatchFeature",
    "MedicalImageProcessor",
    "Preset",
    "ProcessedGrid",
    "ProcessingState",
    "Step",
    "get_preset",
    "list_presets",
    "step_from_dict",
]
