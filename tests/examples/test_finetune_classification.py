"""examples/finetune_classification.py end to end on class folders made from shipped volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import pipeline

import medfm  # noqa: F401
from medfm.training.classification import _auc

from ..common.tiny_models import save_tiny_pretrained_vit
from . import load_example
from .conftest import write_flip_classes


@pytest.mark.slow
def test_finetune_classification_example(tmp_path: Path, anatomical_path: Path, capsys) -> None:
    write_flip_classes(tmp_path / "data", anatomical_path)
    pretrained = save_tiny_pretrained_vit(tmp_path / "pretrained")
    final = load_example("finetune_classification").main(
        [
            "--model",
            str(pretrained),
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "run"),
            "--preset",
            "spad-medmnist-3d",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--eval-every",
            "2",
            "--warmup-steps",
            "1",
            "--val-fraction",
            "0.34",
        ]
    )
    assert 0.0 <= final["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    # Stratified: each class of three has one image in validation; the counts are printed at start.
    assert "6 images, 4 for training and 2 for validation" in printed and "trainable" in printed
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == final
    assert final["auc"] is not None
    classifier = pipeline("medical-image-classification", model=str(tmp_path / "run"))
    assert {row["label"] for row in classifier(str(tmp_path / "data" / "upright" / "c0.nii.gz"))} == {
        "flipped",
        "upright",
    }


def test_auc_definition() -> None:
    assert _auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([True, True, False, False])) == 1.0
    assert _auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5


def test_stratified_split_holds_out_every_class() -> None:
    from medfm.data.classification import stratified_split

    labels = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert {labels[i] for i in val} == {0, 1}  # class 2 has one image: it trains
    assert {labels[i] for i in train} == {0, 1, 2}


def test_auc_of_one_class_is_null() -> None:
    """AUC cannot be computed with one class in validation: None (JSON null), never NaN."""
    from medfm.models.spad import SpadViTConfig, SpadViTForImageClassification
    from medfm.training.classification import ClassificationSample, evaluate_classification

    from ..common.tiny_models import TINY_VIT

    model = SpadViTForImageClassification(SpadViTConfig(**TINY_VIT, num_labels=2)).eval()
    sample = ClassificationSample(torch.randn(3, 16, 32, 32), torch.tensor([1.0, 1.0, 1.0]), 0)
    scores = evaluate_classification(model, [sample, sample])
    assert scores["auc"] is None and json.loads(json.dumps(scores))["auc"] is None


def test_segmentation_scores_of_absent_labels_are_null() -> None:
    from medfm.training.segmentation import _mean_or_none, label_key

    assert _mean_or_none([float("nan")]) is None and _mean_or_none([0.5, float("nan")]) == 0.5
    assert label_key(1, {1: "Left Kidney"}) == "left_kidney" and label_key(2, {1: "x"}) == "2"
