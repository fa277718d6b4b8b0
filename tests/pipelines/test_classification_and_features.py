"""pipeline("medical-image-classification") and pipeline("medical-feature-extraction"), 2D and 3D."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

import medfm  # noqa: F401
from medfm.models.spad import SpadViTConfig, SpadViTForImageClassification, SpadViTModel
from medfm.processing import MedicalImageProcessor

from ..common.tiny_models import TINY_VIT

PROCESSOR = MedicalImageProcessor(
    steps=[
        {"name": "minmax"},
        {"name": "repeat_channels", "num_channels": 3},
        {"name": "pad_to_multiple", "multiple": 16},
    ]
)


@pytest.fixture
def classifier(tmp_path: Path):
    config = SpadViTConfig(**TINY_VIT, num_labels=3, id2label={0: "normal", 1: "benign", 2: "malignant"})
    torch.manual_seed(0)
    model = SpadViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    PROCESSOR.save_pretrained(tmp_path)
    return model, pipeline("medical-image-classification", model=str(tmp_path))


def test_classification_3d_and_2d(classifier, anatomical_path: Path) -> None:
    model, classify = classifier
    result = classify(str(anatomical_path), top_k=2)
    assert [set(r) for r in result] == [{"label", "score"}] * 2
    assert result[0]["score"] >= result[1]["score"]
    # The scores are the model's softmax on the processed input.
    inputs = PROCESSOR(str(anatomical_path))
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)[0]
    best = int(probabilities.argmax())
    assert result[0]["label"] == model.config.id2label[best]
    assert result[0]["score"] == pytest.approx(float(probabilities[best]), abs=1e-6)
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)  # a 2D image: one slice
    assert len(classify(image, spacing=(1.0, 0.2, 0.2))) == 3
    with pytest.raises(ValueError, match="top_k"):
        classify(image, spacing=(1.0, 0.2, 0.2), top_k=0)


def test_feature_extraction(tmp_path: Path, anatomical_path: Path) -> None:
    SpadViTModel(SpadViTConfig(**TINY_VIT)).save_pretrained(tmp_path)
    PROCESSOR.save_pretrained(tmp_path)
    extract = pipeline("medical-feature-extraction", model=str(tmp_path))
    out = extract(str(anatomical_path), return_tokens=True)
    assert out["embedding"].shape == (32,)
    # anatomical.nii is 2 mm isotropic, 25 x 41 x 33 canonical -> padded to 32 x 48 x 48 -> aniso_d 0 -> 2 x 3 x 3 tokens
    assert out["tokens"].shape == (18, 32)
    assert "tokens" not in extract(str(anatomical_path))


def test_a_model_of_another_task_is_refused(tmp_path) -> None:
    """A segmentation model given to the classification pipeline used to print random scores."""
    from transformers import pipeline

    from medfm.errors import WrongTaskError

    from ..common.tiny_models import save_tiny_segmentation_model

    save_tiny_segmentation_model(tmp_path / "seg")
    with pytest.raises(WrongTaskError, match="segmentation model"):
        pipeline("medical-image-classification", model=str(tmp_path / "seg"))


def test_model_and_processor_channels_must_agree(tmp_path, ct_small_path) -> None:
    """A 1-channel model whose saved processor repeats grey to RGB: refused with the file to fix."""
    from transformers import pipeline

    from medfm.errors import ModelProcessorMismatchError
    from medfm.processing import MedicalImageProcessor

    from ..common.tiny_models import save_tiny_segmentation_model

    save_tiny_segmentation_model(tmp_path / "seg")  # in_channels 1
    MedicalImageProcessor(
        steps=[{"name": "minmax"}, {"name": "repeat_channels", "num_channels": 3}]
    ).save_pretrained(tmp_path / "seg")
    segmenter = pipeline("medical-segmentation", model=str(tmp_path / "seg"))
    with pytest.raises(ModelProcessorMismatchError, match=r"preprocessor_config\.json") as raised:
        segmenter(str(ct_small_path))
    assert "takes 1" in str(raised.value) and "3-channel" in str(raised.value)
