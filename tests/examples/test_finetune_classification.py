"""examples/finetune_classification.py end to end on class folders made from shipped volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import pipeline

import medfm  # noqa: F401
from medfm.training.classification import _auc

from ..common.tiny_models import save_tiny_pretrained_vit
from . import load_example


@pytest.mark.slow
def test_finetune_classification_example(tmp_path: Path, anatomical_path: Path) -> None:
    source = nib.load(anatomical_path)
    data = np.asarray(source.dataobj).astype(np.float32)
    for name, transform in {"upright": lambda a: a, "flipped": lambda a: a[:, ::-1, ::-1]}.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for case in range(3):
            volume = np.ascontiguousarray(transform(np.roll(data, case, axis=0)))
            nib.save(nib.Nifti1Image(volume, source.affine), tmp_path / "data" / name / f"c{case}.nii.gz")
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
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == final
    classifier = pipeline("medical-image-classification", model=str(tmp_path / "run"))
    assert {row["label"] for row in classifier(str(tmp_path / "data" / "upright" / "c0.nii.gz"))} == {
        "flipped",
        "upright",
    }


def test_auc_definition() -> None:
    assert _auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([True, True, False, False])) == 1.0
    assert _auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5
