"""The table of model families: which config goes with which model class for each Auto class.

A family plugs in by adding one :class:`FamilyEntry` to :data:`FAMILIES`; ``import medfm`` registers
everything listed here with transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForSemanticSegmentation,
)

from ..processing import MedicalImageProcessor
from .spad import (
    SpadViTConfig,
    SpadViTForImageClassification,
    SpadViTForMaskedImageModeling,
    SpadViTForSemanticSegmentation,
    SpadViTModel,
    SpadVTConfig,
    SpadVTModel,
)
from .spad.convert_spad import register_spad_weight_adaptation

__all__ = ["FAMILIES", "FamilyEntry", "register_all"]


@dataclass(frozen=True)
class FamilyEntry:
    """One configuration and the model classes transformers' Auto classes should build from it."""

    config: type
    models: dict[type, type]
    processor: type | None = MedicalImageProcessor
    on_register: tuple[Callable[[], None], ...] = field(default_factory=tuple)


FAMILIES: tuple[FamilyEntry, ...] = (
    FamilyEntry(
        SpadViTConfig,
        {
            AutoModel: SpadViTModel,
            AutoModelForMaskedImageModeling: SpadViTForMaskedImageModeling,
            AutoModelForImageClassification: SpadViTForImageClassification,
            AutoModelForSemanticSegmentation: SpadViTForSemanticSegmentation,
        },
        on_register=(register_spad_weight_adaptation,),
    ),
    FamilyEntry(SpadVTConfig, {AutoModel: SpadVTModel}),
)


def register_all() -> None:
    """Register every family's config, models and processor with transformers (idempotent)."""
    for entry in FAMILIES:
        AutoConfig.register(entry.config.model_type, entry.config, exist_ok=True)
        for auto_class, model_class in entry.models.items():
            auto_class.register(entry.config, model_class, exist_ok=True)
        if entry.processor is not None:
            AutoImageProcessor.register(
                entry.config,
                image_processor_classes={"pil": entry.processor, "torchvision": entry.processor},
                exist_ok=True,
            )
        for hook in entry.on_register:
            hook()
