"""Tiny medfm models the tests share."""

from __future__ import annotations

from pathlib import Path

import torch

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


#: A tiny SPAD-ViT backbone whose position table is resampled for every volume of :func:`mixed_volumes`.
TINY_PACKING_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=85,
    pos_embed_shape=(2, 3, 3),
)


def mixed_volumes() -> list[tuple[torch.Tensor, tuple[float, float, float] | None]]:
    """Volumes of different shapes and spacings (and a 2D image) with their spacings: 25, 9 and 13 tokens."""
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(3, 16, 32, 48, generator=generator), (2.0, 0.5, 0.5)),  # aniso_d 2: 4 x 2 x 3 tokens
        (torch.randn(3, 32, 32, 32, generator=generator), (1.0, 1.0, 1.0)),  # aniso_d 0: 2 x 2 x 2 tokens
        (torch.randn(3, 48, 64, generator=generator), None),  # a 2D image: 1 x 3 x 4 tokens
    ]


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
    """Save a tiny segmentation model and its processor to ``folder``; return the model.

    Its weights are seeded: tests that read its (untrained) predictions see the same model whatever ran before.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SpadViTForSemanticSegmentation(tiny_segmentation_config()).eval()
    model.save_pretrained(folder)
    tiny_segmentation_processor().save_pretrained(folder)
    return model


def save_tiny_pretrained_vit(folder: Path) -> Path:
    """Save a tiny pre-trained-style SPAD-ViT (adaptive patch, RGB, with the MIM head) to ``folder``."""
    SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT)).save_pretrained(folder)
    return folder
