"""Conversion is atomic and typed: bad inputs give one typed error and leave no output, no temporary folder."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medfm.cli import main
from medfm.errors import (
    CheckpointMismatchError,
    CorruptFileError,
    InvalidConfigError,
    NonFiniteWeightsError,
    OutputPathError,
    OutputWriteError,
)
from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling
from medfm.models.spad.convert_spad import convert_spad_checkpoint, load_original_state_dict

from ..common.tiny_models import TINY_VIT

HEADS = {"num_attention_heads": 2}


def _state() -> dict[str, torch.Tensor]:
    model = SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT))
    return {k.removeprefix("spad_vit."): v.contiguous().clone() for k, v in model.state_dict().items()}


def _write(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "up.safetensors") -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


def _no_leftovers(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = _write(tmp_path, _state())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=r"up\.safetensors"):
        convert_spad_checkpoint(path, tmp_path / "out", config_overrides=HEADS)
    _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float) -> None:
    state = _state()
    state["blocks.1.mlp.w1.weight"][0, 0] = value
    with pytest.raises(NonFiniteWeightsError, match=r"blocks\.1\.mlp\.w1\.weight"):
        convert_spad_checkpoint(_write(tmp_path, state), tmp_path / "out", config_overrides=HEADS)
    _no_leftovers(tmp_path, tmp_path / "out")


def test_missing_key(tmp_path: Path) -> None:
    state = _state()
    del state["blocks.0.attn.proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.0\.attn\.proj\.weight"):
        convert_spad_checkpoint(_write(tmp_path, state), tmp_path / "out", config_overrides=HEADS)
    del state["cls_token"]
    with pytest.raises(CheckpointMismatchError, match="cls_token"):
        convert_spad_checkpoint(_write(tmp_path, state), tmp_path / "out", config_overrides=HEADS)
    _no_leftovers(tmp_path, tmp_path / "out")


def test_wrong_shape(tmp_path: Path) -> None:
    state = _state()
    state["blocks.1.attn.proj.weight"] = torch.zeros(32, 16)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shapes.*blocks\.1\.attn\.proj\.weight"):
        convert_spad_checkpoint(_write(tmp_path, state), tmp_path / "out", config_overrides=HEADS)
    _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [([1, 2], "JSON object"), ({"num_attention_heads": 3}, "num_attention_heads"), ({"bogus": 1}, "bogus")],
)
def test_bad_config_overrides(tmp_path: Path, overrides, phrase: str) -> None:
    with pytest.raises(InvalidConfigError, match=phrase):
        convert_spad_checkpoint(_write(tmp_path, _state()), tmp_path / "out", config_overrides=overrides)
    _no_leftovers(tmp_path, tmp_path / "out")


def test_output_that_is_a_file_or_foreign_folder_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _state())
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    with pytest.raises(OutputPathError, match="file"):
        convert_spad_checkpoint(path, target, config_overrides=HEADS)
    assert target.read_text() == "keep me"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="not empty"):
        convert_spad_checkpoint(path, folder, config_overrides=HEADS)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_previous_conversion_is_replaced_and_new_parents_made(tmp_path: Path) -> None:
    path = _write(tmp_path, _state())
    out = tmp_path / "a" / "b" / "out"
    convert_spad_checkpoint(path, out, config_overrides=HEADS)
    (out / "stale.txt").write_text("old")
    convert_spad_checkpoint(path, out, config_overrides=HEADS)
    assert (out / "conversion.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_failing_tokenizer_leaves_no_folder(tmp_path: Path) -> None:
    bad = tmp_path / "tok.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptFileError, match=r"tok\.ckpt"):
        convert_spad_checkpoint(
            _write(tmp_path, _state()), tmp_path / "new" / "out", tokenizer=bad, config_overrides=HEADS
        )
    _no_leftovers(tmp_path, tmp_path / "new")


def test_full_disk_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    from medfm.processing import MedicalImageProcessor

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "preprocessor_config.json")

    monkeypatch.setattr(MedicalImageProcessor, "save_pretrained", full)
    with pytest.raises(OutputWriteError, match="disk is full"):
        convert_spad_checkpoint(_write(tmp_path, _state()), tmp_path / "out", config_overrides=HEADS)
    _no_leftovers(tmp_path, tmp_path / "out")


def test_load_original_state_dict_still_importable_from_convert_spad(tmp_path: Path) -> None:
    assert "cls_token" in load_original_state_dict(_write(tmp_path, _state()))


@pytest.mark.parametrize(
    ("make", "config", "phrase"),
    [
        ("truncated", '{"num_attention_heads": 2}', "truncated"),
        ("nan", '{"num_attention_heads": 2}', "NaN"),
        ("ok", '{"num_attention_heads": 3}', "num_attention_heads"),
        ("ok", "[1]", "JSON object"),
    ],
)
def test_cli_reports_one_line(tmp_path: Path, capsys, make: str, config: str, phrase: str) -> None:
    state = _state()
    if make == "nan":
        state["cls_token"][..., 0] = float("nan")
    path = _write(tmp_path, state)
    if make == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "out"
    assert main(["convert", "spad", "--checkpoint", str(path), "--output", str(out), "--config", config]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    _no_leftovers(tmp_path, out)
