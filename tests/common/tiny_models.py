"""Tiny medfm models the tests share."""

from __future__ import annotations

from pathlib import Path

from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling, SpadViTForSemanticSegmentation
from medfm.processing import MedicalImageProcessor

TISSUES = {0: "background", 1: "grey matter", 2: "white matter"}

#: The backbone of the tiny SPAD-ViTs the tests build (a few thousand parameters).
TINY_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    pos_embed_shape=(2, 2, 2),
)


def tiny_segmentation_config(**overrides) -> SpadViTConfig:
    """A fixed-patch, 1-channel, 3-label SPAD-ViT segmentation config of a few thousand parameters."""
    settings = dict(
        **TINY_VIT,
        patch_size=(4, 16, 16),
        adaptive_patch_embed=False,
        in_channels=1,
        num_labels=3,
        decoder_lateral_channels=(8, 8, 16, 16),
        decoder_full_res_channels=(4, 8),
        id2label=TISSUES,
    )
    settings.update(overrides)
    return SpadViTConfig(**settings)


def tiny_segmentation_processor() -> MedicalImageProcessor:
    """4 mm, percentile-clipped, padded to the coarsest stride of :func:`tiny_segmentation_config`."""
    return MedicalImageProcessor(
        steps=[
            {"name": "resample", "spacing": [4.0, 4.0, 4.0]},
            {"name": "percentile_clip"},
            {"name": "pad_to_multiple", "multiple": [8, 32, 32]},
        ]
    )


def save_tiny_segmentation_model(folder: Path) -> SpadViTForSemanticSegmentation:
    """Save a tiny segmentation model and its processor to ``folder``; return the model."""
    model = SpadViTForSemanticSegmentation(tiny_segmentation_config()).eval()
    model.save_pretrained(folder)
    tiny_segmentation_processor().save_pretrained(folder)
    return model


def save_tiny_pretrained_vit(folder: Path) -> Path:
    """Save a tiny pre-trained-style SPAD-ViT (adaptive patch, RGB, with the MIM head) to ``folder``."""
    SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT)).save_pretrained(folder)
    return folder
