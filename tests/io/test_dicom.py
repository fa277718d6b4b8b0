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


# --- geometry of every kind of series: each stored pixel must land where DICOM says it is ----------------

_ORIGIN = np.array([-40.0, 25.0, 12.5])
_GEOMETRIES = {
    # name: (row cosine + column cosine, step between slice positions in LPS)
    "axial": ((1, 0, 0, 0, 1, 0), (0.0, 0.0, 2.5)),
    "coronal": ((1, 0, 0, 0, 0, -1), (0.0, 3.0, 0.0)),
    "sagittal": ((0, 1, 0, 0, 0, -1), (-1.5, 0.0, 0.0)),
    "oblique": ((0.8660254, 0.5, 0, -0.5, 0.8660254, 0), (0.0, 0.0, 2.0)),
    "gantry tilt": ((1, 0, 0, 0, 1, 0), (0.0, 1.0, 2.5)),  # each slice shifted 1 mm posterior
}


@pytest.mark.parametrize("name", sorted(_GEOMETRIES))
def test_every_pixel_lands_at_its_dicom_world_position(
    name: str, tmp_path: Path, ct_small_path: Path
) -> None:
    orientation, step = _GEOMETRIES[name]
    positions = [_ORIGIN + k * np.array(step) for k in range(4)]
    spacing = (0.7, 1.3)  # rectangular pixels: PixelSpacing[0] between rows, [1] between columns
    pixels = write_dicom_series(
        tmp_path / name,
        ct_small_path,
        positions,
        orientation=orientation,
        pixel_spacing=spacing,
        size=(40, 60),
    )
    volume = load_volume(tmp_path / name)
    row_cos, col_cos = np.array(orientation[:3]), np.array(orientation[3:])
    to_index = np.linalg.inv(volume.affine)
    rng = np.random.default_rng(1)
    for k, position in enumerate(positions):
        for r, c in [(0, 0), (39, 59), (0, 59), *rng.integers(0, [40, 60], size=(6, 2))]:
            lps = position + c * spacing[1] * row_cos + r * spacing[0] * col_cos
            index = to_index @ np.array([*(LPS_TO_RAS @ lps), 1.0])
            assert np.allclose(index[:3], np.round(index[:3]), atol=1e-4), (k, r, c, index)
            d, h, w = np.round(index[:3]).astype(int)
            assert volume.array[0, d, h, w] == int(pixels[k][r, c]) - 1024
    if name == "gantry tilt":
        assert volume.metadata["gantry_tilt_degrees"] == pytest.approx(
            np.degrees(np.arctan(1.0 / 2.5)), abs=1e-3
        )


def test_coronal_series_canonical_codes(tmp_path: Path, ct_small_path: Path) -> None:
    orientation, step = _GEOMETRIES["coronal"]
    write_dicom_series(
        tmp_path / "cor",
        ct_small_path,
        [_ORIGIN + k * np.array(step) for k in range(3)],
        orientation=orientation,
    )
    volume = load_volume(tmp_path / "cor")
    assert volume.orientation == "PIL"
    assert volume.spacing == pytest.approx((3.0, 0.661468, 0.661468))


def test_series_origin_is_the_first_slice_in_position_order(ct_series) -> None:
    folder, _, gap = ct_series
    volume = load_volume(folder)
    origin = np.array([-158.135803, -179.035797, -75.699997])  # the lowest slice
    assert np.allclose(volume.affine[:3, 3], LPS_TO_RAS @ origin)
    last = volume.affine @ [5, 0, 0, 1]
    assert np.allclose(last[:3], LPS_TO_RAS @ (origin + [0, 0, 5 * gap]))


# --- series that no single grid can hold ------------------------------------------------------------


