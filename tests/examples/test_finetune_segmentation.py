"""examples/finetune_segmentation.py end to end on a tiny Decathlon-style dataset, full and with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from transformers import pipeline

import medfm  # noqa: F401
from medfm.processing import MedicalImageProcessor

from ..common.tiny_models import save_tiny_pretrained_vit
from . import load_example


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory, anatomical_path: Path) -> Path:
    """Three cases made from nibabel's anatomical.nii, labels = the bright voxels, in a dataset.json."""
    root = tmp_path_factory.mktemp("Task00_Tiny")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    source = nib.load(anatomical_path)
    data = np.asarray(source.dataobj).astype(np.float32)
    training = []
    for case in range(3):
        image = np.roll(data, 2 * case, axis=0)
        label = (image > np.percentile(image, 70)).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, source.affine), root / "imagesTr" / f"case{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, source.affine), root / "labelsTr" / f"case{case}.nii.gz")
        training.append({"image": f"./imagesTr/case{case}.nii.gz", "label": f"./labelsTr/case{case}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "training": training}))
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny pre-trained-style (adaptive, RGB) SPAD-ViT checkpoint with a processor."""
    folder = tmp_path_factory.mktemp("pretrained")
    save_tiny_pretrained_vit(folder)
    MedicalImageProcessor.from_preset("mr").save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [[], ["--lora", "--lora-rank", "2"]], ids=["full", "lora"])
def test_finetune_segmentation_example(adapters, decathlon: Path, pretrained: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    final = load_example("finetune_segmentation").main(
        [
            "--model",
            str(pretrained),
            "--data",
            str(decathlon),
            "--output",
            str(output),
            "--num-labels",
            "2",
            "--crop",
            "8",
            "32",
            "64",
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--warmup-steps",
            "2",
            "--lr",
            "1e-3",
            "--val-fraction",
            "0.34",
            *adapters,
        ]
    )
    assert 0.0 <= final["mean_dice"] <= 1.0
    assert json.loads((output / "metrics.json").read_text())["mean_dice"] == final["mean_dice"]
    assert len(list((output / "checkpoints").glob("step-*"))) == 2  # steps 3 and 6, pruned to the last two
    assert (output / "README.md").is_file() and (output / "preprocessor_config.json").is_file()
    if adapters:
        assert (output / "adapter_config.json").is_file() and not (output / "model.safetensors").exists()
    else:
        segmenter = pipeline("medical-segmentation", model=str(output))
        result = segmenter(str(decathlon / "imagesTr" / "case0.nii.gz"), roi_size=(8, 32, 64))
        assert result["label_map"].shape == nib.load(decathlon / "imagesTr" / "case0.nii.gz").shape
