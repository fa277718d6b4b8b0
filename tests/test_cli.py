"""The ``medfm`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfm.cli import main
from medfm.io import load_volume

from .common.tiny_models import TINY_VIT, save_tiny_segmentation_model


def test_inspect_prints_geometry_and_statistics(anatomical_path: Path, capsys) -> None:
    assert main(["inspect", str(anatomical_path)]) == 0
    out = capsys.readouterr().out
    assert "spacing (z, y, x) mm" in out and "(2.0, 2.0, 2.0)" in out
    assert "orientation" in out and "SPL" in out and "LAS" in out
    assert "p99.5" in out and "mean" in out


def test_inspect_json_and_dicom(ct_small_path: Path, capsys) -> None:
    assert main(["inspect", str(ct_small_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modality"] == "CT"
    assert info["shape"] == [1, 1, 128, 128]
    assert info["min"] < -800  # Hounsfield units, not stored values
    # Machine keys: snake_case names a program can index, with the affine.
    assert all(key.isidentifier() and key == key.lower() for key in info), sorted(info)
    assert {
        "shape",
        "spacing",
        "orientation",
        "affine",
        "field_of_view",
        "p0_5",
        "p99_5",
        "nan_voxels",
    } <= set(info)
    assert len(info["spacing"]) == 3 and len(info["affine"]) == 4 and info["orientation"] == "SPL"


def test_preprocess_writes_processed_grid(mni_t1_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "t1_mr.nii.gz"
    assert main(["preprocess", str(mni_t1_path), "--preset", "mr", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    processed = load_volume(out)
    assert all(n % 16 == 0 for n in processed.spatial_shape)
    assert float(processed.array.min()) >= 0.0 and float(processed.array.max()) <= 1.0
    # The processed grid keeps world positions: the input's first voxel sits inside the padded grid.
    source = nib.load(mni_t1_path)
    world_origin = source.affine @ [0, 0, 0, 1]
    index = np.linalg.solve(processed.affine, world_origin)[:3]
    assert np.all(index > -0.5) and np.all(index < np.array(processed.spatial_shape) - 0.5)


def test_preprocess_with_saved_config(anatomical_path: Path, tmp_path: Path) -> None:
    from medfm.processing import MedicalImageProcessor

    MedicalImageProcessor(steps=[{"name": "zscore"}]).save_pretrained(tmp_path / "proc")
    out = tmp_path / "z.nii"
    assert (
        main(["preprocess", str(anatomical_path), "--config", str(tmp_path / "proc"), "--out", str(out)]) == 0
    )
    assert abs(float(load_volume(out).array.mean())) < 1e-4


def test_preprocess_refuses_to_overwrite_input(anatomical_path: Path, tmp_path: Path, capsys) -> None:
    local = tmp_path / "a.nii"
    local.write_bytes(anatomical_path.read_bytes())
    assert main(["preprocess", str(local), "--preset", "mr", "--out", str(local)]) == 2
    assert "refusing to write over the input" in capsys.readouterr().err
    assert local.read_bytes() == anatomical_path.read_bytes()


def test_presets_listing(capsys) -> None:
    assert main(["presets", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "spad-btcv" in out and "mim-covid19-20" in out and '"name": "window"' in out


def test_console_script_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "medfm.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("medfm ")


def test_unknown_preset_is_a_clean_error(anatomical_path: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(["preprocess", str(anatomical_path), "--preset", "nope", "--out", str(tmp_path / "o.nii")]) == 2
    )
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["preprocess", str(anatomical_path)])  # argparse: --out and a recipe are required


def test_segment_command(anatomical_path: Path, tmp_path: Path, capsys) -> None:
    save_tiny_segmentation_model(tmp_path / "model")
    out, overlay = tmp_path / "seg.nii.gz", tmp_path / "seg.png"
    status = main(
        [
            "segment",
            str(anatomical_path),
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(out),
            "--overlay",
            str(overlay),
            "--roi-size",
            "8",
            "32",
            "64",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "grey matter" in printed and " ml" in printed
    written = nib.load(out)
    assert written.shape == nib.load(anatomical_path).shape and overlay.is_file()
    status = main(
        ["segment", str(anatomical_path), "--model", str(tmp_path / "model"), "--out", str(anatomical_path)]
    )
    assert status == 2 and "refusing to write over the input" in capsys.readouterr().err


def test_classify_and_convert_commands(anatomical_path: Path, tmp_path: Path, capsys) -> None:
    import torch
    from safetensors.torch import save_file

    from medfm.models.spad import SpadViTConfig, SpadViTForImageClassification, SpadViTForMaskedImageModeling
    from medfm.processing import MedicalImageProcessor

    SpadViTForImageClassification(
        SpadViTConfig(**TINY_VIT, num_labels=2, id2label={0: "a", 1: "b"})
    ).save_pretrained(tmp_path / "cls")
    MedicalImageProcessor(
        steps=[{"name": "minmax"}, {"name": "repeat_channels"}, {"name": "pad_to_multiple", "multiple": 16}]
    ).save_pretrained(tmp_path / "cls")
    assert main(["classify", str(anatomical_path), "--model", str(tmp_path / "cls"), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and {line.split()[1] for line in lines} == {"a", "b"}

    mim = SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT))
    state = {k.removeprefix("spad_vit."): v.contiguous() for k, v in mim.state_dict().items()}
    save_file(state, str(tmp_path / "up.safetensors"))
    assert (
        main(
            [
                "convert",
                "spad",
                "--checkpoint",
                str(tmp_path / "up.safetensors"),
                "--output",
                str(tmp_path / "conv"),
                "--config",
                '{"num_attention_heads": 2}',
            ]
        )
        == 0
    )
    assert (tmp_path / "conv" / "model.safetensors").is_file()
    assert (
        main(
            [
                "convert",
                "spad",
                "--checkpoint",
                str(tmp_path / "missing.ckpt"),
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert torch.is_tensor(state["cls_token"])


def test_convert_refuses_bad_config_overrides(tmp_path: Path, capsys) -> None:
    """Unknown fields are not written into config.json, invalid values are one line, not a traceback; the
    conversion script speaks under its own name."""
    from safetensors.torch import save_file

    from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling

    state = {
        k.removeprefix("spad_vit."): v
        for k, v in SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT)).state_dict().items()
    }
    checkpoint = tmp_path / "up.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    base = ["convert", "spad", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]
    cases = {
        '{"num_attention_heads": 2, "bogus_field": 3}': "bogus_field",
        '{"num_attention_heads": 3}': "SpadViTConfig",  # 32 wide: heads do not divide it
        "[1, 2]": "JSON object",
        "{not json": "not valid JSON",
    }
    for config, phrase in cases.items():
        assert main([*base, "--config", config]) == 2, config
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out" / "config.json").exists()
    script = Path(__file__).resolve().parents[1] / "conversion" / "convert_spad_original_to_hf.py"
    done = subprocess.run(
        [sys.executable, str(script), "--checkpoint", str(checkpoint)], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        "convert_spad_original_to_hf.py"
    )
