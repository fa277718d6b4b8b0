"""A converted MiM pre-training checkpoint through the fine-tuning examples and the pipelines (issue 13).

The checkpoint is the MiM fixture's upstream pre-training state dict, converted by ``medfm convert mim``'s
function; fine-tuning sets the model's ``image_size`` to the crop (its position table is resized on load), and
the fine-tuned folder segments a volume in its own geometry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from transformers import pipeline

import medfm  # noqa: F401
from medfm.models.mim.convert_mim import convert_mim_checkpoint

from ..conftest import fixtures_root
from . import load_example
from .conftest import write_flip_classes


@pytest.fixture(scope="module")
def converted_mim(tmp_path_factory) -> Path:
    folder = fixtures_root() / "mim"
    upstream = json.loads((folder / "upstream_config.json").read_text())["pretraining"]
    heads = {
        "num_attention_heads": upstream["num_heads"],
        "decoder_num_attention_heads": upstream["decoder_num_heads"],
    }
    output = tmp_path_factory.mktemp("mim") / "converted"
    return convert_mim_checkpoint(folder / "upstream_state_dict.safetensors", output, config_overrides=heads)


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [[], ["--lora", "--lora-rank", "2"]], ids=["full", "lora"])
def test_converted_mim_fine_tunes_and_segments_in_the_input_geometry(
    converted_mim: Path,
    decathlon: Path,
    tmp_path: Path,
    adapters: list[str],
) -> None:
    output = tmp_path / "run"
    final = load_example("finetune_segmentation").main(
        ["--model", str(converted_mim), "--data", str(decathlon), "--output", str(output), "--preset", "mr"]
        + ["--crop", "32", "64", "64", "--steps", "4", "--eval-every", "2", "--warmup-steps", "1"]
        + ["--lr", "1e-3", "--val-fraction", "0.34", *adapters]
    )
    assert 0.0 <= final["mean_dice"] <= 1.0
    saved = json.loads((output / "config.json").read_text())
    assert saved["model_type"] == "mim" and saved["image_size"] == [32, 64, 64]

    case = decathlon / "imagesTr" / "case0.nii.gz"
    segmenter = pipeline("medical-segmentation", model=str(output))
    assert segmenter.model.mim.pos_embed.shape[1] == 2 * 4 * 4  # the crop's token grid
    segmenter(str(case), save_to=str(tmp_path / "prediction.nii.gz"))
    image, prediction = nib.load(case), nib.load(tmp_path / "prediction.nii.gz")
    assert prediction.shape == image.shape
    np.testing.assert_allclose(prediction.affine, image.affine)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1}


def test_converted_mim_extracts_features_from_any_volume_size(converted_mim: Path, decathlon: Path) -> None:
    # The converted processor pads to 16; the encoder (with its fpn) needs 32: the pipeline pads for the model.
    extractor = pipeline("medical-feature-extraction", model=str(converted_mim))
    features = extractor(str(decathlon / "imagesTr" / "case1.nii.gz"))
    width = json.loads((converted_mim / "config.json").read_text())["embed_dims"][-1]
    assert features["embedding"].shape == (width,)


def test_converted_folder_copies_run_through_the_cli(converted_mim: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(converted_mim, copy)
    assert (copy / "README.md").read_text().count("medfm convert mim") == 1


def test_converted_mim_fine_tunes_a_classifier(
    converted_mim: Path, anatomical_path: Path, tmp_path: Path
) -> None:
    write_flip_classes(tmp_path / "data", anatomical_path)
    final = load_example("finetune_classification").main(
        ["--model", str(converted_mim), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run")]
        + [
            "--steps",
            "2",
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
    classifier = pipeline("medical-image-classification", model=str(tmp_path / "run"))
    scores = classifier(str(tmp_path / "data" / "upright" / "c0.nii.gz"))
    assert {s["label"] for s in scores} == {"upright", "flipped"}
