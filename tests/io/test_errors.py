"""Bad input raises the right typed error, names the file and the problem, and writes nothing."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medfm.cli import main
from medfm.errors import (
    CorruptFileError,
    EmptySeriesError,
    InvalidGeometryError,
    InvalidIntensityError,
    MedfmError,
    MixedSeriesError,
    UnsupportedFormatError,
    VolumeNotFoundError,
    VolumeShapeError,
)
from medfm.io import MedicalVolume, load_volume

from ..conftest import write_dicom_series


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _crafted(tmp: Path, edit) -> Path:
    """A .nii whose header is edited as stored on disk (nibabel would repair these fields when saving)."""
    path = tmp / "crafted.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header(bytes(raw[:348]), check=False)
    edit(header)
    raw[:348] = header.binaryblock
    path.write_bytes(bytes(raw))
    return path


def _pixdim(tmp: Path, zooms: tuple[float, float, float]) -> Path:
    """Geometry from pixdim only (no qform/sform), with the given spacing."""

    def edit(header: nib.Nifti1Header) -> None:
        header["qform_code"], header["sform_code"] = 0, 0
        header["pixdim"][1:4] = zooms

    return _crafted(tmp, edit)


def _sform(tmp: Path, affine: np.ndarray) -> Path:
    """Geometry from this sform (no qform)."""

    def edit(header: nib.Nifti1Header) -> None:
        header["qform_code"], header["sform_code"] = 0, 2
        header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]

    return _crafted(tmp, edit)


def _truncated_gz(tmp: Path, source: Path) -> Path:
    raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    whole = gzip.compress(raw)
    path = tmp / "truncated.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _two_series(tmp: Path, ct: Path) -> Path:
    write_dicom_series(
        tmp / "two" / "a", ct, [np.array([0.0, 0.0, k]) for k in range(2)], series_uid="1.2.826.1"
    )
    write_dicom_series(
        tmp / "two" / "b", ct, [np.array([0.0, 0.0, k]) for k in range(2)], series_uid="1.2.826.2"
    )
    return tmp / "two"


def _empty_folder(tmp: Path) -> Path:
    folder = tmp / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return folder


CASES = {
    "missing file": (VolumeNotFoundError, "no such file", lambda tmp, files: tmp / "absent.nii.gz"),
    "text file": (
        UnsupportedFormatError,
        "expected NIfTI",
        lambda tmp, files: _write(tmp / "scan.txt", b"hello"),
    ),
    "png named nii": (
        CorruptFileError,
        "not a readable NIfTI",
        lambda tmp, files: _write(tmp / "scan.nii", b"\x89PNG" * 100),
    ),
    "truncated nii.gz": (
        CorruptFileError,
        "truncated",
        lambda tmp, files: _truncated_gz(tmp, files["anatomical"]),
    ),
    "4D volume": (VolumeShapeError, "expected a 3D volume", lambda tmp, files: files["example4d"]),
    "all NaN": (
        InvalidIntensityError,
        "every voxel is NaN",
        lambda tmp, files: _nifti(tmp / "nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32)),
    ),
    "with Inf": (
        InvalidIntensityError,
        "Inf",
        lambda tmp, files: _nifti(
            tmp / "inf.nii.gz",
            np.where(np.eye(4)[..., None] > 0, np.inf, 1.0).repeat(4, axis=2).astype(np.float32),
        ),
    ),
    "zero spacing": (
        InvalidGeometryError,
        "zero, negative",
        lambda tmp, files: _pixdim(tmp, (1.0, 0.0, 1.0)),
    ),
    "negative spacing": (
        InvalidGeometryError,
        "zero, negative",
        lambda tmp, files: _pixdim(tmp, (1.0, -2.0, 1.0)),
    ),
    "zero axis in sform": (
        InvalidGeometryError,
        "zero axis",
        lambda tmp, files: _sform(tmp, np.diag([1.0, 0.0, 1.0, 1.0])),
    ),
    "singular affine": (
        InvalidGeometryError,
        "singular",
        lambda tmp, files: _sform(tmp, np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
    ),
    "empty DICOM folder": (EmptySeriesError, "no DICOM image found", lambda tmp, files: _empty_folder(tmp)),
    "two series": (MixedSeriesError, "holds 2 series", lambda tmp, files: _two_series(tmp, files["ct"])),
    "truncated DICOM": (
        CorruptFileError,
        "cannot be decoded",
        lambda tmp, files: Path(get_testdata_file("MR_truncated.dcm")),
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def shipped(anatomical_path, example4d_path, ct_small_path) -> dict[str, Path]:
    return {"anatomical": anatomical_path, "example4d": example4d_path, "ct": ct_small_path}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_typed_error_naming_file(case: str, tmp_path: Path, shipped) -> None:
    error_type, phrase, make = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = make(inputs, shipped)
    with pytest.raises(error_type) as caught:
        load_volume(path)
    assert isinstance(caught.value, MedfmError)
    assert str(path) in str(caught.value)
    assert phrase in str(caught.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_leaves_nothing_written(case: str, tmp_path: Path, shipped, capsys) -> None:
    _, phrase, make = CASES[case]
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    path = make(inputs, shipped)
    status = main(["preprocess", str(path), "--preset", "ct", "--out", str(outputs / "out.nii.gz")])
    assert status == 2
    err = capsys.readouterr().err
    assert str(path) in err and phrase in err
    assert list(outputs.iterdir()) == []


def test_array_spacing_errors() -> None:
    data = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(InvalidGeometryError, match="finite and positive"):
        MedicalVolume.from_array(data, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(InvalidGeometryError, match="finite and positive"):
        MedicalVolume.from_array(data, spacing=(0.0, 1.0, 1.0))
    with pytest.raises(InvalidGeometryError, match=r"expected \(z, y, x\)"):
        MedicalVolume.from_array(data, spacing=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(VolumeShapeError, match="expected"):
        MedicalVolume.from_array(np.zeros((1, 1, 2, 3, 4)), spacing=1.0)
    with pytest.raises(InvalidIntensityError):
        MedicalVolume.from_array(np.full((2, 3), np.inf), spacing=1.0)
