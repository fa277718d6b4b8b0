"""``examples/pretrain_mim.py --model mim``: MiM pre-training on shipped volumes through the shared loop.

A tiny MiM (widths 4-24, one block per stage; a 64^3 crop gives 32^3 levels and a 2^3 token grid) keeps each
step near a second on two CPU cores. The loss falls, an interrupted run resumes with bit-identical losses (with a loss-weight
schedule, so the checkpointed schedule progress matters), two CPU processes keep identical weights, and the
saved model loads as the encoder and as a segmentation model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSemanticSegmentation

import medfm  # noqa: F401
from medfm.errors import PretrainingOptionError

from ..conftest import NIBABEL_DATA
from . import EXAMPLES, launch_on_two_cpu_processes, load_example

TINY_MIM = {
    "embed_dims": [4, 8, 16, 24],
    "depths": [1, 1, 1, 1],
    "num_attention_heads": 2,
    "decoder_hidden_size": 12,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
}
TINY = ["--model", "mim", "--crop-size", "64", "--batch-size", "1", "--lr", "2e-3", "--warmup-steps", "3"]


def _config(**changes) -> list[str]:
    return ["--config", json.dumps({**TINY_MIM, **changes})]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("volumes")
    for name in ("anatomical.nii", "resampled_anat_moved.nii", "reoriented_anat_moved.nii"):
        shutil.copy(NIBABEL_DATA / name, data / name)
    return data


@pytest.mark.slow
def test_mim_loss_falls_and_the_model_loads_for_fine_tuning(volumes: Path, tmp_path: Path) -> None:
    losses = load_example("pretrain_mim").main(
        ["--data", str(volumes), "--output", str(tmp_path / "run"), "--steps", "60", "--save-every", "0"]
        + TINY
        + _config()
    )
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.2, (first, last)
    model_dir = tmp_path / "run" / "model"
    encoder = AutoModel.from_pretrained(model_dir)
    assert type(encoder).__name__ == "MiMModel" and encoder.config.image_size == [32, 32, 32]
    # A larger fine-tuning ROI, as upstream fine-tunes: pos_embed is resampled to the new grid on load.
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(model_dir, num_labels=3, image_size=[64] * 3)
    assert segmenter.mim.pos_embed.shape[1] == 4**3
    logits = segmenter(torch.rand(1, 1, 64, 64, 64)).logits
    assert logits.shape == (1, 3, 64, 64, 64) and torch.isfinite(logits).all()
    assert (model_dir / "preprocessor_config.json").is_file()


@pytest.mark.slow
def test_mim_resume_reproduces_the_uninterrupted_losses(volumes: Path, tmp_path: Path) -> None:
    """Stopped at step 3 (checkpoints every 2), resumed from step 2: steps 3-6 equal the whole run's, bit for
    bit, under the coarse_to_fine loss weights (which read the schedule progress the checkpoint restores)."""
    example = load_example("pretrain_mim")
    common = ["--data", str(volumes), "--steps", "6", "--save-every", "2", *TINY]
    common += _config(loss_weight_mode="coarse_to_fine")
    whole = example.main([*common, "--output", str(tmp_path / "whole")])
    example.main([*common, "--output", str(tmp_path / "parts"), "--stop-after", "3"])
    resumed_file = tmp_path / "resumed.json"
    example.main(
        [*common, "--output", str(tmp_path / "parts"), "--resume_from_checkpoint", "latest"]
        + ["--losses-file", str(resumed_file)]
    )
    resumed = json.loads(resumed_file.read_text())
    assert resumed["first_step"] == 3
    assert resumed["losses"] == whole[2:]
    assert len(set(whole)) == len(whole)


@pytest.mark.slow
def test_mim_on_two_cpu_processes_keeps_identical_weights(volumes: Path, tmp_path: Path) -> None:
    arguments = [
        "--data",
        str(volumes),
        "--output",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--save-every",
        "2",
    ]
    arguments += ["--weights-digest-dir", str(tmp_path / "digests"), *TINY, *_config()]
    done = launch_on_two_cpu_processes(EXAMPLES / "pretrain_mim.py", arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = {p.name: p.read_text() for p in (tmp_path / "digests").iterdir()}
    assert set(digests) == {"rank0.sha256", "rank1.sha256"}
    assert digests["rank0.sha256"] == digests["rank1.sha256"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--slice-probability", "0.5"], "3D crops only"),
        (["--crop-size", "80"], "multiple of 32"),
    ],
)
def test_bad_mim_options_are_usage_errors(change: list[str], message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_example("pretrain_mim").main(
            ["--data", str(tmp_path), "--output", str(tmp_path / "run"), *TINY, *_config(), *change]
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_image_size_must_be_half_the_crop(volumes: Path, tmp_path: Path) -> None:
    with pytest.raises(PretrainingOptionError, match=r"image_size must be \[32, 32, 32\]"):
        load_example("pretrain_mim").main(
            ["--data", str(volumes), "--output", str(tmp_path / "run"), *TINY, *_config(image_size=[48] * 3)]
        )
    assert not (tmp_path / "run" / "model").exists()


def test_help_documents_both_families(capsys) -> None:
    with pytest.raises(SystemExit):
        load_example("pretrain_mim").main(["--help"])
    text = capsys.readouterr().out
    assert "spad-vit" in text and "mim" in text and "192 for mim" in text
