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


def _common_arguments(data: Path, model: Path, output: Path) -> list[str]:
    """A 2-label run on 8 x 32 x 64 crops, a third of the cases held out."""
    return ["--model", str(model), "--data", str(data), "--output", str(output), "--num-labels", "2"] + [
        "--crop", "8", "32", "64", "--val-fraction", "0.34",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [[], ["--lora", "--lora-rank", "2"]], ids=["full", "lora"])
def test_finetune_segmentation_example(adapters, decathlon: Path, pretrained: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    arguments = [*_common_arguments(decathlon, pretrained, output), "--steps", "6", "--eval-every", "3"]
    arguments += ["--warmup-steps", "2", "--lr", "1e-3", *adapters]
    final = load_example("finetune_segmentation").main(arguments)
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


@pytest.mark.slow
def test_two_process_fine_tuning(decathlon: Path, pretrained: Path, tmp_path: Path) -> None:
    """DDP as Accelerate sets it up (find_unused_parameters=False) fails at the second step if the model holds
    a parameter its forward never uses; two CPU processes run the example through two optimizer steps."""
    from . import EXAMPLES, launch_on_two_cpu_processes

    arguments = [*_common_arguments(decathlon, pretrained, tmp_path / "run"), "--steps", "3"]
    arguments += ["--eval-every", "3", "--warmup-steps", "1"]
    done = launch_on_two_cpu_processes(EXAMPLES / "finetune_segmentation.py", arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000003"]
