"""Shared test fixtures: real data shipped by nibabel, nilearn and pydicom, and DICOM series built from it."""

from __future__ import annotations

import os

# Read once, when huggingface_hub is imported: set before anything imports it. Tests never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist every worker is a process of its own: one intra-op thread each keeps the workers from
# oversubscribing the cores (OpenMP threads spin-waiting on each other slow small-op tests by 50x).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The Triton kernel tests run on CPU tensors in Triton's interpreter. Triton reads this when it is imported,
# and some test modules' imports pull Triton in, so it is set here, before anything is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import copy
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _nilearn_data() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("nilearn.datasets") / "data"))


@pytest.fixture(scope="session")
def mni_t1_path() -> Path:
    return _nilearn_data() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="session")
def anatomical_path() -> Path:
    return NIBABEL_DATA / "anatomical.nii"


@pytest.fixture(scope="session")
def example4d_path() -> Path:
    return NIBABEL_DATA / "example4d.nii.gz"


@pytest.fixture(scope="session")
def ct_small_path() -> Path:
    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="session")
def mr_small_path() -> Path:
    return Path(get_testdata_file("MR_small.dcm"))


def write_dicom_series(
    folder: Path,
    template: Path,
    positions: list[np.ndarray] | list[None],
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    series_uid: str | None = None,
    shuffle_seed: int = 0,
    pixel_spacing: tuple[float, float] | None = None,
    size: tuple[int, int] | None = None,
    edit=None,
) -> list[np.ndarray]:
    """Write slices copied from ``template`` at ``positions`` (LPS mm) under shuffled file names.

    Each slice gets distinct pixels (the template plus 10 * slice index) so the sort order is testable.
    ``size`` crops the image to (rows, columns); ``edit(ds, index)`` may change anything else. A ``None``
    position writes a slice without ImagePositionPatient. Returns the stored pixel arrays in list order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(template)
    series_uid = series_uid or generate_uid()
    names = [f"IM{i:04d}.dcm" for i in range(len(positions))]
    random.Random(shuffle_seed).shuffle(names)
    stored = []
    for index, (position, name) in enumerate(zip(positions, names)):
        ds = copy.deepcopy(base)
        pixels = (ds.pixel_array.astype(np.int32) + 10 * index).astype(ds.pixel_array.dtype)
        if size is not None:
            pixels = np.ascontiguousarray(pixels[: size[0], : size[1]])
            ds.Rows, ds.Columns = size
        ds.PixelData = pixels.tobytes()
        if position is None:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        if pixel_spacing is not None:
            ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.InstanceNumber = index + 1
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        if edit is not None:
            edit(ds, index)
        ds.save_as(folder / name)
        stored.append(pixels)
    return stored


@pytest.fixture
def ct_series(tmp_path: Path, ct_small_path: Path) -> tuple[Path, list[np.ndarray], float]:
    """An axial series of 6 CT slices, 2.5 mm apart, files shuffled. Returns (folder, pixels, gap)."""
    origin = np.array([-158.135803, -179.035797, -75.699997])
    gap = 2.5
    positions = [origin + [0, 0, gap * k] for k in range(6)]
    pixels = write_dicom_series(tmp_path / "ct_series", ct_small_path, positions)
    return tmp_path / "ct_series", pixels, gap


# The parity fixtures are data, not tests: nothing under tests/fixtures is collected.
collect_ignore = ["fixtures"]

#: The upstream parity fixtures shipped with the project (one folder per family).
SHIPPED_FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixtures_root() -> Path:
    """Folder of upstream parity fixtures: ``MEDFM_FIXTURES`` when set, else ``tests/fixtures``.

    ``MEDFM_FIXTURES`` names a folder with the same layout (``<family>/upstream_config.json``, ...): a
    held-back fixture set made with other configs runs through the same tests that way.
    """
    configured = os.environ.get("MEDFM_FIXTURES")
    return Path(configured).expanduser().resolve() if configured else SHIPPED_FIXTURES


def family_fixtures(family: str) -> Path:
    """The fixture folder of ``family``; fails the calling test when it is missing (never skips)."""
    root = fixtures_root()
    folder = root / family
    if not folder.is_dir():
        source = (
            "MEDFM_FIXTURES" if os.environ.get("MEDFM_FIXTURES") else "the fixtures shipped in tests/fixtures"
        )
        pytest.fail(
            f"parity fixtures for {family!r} are missing: {folder} is not a folder (looked in {source}; "
            "MEDFM_FIXTURES=<folder> must hold one sub-folder per family)",
            pytrace=False,
        )
    return folder


@pytest.fixture(scope="session")
def upstream_fixtures():
    """Return a function ``family -> Path`` of that family's fixture folder.

    A missing folder fails the test (the fixtures ship with the project; see ``tests/fixtures/README.md``).
    ``MEDFM_REQUIRE_FIXTURES`` (set by ``.ci/run``) is no longer needed and changes nothing.
    """
    return family_fixtures
