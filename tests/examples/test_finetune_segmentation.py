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
def pretrained(tmp_path_factory) -> Path:
    """A tiny pre-trained-style (adaptive, RGB) SPAD-ViT checkpoint with a processor."""
    folder = tmp_path_factory.mktemp("pretrained")
    save_tiny_pretrained_vit(folder)
    MedicalImageProcessor.from_preset("mr").save_pretrained(folder)
    return folder


def _common_arguments(data: Path, model: Path, output: Path) -> list[str]:
    """A 2-label run on 8 x 32 x 64 crops, a third of the cases held out, a narrow decoder."""
    return ["--model", str(model), "--data", str(data), "--output", str(output), "--num-labels", "2"] + [
        "--crop", "8", "32", "64", "--val-fraction", "0.34",
        "--decoder-lateral-channels", "8", "8", "16", "16", "--decoder_full_res_channels", "4", "8",
    ]  # fmt: skip


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [[], ["--lora", "--lora-rank", "2"]], ids=["full", "lora"])
def test_finetune_segmentation_example(
    adapters, decathlon: Path, pretrained: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    arguments = [*_common_arguments(decathlon, pretrained, output), "--steps", "6", "--eval-every", "3"]
    arguments += ["--warmup-steps", "2", "--lr", "1e-3", *adapters]
    final = load_example("finetune_segmentation").main(arguments)
    printed = capsys.readouterr().out
    assert "3 cases, 2 for training and 1 for validation" in printed and "trainable" in printed
    assert 0.0 <= final["mean_dice"] <= 1.0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["mean_dice"] == final["mean_dice"] and "dice_bright" in metrics  # labels by name
    checkpoints = list((output / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 2  # steps 3 and 6, pruned to the last two
    assert (output / "README.md").is_file() and (output / "preprocessor_config.json").is_file()
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "background", "1": "bright"}
    assert config["decoder_lateral_channels"] == [8, 8, 16, 16]
    if adapters:
        assert (output / "adapter_config.json").is_file() and not (output / "model.safetensors").exists()
        # Checkpoints and the adapter hold the trainable parameters only: far less than the full model.
        from safetensors import safe_open

        with safe_open(checkpoints[-1] / "model.safetensors", "pt") as handle:
            assert all("lora_" in k or "modules_to_save" in k for k in handle.keys())  # noqa: SIM118 (not a dict)
        with safe_open(output / "adapter_model.safetensors", "pt") as handle:
            assert not any("base_layer" in k or "blocks.0.attn.q_proj.weight" in k for k in handle.keys())  # noqa: SIM118 (not a dict)
    # The folder loads as it is, adapter or not: the pipeline and the CLI need no further argument.
    segmenter = pipeline("medical-segmentation", model=str(output))
    result = segmenter(str(decathlon / "imagesTr" / "case0.nii.gz"), roi_size=(8, 32, 64))
    assert result["label_map"].shape == nib.load(decathlon / "imagesTr" / "case0.nii.gz").shape
    assert {stats["name"] for stats in result["labels"].values()} <= {"background", "bright"}
    from medfm.cli import main as cli

    seg = tmp_path / "seg.nii.gz"
    argv = [
        "segment",
        str(decathlon / "imagesTr" / "case0.nii.gz"),
        "--model",
        str(output),
        "--out",
        str(seg),
    ]
    assert cli([*argv, "--roi-size", "8", "32", "64"]) == 0
    assert "background" in capsys.readouterr().out


@pytest.mark.slow
def test_lora_run_resumes_and_merges(decathlon: Path, pretrained: Path, tmp_path: Path) -> None:
    """An adapter run stopped after its first checkpoint resumes from it (underscore spelling too); --merge
    saves the full merged model with its processor."""
    output = tmp_path / "run"
    arguments = [*_common_arguments(decathlon, pretrained, output), "--eval-every", "2"]
    arguments += ["--warmup-steps", "1", "--lora", "--lora-rank", "2"]
    example = load_example("finetune_segmentation")
    example.main([*arguments, "--steps", "2"])
    final = example.main([*arguments, "--steps", "4", "--resume_from_checkpoint", "latest", "--merge"])
    assert 0.0 <= final["mean_dice"] <= 1.0
    assert [p.name for p in sorted((output / "checkpoints").glob("step-*"))] == [
        "step-00000002",
        "step-00000004",
    ]
    assert (output / "model.safetensors").is_file() and (output / "preprocessor_config.json").is_file()
    assert not (output / "adapter_config.json").exists() or (output / "model.safetensors").is_file()
    segmenter = pipeline("medical-segmentation", model=str(output))
    assert segmenter.model.config.id2label[1] == "bright"


def test_label_values_are_checked_before_training(decathlon: Path, pretrained: Path, tmp_path: Path) -> None:
    """A label map with a value >= --num-labels stops the run before any model is built, naming the file."""
    from medfm.errors import LabelMapError

    data = tmp_path / "data"
    data.mkdir()
    source = nib.load(decathlon / "labelsTr" / "case0.nii.gz")
    labels = np.asarray(source.dataobj).astype(np.uint8)
    labels[labels == 1] = 3
    nib.save(nib.Nifti1Image(labels, source.affine), data / "bad.nii.gz")
    entry = {"image": str(decathlon / "imagesTr" / "case0.nii.gz"), "label": str(data / "bad.nii.gz")}
    (data / "dataset.json").write_text(json.dumps({"training": [entry]}))
    arguments = ["--model", str(pretrained), "--data", str(data), "--output", str(tmp_path / "run")]
    with pytest.raises(LabelMapError, match=r"bad\.nii\.gz.*\[3\].*--num-labels 2"):
        load_example("finetune_segmentation").main([*arguments, "--num-labels", "2", "--steps", "1"])
    with pytest.raises(Exception, match="--num-labels"):  # no names and no count
        load_example("finetune_segmentation").main([*arguments, "--steps", "1"])
    assert not (tmp_path / "run" / "checkpoints").exists()


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
