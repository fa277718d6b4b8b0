"""Model folders the web viewer's tests share: a tiny segmentation model, a tiny classifier, a backbone."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..common.tiny_models import TINY_VIT, save_tiny_pretrained_vit, save_tiny_segmentation_model


@pytest.fixture(scope="session")
def segmentation_model(tmp_path_factory) -> Path:
    """A tiny SPAD-ViT segmentation model with its processor (labels: background, grey and white matter)."""
    folder = tmp_path_factory.mktemp("tiny-segmentation")
    save_tiny_segmentation_model(folder)
    return folder


@pytest.fixture(scope="session")
def classification_model(tmp_path_factory) -> Path:
    """A tiny SPAD-ViT classifier of three labels with its processor."""
    import torch

    from medfm.models.spad import SpadViTConfig, SpadViTForImageClassification
    from medfm.processing import MedicalImageProcessor

    folder = tmp_path_factory.mktemp("tiny-classifier")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = SpadViTConfig(**TINY_VIT, num_labels=3, id2label={0: "normal", 1: "benign", 2: "malignant"})
        SpadViTForImageClassification(config).save_pretrained(folder)
    MedicalImageProcessor(
        steps=[
            {"name": "resample", "spacing": [4.0, 4.0, 4.0]},
            {"name": "minmax"},
            {"name": "repeat_channels", "num_channels": 3},
            {"name": "pad_to_multiple", "multiple": 16},
        ]
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def backbone_model(tmp_path_factory) -> Path:
    """A pre-training model (no task head) with a processor: neither task of the viewer."""
    from medfm.processing import MedicalImageProcessor

    folder = save_tiny_pretrained_vit(tmp_path_factory.mktemp("tiny-backbone"))
    MedicalImageProcessor(steps=[{"name": "minmax"}]).save_pretrained(folder)
    return folder
