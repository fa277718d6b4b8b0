"""NIfTI reading, canonical orientation and exact write-back, on shipped files and random geometries."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfm.errors import OverwriteInputError
from medfm.io import CANONICAL_CODES, load_volume, read_nifti, write_nifti

from ..conftest import NIBABEL_DATA


def _shipped_nifti(mni_t1_path: Path) -> list[Path]:
    return [
        mni_t1_path,
        NIBABEL_DATA / "anatomical.nii",  # big-endian int16, LAS
        NIBABEL_DATA / "resampled_anat_moved.nii",  # float32 with NaN, 4 x 4 x 8 mm
        NIBABEL_DATA / "reoriented_anat_moved.nii",
    ]


@pytest.mark.parametrize("index", range(4))
def test_read_write_round_trip_is_exact(index: int, mni_t1_path: Path, tmp_path: Path) -> None:
    path = _shipped_nifti(mni_t1_path)[index]
    volume = load_volume(path)
    out = write_nifti(volume, tmp_path / "copy.nii.gz")
    original, copy = nib.load(path), nib.load(out)
    assert copy.shape == original.shape
    assert np.array_equal(copy.affine, original.affine)
    assert np.array_equal(np.asarray(copy.dataobj), np.asarray(original.dataobj), equal_nan=True)
    assert copy.get_data_dtype().newbyteorder("=") == original.get_data_dtype().newbyteorder("=")
    assert copy.header["qform_code"] == original.header["qform_code"]
    assert copy.header["sform_code"] == original.header["sform_code"]


def test_multichannel_round_trip(example4d_path: Path, tmp_path: Path) -> None:
    volume = load_volume(example4d_path, allow_multichannel=True)
    assert volume.num_channels == 2
    assert volume.spatial_shape == (24, 96, 128)  # the 2.2 mm axis is through-plane
    out = write_nifti(volume, tmp_path / "copy.nii.gz")
    original, copy = nib.load(example4d_path), nib.load(out)
    assert copy.shape == original.shape
    assert np.array_equal(copy.affine, original.affine)
    assert np.array_equal(np.asarray(copy.dataobj), np.asarray(original.dataobj))


def test_canonical_orientation_of_shipped_files(mni_t1_path: Path) -> None:
    mni = load_volume(mni_t1_path)
    assert mni.orientation == "SPL" and mni.source_orientation == "RAS"
    assert mni.spatial_shape == (189, 233, 197)
    assert mni.spacing == (1.0, 1.0, 1.0)
    thick = load_volume(NIBABEL_DATA / "resampled_anat_moved.nii")  # 4 x 4 x 8 mm
    assert thick.spacing == (8.0, 4.0, 4.0)
    assert thick.spatial_shape == (3, 21, 17)
    # Native byte order: big-endian input comes back usable by torch.
    assert load_volume(NIBABEL_DATA / "anatomical.nii").array.dtype.isnative


def _world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ index + affine[:3, 3]


@settings(max_examples=25, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    flips=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    thick_axis=st.integers(0, 2),
    thickness=st.sampled_from([1.0, 2.5, 5.0]),
)
def test_random_geometry_canonicalises_and_writes_back(
    perm, flips, thick_axis, thickness, tmp_path_factory
) -> None:
    """Any axis order and flips: D is the thick axis, world positions of voxels are kept, write-back is exact."""
    tmp = tmp_path_factory.mktemp("geom")
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)
    spacing = [0.8, 0.8, 0.8]
    spacing[thick_axis] = thickness
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for voxel_axis, world_axis in enumerate(perm):
        affine[world_axis, voxel_axis] = (-1 if flips[voxel_axis] else 1) * spacing[voxel_axis]
    affine[:3, 3] = [10.0, -20.0, 30.0]
    data = rng.normal(size=shape).astype(np.float32)
    path = tmp / "random.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    volume = read_nifti(path)
    codes = volume.orientation
    assert tuple(codes) in CANONICAL_CODES.values()
    if thickness != 0.8:
        assert volume.spacing[0] == pytest.approx(thickness)  # the thick axis comes first
    else:
        assert codes[0] == "S"  # isotropic: axial by convention
    # Every canonical voxel sits at the same world position as its source voxel and holds its value.
    index_map = volume.source.transform.index_matrix(shape)
    for canonical in itertools.product(*(range(n) for n in volume.spatial_shape)):
        source = (index_map @ np.array([*canonical, 1.0]))[:3].round().astype(int)
        assert volume.array[(0, *canonical)] == data[tuple(source)]
        assert np.allclose(_world(volume.affine, np.array(canonical)), _world(affine, source))
    out = write_nifti(volume, tmp / "back.nii.gz")
    back = nib.load(out)
    assert np.array_equal(back.affine, nib.load(path).affine)
    assert np.array_equal(np.asarray(back.dataobj), data)


def test_writer_refuses_to_overwrite_input(anatomical_path: Path, tmp_path: Path) -> None:
    local = tmp_path / "anatomical.nii"
    local.write_bytes(anatomical_path.read_bytes())
    before = local.read_bytes()
    volume = load_volume(local)
    with pytest.raises(OverwriteInputError, match="refusing to write over the input"):
        write_nifti(volume, local)
    assert local.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anatomical.nii"]


def test_failed_write_leaves_nothing(anatomical_path: Path, tmp_path: Path, monkeypatch) -> None:
    volume = load_volume(anatomical_path)

    def broken_save(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(volume, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_canonical_grid_write_for_in_memory_volume(tmp_path: Path) -> None:
    from medfm.io import MedicalVolume

    volume = MedicalVolume.from_array(np.arange(24, dtype=np.int16).reshape(2, 3, 4), spacing=(3.0, 0.5, 0.7))
    out = write_nifti(volume, tmp_path / "array.nii")
    back = load_volume(out)
    assert back.spacing == pytest.approx((3.0, 0.5, 0.7))
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.affine, volume.affine)


@pytest.mark.parametrize(
    "shape", [(4, 5, 6, 1), (4, 5), (4, 5, 6, 1, 2)], ids=["4D one frame", "2D", "5D vector"]
)
def test_write_back_keeps_the_file_shape(shape: tuple[int, ...], tmp_path: Path) -> None:
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.7, 2.0, 1.0])), path)
    volume = read_nifti(path, allow_multichannel=True)
    back = nib.load(write_nifti(volume, tmp_path / "out.nii.gz"))
    assert back.shape == shape
    assert np.array_equal(np.asarray(back.dataobj), data)


def test_nifti2_round_trip(tmp_path: Path) -> None:
    affine = np.array(
        [[-0.9, 0.01, 0, 90.123456789], [0, 1.1, 0.02, -120.5], [0, 0, 3.0, 33.3], [0, 0, 0, 1]]
    )
    data = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
    path = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(data, affine), path)
    back = nib.load(write_nifti(read_nifti(path), tmp_path / "back.nii"))
    assert isinstance(back, nib.Nifti2Image)
    assert np.array_equal(back.affine, nib.load(path).affine)
    assert np.array_equal(np.asarray(back.dataobj), data)


def test_label_maps_of_any_integer_type_write(tmp_path: Path, anatomical_path: Path) -> None:
    from medfm.io import MedicalVolume

    labels = MedicalVolume.from_array(np.arange(60, dtype=np.int64).reshape(3, 4, 5), spacing=1.0)
    assert nib.load(write_nifti(labels, tmp_path / "int64.nii.gz")).get_data_dtype() == np.int16
    volume = load_volume(anatomical_path)
    mask = volume.with_array(volume.array > 50)  # bool, on the source grid
    out = nib.load(write_nifti(mask, tmp_path / "mask.nii.gz"))
    assert out.get_data_dtype() == np.uint8 and out.header["cal_max"] == 0
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(nib.load(anatomical_path).dataobj) > 50)


def test_written_files_follow_the_umask(anatomical_path: Path, tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    out = write_nifti(load_volume(anatomical_path), tmp_path / "perm.nii.gz")
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize(
    ("voxels", "phrase"),
    [
        (np.zeros((4, 4, 4), np.complex64), "complex"),
        (np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), "RGB"),
    ],
    ids=["complex", "rgb24"],
)
def test_unsupported_voxel_types(voxels: np.ndarray, phrase: str, tmp_path: Path) -> None:
    from medfm.errors import UnsupportedFormatError

    path = tmp_path / "odd.nii"
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), path)
    with pytest.raises(UnsupportedFormatError, match=phrase):
        load_volume(path)


def test_unknown_datatype_code_is_a_corrupt_file(tmp_path: Path) -> None:
    from medfm.errors import CorruptFileError

    path = tmp_path / "code.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[70:72] = np.int16(999).tobytes()  # the datatype field
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=str(path)):
        load_volume(path)