def _axial(k: float) -> np.ndarray:
    return _ORIGIN + [0.0, 0.0, 2.5 * k]


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing slice", "not evenly spaced"),
        ("duplicate position", "share a position"),
        ("two orientations", "differ in ImageOrientationPatient"),
        ("two pixel spacings", "differ in PixelSpacing"),
        ("some without position", "lack ImagePositionPatient"),
    ],
)
def test_inconsistent_series_raise(case: str, phrase: str, tmp_path: Path, ct_small_path: Path) -> None:
    from medfm.errors import DicomSeriesError

    positions = [_axial(k) for k in (0, 1, 2, 3)]
    edit = None
    if case == "missing slice":
        positions = [_axial(k) for k in (0, 1, 3, 4)]
    elif case == "duplicate position":
        positions = [_axial(k) for k in (0, 1, 1, 2)]
    elif case == "two orientations":

        def edit(ds, index):
            if index == 2:
                ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    elif case == "two pixel spacings":

        def edit(ds, index):
            if index == 2:
                ds.PixelSpacing = [0.5, 0.5]
    elif case == "some without position":
        positions[1] = None
    write_dicom_series(tmp_path / "bad", ct_small_path, positions, edit=edit)
    with pytest.raises(DicomSeriesError, match=phrase) as caught:
        load_volume(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(caught.value)


def test_series_without_positions_sorted_by_instance_number(tmp_path: Path, ct_small_path: Path) -> None:
    pixels = write_dicom_series(tmp_path / "nopos", ct_small_path, [None, None, None])
    with pytest.warns(UserWarning, match="ordered by InstanceNumber"):
        volume = load_volume(tmp_path / "nopos")
    for k in range(3):
        assert np.array_equal(volume.array[0, k], pixels[k].astype(np.int32) - 1024)
    assert volume.spacing[0] == pytest.approx(5.0)  # SliceThickness


def test_monochrome1_is_inverted(tmp_path: Path, mr_small_path: Path) -> None:
    def as_monochrome1(ds, index):
        ds.PhotometricInterpretation = "MONOCHROME1"

    pixels = write_dicom_series(tmp_path / "m1", mr_small_path, [np.zeros(3)], edit=as_monochrome1)
    volume = load_volume(tmp_path / "m1")
    stored = pixels[0].astype(np.int32)
    assert np.array_equal(volume.array[0, 0], stored.max() + stored.min() - stored)
    assert volume.metadata["photometric_interpretation"] == "MONOCHROME1"


def test_multi_frame_rejected_in_any_slice(tmp_path: Path, ct_small_path: Path) -> None:
    from medfm.errors import UnsupportedFormatError

    def second_is_multiframe(ds, index):
        if index == 1:
            ds.NumberOfFrames = 2

    write_dicom_series(
        tmp_path / "mf", ct_small_path, [_axial(k) for k in range(3)], edit=second_is_multiframe
    )
    with pytest.raises(UnsupportedFormatError, match="multi-frame"):
        load_volume(tmp_path / "mf")


def test_pixel_data_of_the_wrong_size_is_corrupt(tmp_path: Path, ct_small_path: Path) -> None:
    from medfm.errors import CorruptFileError

    def extra_bytes(ds, index):
        ds.PixelData = ds.PixelData * 2

    write_dicom_series(tmp_path / "extra", ct_small_path, [_axial(0)], edit=extra_bytes)
    with pytest.raises(CorruptFileError, match="Rows, Columns and SamplesPerPixel"):
        load_volume(next((tmp_path / "extra").iterdir()))


def test_file_without_preamble_is_read(tmp_path: Path, ct_small_path: Path) -> None:
    ds = pydicom.dcmread(ct_small_path)
    ds.preamble = None
    path = tmp_path / "no_preamble.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(load_volume(path).array, load_volume(ct_small_path).array)


def test_writer_refuses_to_write_inside_an_input_series_folder(ct_series) -> None:
    from medfm.errors import OverwriteInputError

    folder, _, _ = ct_series
    volume = load_volume(folder)
    with pytest.raises(OverwriteInputError):
        write_nifti(volume, folder / "inside.nii.gz")
    assert not (folder / "inside.nii.gz").exists()


def test_no_shipped_dicom_file_escapes_as_a_foreign_exception() -> None:
    """Every pydicom test file either loads or raises a MedfmError (never a pydicom/numpy exception)."""
    import warnings

    from pydicom.data import get_testdata_file

    from medfm.errors import MedfmError

    folder = Path(get_testdata_file("CT_small.dcm")).parent
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert len(files) > 50
    loaded = 0
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                load_volume(path)
                loaded += 1
            except MedfmError:
                pass
    assert loaded > 20
