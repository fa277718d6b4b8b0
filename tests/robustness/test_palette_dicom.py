"""Palette-colour DICOM (issue 12, item 9): PALETTE COLOR pixels are indices into colour tables, so they are
mapped through the file's own palette to three RGB channels, and a file whose palette is missing or damaged is
refused with a typed error naming it, never read as a grey image of indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut

from medfm.errors import UnsupportedFormatError
from medfm.io import load_volume
from medfm.io.dicom import read_dicom


@pytest.fixture(scope="module")
def palette_file() -> Path:
    """pydicom's 350 x 800 ultrasound image with 16-bit red, green and blue palette tables."""
    path = get_testdata_file("examples_palette.dcm")
    if path is None:
        pytest.skip("pydicom's examples_palette.dcm is not installed")
    return Path(path)


def _expected_rgb(path: Path) -> np.ndarray:
    """What pydicom's own palette mapping gives, as (3, rows, columns)."""
    ds = pydicom.dcmread(path)
    return np.moveaxis(apply_color_lut(ds.pixel_array, ds), -1, 0)


def _source_order(volume) -> np.ndarray:
    """The volume's voxels back in the file's (slice, row, column) order."""
    return volume.source.transform.invert(volume.array)


def test_palette_file_is_mapped_to_rgb_channels(palette_file: Path) -> None:
    with pytest.warns(UserWarning, match="incomplete patient geometry"):
        volume = read_dicom(palette_file)
    expected = _expected_rgb(palette_file)
    assert expected.shape == (3, 350, 800)
    assert volume.array.shape[0] == 3  # (C, D, H, W): red, green, blue
    source = _source_order(volume)
    assert source.shape == (3, 1, 350, 800)
    # A few pixels, each equal to the palette entry of its stored index (the indices alone would be 0-255).
    for row, column in [(0, 0), (175, 400), (100, 250), (300, 700), (349, 799)]:
        assert source[:, 0, row, column].tolist() == expected[:, row, column].tolist()
    np.testing.assert_array_equal(source[:, 0], expected)
    assert int(volume.array.max()) > 255  # 16-bit tables: values are colours, not 8-bit indices
    assert volume.metadata["photometric_interpretation"] == "PALETTE COLOR"


def test_palette_file_through_load_volume(palette_file: Path) -> None:
    with pytest.warns(UserWarning, match="incomplete patient geometry"):
        volume = load_volume(palette_file)
    np.testing.assert_array_equal(_source_order(volume)[:, 0], _expected_rgb(palette_file))


def test_palette_series_maps_every_slice(palette_file: Path, tmp_path: Path) -> None:
    """Two slices of a series, each with the palette applied (geometry given so they stack)."""
    folder = tmp_path / "series"
    folder.mkdir()
    for index in range(2):
        ds = pydicom.dcmread(palette_file)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImagePositionPatient = [0, 0, 2.0 * index]
        ds.InstanceNumber = index + 1
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"slice{index}.dcm")
    volume = read_dicom(folder)
    source = _source_order(volume)
    assert source.shape == (3, 2, 350, 800)
    expected = _expected_rgb(palette_file)
    for index in range(2):
        np.testing.assert_array_equal(source[:, index], expected)


def _drop(name: str):
    return lambda ds: delattr(ds, name)


def _truncate_green(ds) -> None:
    ds.GreenPaletteColorLookupTableData = ds.GreenPaletteColorLookupTableData[:100]


def _twelve_bit_entries(ds) -> None:
    ds.RedPaletteColorLookupTableDescriptor = [256, 0, 12]


@pytest.mark.parametrize(
    "damage",
    [
        _drop("RedPaletteColorLookupTableData"),
        _drop("BluePaletteColorLookupTableData"),
        _drop("RedPaletteColorLookupTableDescriptor"),
        _truncate_green,
        _twelve_bit_entries,
    ],
    ids=["no-red-data", "no-blue-data", "no-red-descriptor", "short-green-table", "12-bit-entries"],
)
def test_palette_file_without_usable_tables_is_refused(palette_file: Path, tmp_path: Path, damage) -> None:
    ds = pydicom.dcmread(palette_file)
    damage(ds)
    target = tmp_path / "no_palette.dcm"
    ds.save_as(target)
    before = target.read_bytes()
    with (
        pytest.warns(UserWarning, match="incomplete patient geometry"),
        pytest.raises(UnsupportedFormatError, match=r"no_palette\.dcm: PALETTE COLOR") as caught,
    ):
        read_dicom(target)
    assert caught.value.path == str(target)
    assert target.read_bytes() == before  # the input is never modified
