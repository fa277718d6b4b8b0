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

__all__ = ["FAMILIES", "FamilyEntry", "family_of", "register_all"]


@dataclass(frozen=True)
class FamilyEntry:
    """One configuration, the model classes transformers' Auto classes build from it, and its PEFT preset.

    Attributes:
        config: The configuration class (its ``model_type`` is the key).
        models: Auto class -> model class.
        processor: The image processor class.
        on_register: Callables run once at registration (e.g. weight-conversion hooks).
        adapter_targets: Regex of the Linear layers LoRA/DoRA adapt (attention and MLP projections).
        trainable_heads: Model class -> names of new modules trained in full next to the adapters.
    """

    config: type
    models: dict[type, type]
    processor: type | None = MedicalImageProcessor
    on_register: tuple[Callable[[], None], ...] = field(default_factory=tuple)
    adapter_targets: str | None = None
    trainable_heads: dict[type, tuple[str, ...]] = field(default_factory=dict)


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
        adapter_targets=r".*blocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|proj)|mlp\.(w1|w2|w3))",
        trainable_heads={
            SpadViTForImageClassification: ("classifier",),
            SpadViTForSemanticSegmentation: ("pyramid", "decoder"),
            SpadViTForMaskedImageModeling: ("mim_head",),
        },
    ),
    FamilyEntry(SpadVTConfig, {AutoModel: SpadVTModel}),
)


def family_of(model_type: str) -> FamilyEntry:
    """The entry whose config has ``model_type``.

    Raises:
        KeyError: No family has it (the message lists those that exist).
    """
    for entry in FAMILIES:
        if entry.config.model_type == model_type:
            return entry
    raise KeyError(
        f"no medfm family has model_type {model_type!r}; known: {[e.config.model_type for e in FAMILIES]}"
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
