"""Bad input never becomes an answer (issue 12, first part): a corrupt gzip stream, voxels beyond float32,
processor steps that produce NaN or Inf, impossible step parameters, and non-finite logits are typed errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm.errors import CorruptFileError, InvalidIntensityError, ProcessorConfigError
from medfm.inference import NonFiniteOutputError, sliding_window_logits
from medfm.io import MedicalVolume, load_volume
from medfm.processing import MedicalImageProcessor

from ..common.tiny_models import save_tiny_segmentation_model


def test_flipped_bytes_in_a_gzip_stream_are_detected(tmp_path: Path, mni_t1_path: Path) -> None:
    """The MNI152 with bytes flipped in the middle of the compressed stream used to decode to wrong voxels."""
    raw = bytearray(mni_t1_path.read_bytes())
    middle = len(raw) // 2
    damaged = None
    for offset in range(0, 4096, 512):  # find a flip that still inflates (a plain decoder error is easier)
        candidate = bytearray(raw)
        for i in range(middle + offset, middle + offset + 4):
            candidate[i] ^= 0xFF
        try:
            gzip.decompress(bytes(candidate))
        except gzip.BadGzipFile as error:
            if "CRC" in str(error):
                damaged = candidate
                break
        except Exception:
            continue
    assert damaged is not None, "no flip that inflates cleanly was found"
    path = tmp_path / "flipped.nii.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptFileError, match="CRC") as raised:
        load_volume(path)
    assert str(path) in str(raised.value)


def test_voxels_beyond_float32_are_refused(tmp_path: Path) -> None:
    data = np.ones((4, 5, 6), dtype=np.float64)
    data[1, 2, 3] = 1e300
    path = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InvalidIntensityError, match="float32"):
        MedicalImageProcessor(steps=[{"name": "minmax"}])(str(path))


@pytest.mark.parametrize(
    ("steps", "phrase"),
    [
        ([{"name": "zscore", "eps": 0.0}], "zscore"),  # a constant image: std 0, no epsilon
        ([{"name": "normalize", "mean": [0.0], "std": [0.0]}], "normalize"),
        ([{"name": "scale_shift", "scale": float("nan"), "shift": 0.0}], "scale_shift"),
    ],
)
def test_steps_that_make_non_finite_values_are_named(steps, phrase) -> None:
    volume = MedicalVolume.from_array(np.full((4, 8, 8), 7.0, dtype=np.float32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises((InvalidIntensityError, ProcessorConfigError), match=phrase):
        MedicalImageProcessor(steps=steps)(volume)


def test_impossible_step_parameters_fail_when_built() -> None:
    with pytest.raises(ProcessorConfigError, match="above high"):
        MedicalImageProcessor(steps=[{"name": "clip", "low": 5, "high": 1}])


def test_non_finite_logits_are_not_a_label_map(tmp_path: Path) -> None:
    model = save_tiny_segmentation_model(tmp_path / "seg")
    with torch.no_grad():
        model.decoder.heads[0].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="non-finite logits"):
        sliding_window_logits(model, torch.randn(1, 8, 32, 64))


def test_a_full_disk_names_the_file_and_leaves_nothing(
    tmp_path: Path, anatomical_path: Path, monkeypatch
) -> None:
    """Writers report a full disk (or a file too large) as a typed error naming the output; no partial file."""
    import errno

    import nibabel

    from medfm.errors import OutputWriteError
    from medfm.io import write_nifti

    volume = load_volume(anatomical_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nibabel, "save", full_disk)
    target = tmp_path / "out" / "seg.nii.gz"
    with pytest.raises(OutputWriteError, match="the disk is full") as raised:
        write_nifti(volume, target)
    assert str(target) in str(raised.value)
    assert not list((tmp_path / "out").iterdir())


def test_percentile_clip_of_an_image_spanning_float32(tmp_path: Path) -> None:
    """Finite float32 values near +/-3.4e38 used to overflow (x - low) and were refused; now rescaled."""
    array = np.linspace(-3.0e38, 3.0e38, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    out = MedicalImageProcessor(steps=[{"name": "percentile_clip", "rescale": True}])(
        array, spacing=(1.0, 1.0, 1.0)
    )
    values = out["pixel_values"]
    assert torch.isfinite(values).all()
    assert float(values.min()) == pytest.approx(0.0, abs=1e-6) and float(values.max()) == pytest.approx(
        1.0, abs=1e-6
    )


def test_a_damaged_vox_offset_in_a_gzip_is_corrupt_not_a_memory_error(tmp_path: Path) -> None:
    from medfm.io import read_nifti

    image = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    raw = bytearray(image.to_bytes())
    good = tmp_path / "good.nii.gz"
    good.write_bytes(gzip.compress(bytes(raw)))
    assert np.array_equal(read_nifti(good).to_source_array(), np.arange(24).reshape(2, 3, 4))
    raw[108:112] = np.array([2.0**40], dtype="<f4").tobytes()  # vox_offset (float32 at byte 108)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(CorruptFileError, match="vox_offset"):
        read_nifti(bad)
