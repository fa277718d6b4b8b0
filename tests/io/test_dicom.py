"""DICOM reading: single files and series, slice sorting, geometry, and write-back through NIfTI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfm.io import load_volume, read_dicom, write_nifti

from ..conftest import write_dicom_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def test_single_ct_slice(ct_small_path: Path) -> None:
    volume = load_volume(ct_small_path)
    ds = pydicom.dcmread(ct_small_path)
    assert volume.modality == "CT"
    assert volume.array.shape == (1, 1, 128, 128)
    assert volume.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    # Hounsfield units: stored * RescaleSlope + RescaleIntercept, rows and columns as stored (LPS axial).
    expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert np.array_equal(volume.array[0, 0], expected)
    assert volume.orientation == "SPL"
    # Voxel (0, 0, 0) is at ImagePositionPatient (converted to RAS).
    origin = volume.affine[:3, 3]
    assert np.allclose(origin, LPS_TO_RAS @ np.array([float(v) for v in ds.ImagePositionPatient]))


def test_series_is_sorted_by_position_and_spaced_by_it(ct_series) -> None:
    folder, pixels, gap = ct_series
    volume = load_volume(folder)
    assert volume.array.shape == (1, 6, 128, 128)
    assert volume.spacing[0] == pytest.approx(gap)
    for k, stored in enumerate(pixels):
        assert np.array_equal(volume.array[0, k], stored.astype(np.int32) - 1024)
    assert volume.metadata["num_slices"] == 6
    first = pydicom.dcmread(next(folder.iterdir()))
    # Slice k lies k * gap above the first (S is +z in both LPS and RAS).
    assert np.allclose(volume.affine[:3, 0], [0.0, 0.0, gap])
    assert first.Modality == volume.modality


def test_sagittal_series_gets_sagittal_canonical_codes(tmp_path: Path, mr_small_path: Path) -> None:
    # Rows run towards P, columns towards feet: a sagittal acquisition stacked along +x (patient left).
    positions = [np.array([10.0 + 3.0 * k, -90.0, 60.0]) for k in range(4)]
    write_dicom_series(tmp_path / "sag", mr_small_path, positions, orientation=(0, 1, 0, 0, 0, -1))
    volume = load_volume(tmp_path / "sag")
    assert volume.orientation == "RIP"
    assert volume.spacing == pytest.approx((3.0, 0.3125, 0.3125))
    assert volume.modality == "MR"


@pytest.mark.parametrize("which", ["ct_small_path", "mr_small_path"])
def test_dicom_to_nifti_round_trip(which: str, request, tmp_path: Path) -> None:
    volume = load_volume(request.getfixturevalue(which))
    back = load_volume(write_nifti(volume, tmp_path / "slice.nii.gz"))
    assert back.array.shape == volume.array.shape
    assert np.array_equal(back.array, volume.array)
    # NIfTI stores the affine in float32.
    assert np.allclose(back.affine, volume.affine, rtol=1e-6, atol=1e-4)


def test_series_round_trip_through_nifti(ct_series, tmp_path: Path) -> None:
    folder, _, _ = ct_series
    volume = load_volume(folder)
    back = load_volume(write_nifti(volume, tmp_path / "series.nii.gz"))
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.affine, volume.affine, atol=1e-4)
    assert back.orientation == volume.orientation


def test_series_uid_selects_one_series(tmp_path: Path, ct_small_path: Path) -> None:
    origin = np.zeros(3)
    write_dicom_series(
        tmp_path / "mix", ct_small_path, [origin + [0, 0, k] for k in range(3)], series_uid="1.2.3.1"
    )
    # Same file names would collide; write the second series into a subfolder.
    write_dicom_series(
        tmp_path / "mix" / "b", ct_small_path, [origin + [0, 0, k] for k in range(2)], series_uid="1.2.3.2"
    )
    volume = read_dicom(tmp_path / "mix", series_uid="1.2.3.2")
    assert volume.spatial_shape[0] == 2
