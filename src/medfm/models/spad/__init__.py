"""SPAD / PUMIT: SPAD-ViT and the SPAD-VT tokenizer (Luo et al., arXiv 2312.07630)."""

from .configuration_spad import SpadViTConfig, SpadVTConfig
from .modeling_spad import (
    SpadViTForImageClassification,
    SpadViTForMaskedImageModeling,
    SpadViTForSemanticSegmentation,
    SpadViTMaskedImageModelingOutput,
    SpadViTModel,
    SpadViTPreTrainedModel,
    SpadViTSegmentationOutput,
)
from .modeling_spad_vt import SpadVTEncoderOutput, SpadVTModel, SpadVTOutput
from .spad_conv import aniso_d_from_spacing

__all__ = [
    "SpadVTConfig",
    "SpadVTEncoderOutput",
    "SpadVTModel",
    "SpadVTOutput",
    "SpadViTConfig",
    "SpadViTForImageClassification",
    "SpadViTForMaskedImageModeling",
    "SpadViTForSemanticSegmentation",
    "SpadViTMaskedImageModelingOutput",
    "SpadViTModel",
    "SpadViTPreTrainedModel",
    "SpadViTSegmentationOutput",
    "aniso_d_from_spacing",
]
