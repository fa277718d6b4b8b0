"""Memory budgets (issue 12, item 3): what a read, resample, resize or pad would allocate is computed first and
refused beyond the budget with a typed error giving the numbers; implausible spacings warn."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medfm.errors import MedfmError, MemoryBudgetError, ProcessorConfigError, VolumeShapeError
from medfm.io import MedicalVolume, load_volume
from medfm.memory import BUDGET_ENV, available_memory, check_allocation, memory_budget, parse_size
from medfm.processing import MedicalImageProcessor
from medfm.processing.spatial import pad_symmetric, resize


def _header_only(path: Path, header: nib.Nifti1Header, shape: tuple[int, ...]) -> Path:
    """A NIfTI file whose header claims ``shape`` float32 voxels and that holds a few bytes of them."""
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    with open(path, "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * 900)
    return path


def test_a_1_4_kb_header_claiming_100000_cubed_voxels_is_refused(tmp_path: Path) -> None:
    path = _header_only(tmp_path / "huge.nii", nib.Nifti2Header(), (100000, 100000, 100000))
    assert path.stat().st_size < 1500
    with pytest.raises(MemoryBudgetError) as raised:
        load_volume(path)
    message = str(raised.value)
    assert isinstance(raised.value, MemoryError) and isinstance(raised.value, MedfmError)
    assert str(path) in message
    assert "needs 8.0e15 bytes" in message
    assert "(100000, 100000, 100000) float32" in message
    assert "the budget is" in message


def test_a_truncated_nifti1_claiming_the_largest_grid_is_refused(tmp_path: Path) -> None:
    """Written with nibabel, then cut to its header and a few bytes, then its dims rewritten."""
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)
    header = nib.load(path).header.copy()
    header.set_data_shape((32767, 32767, 32767))
    path.write_bytes(
        header.binaryblock + bytes(4) + path.read_bytes()[352:452]
    )  # header, extension flag, 100 B
    with pytest.raises(MemoryBudgetError, match=r"\(32767, 32767, 32767\) int16"):
        load_volume(path)


def test_the_budget_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(np.ones((40, 40, 40), np.float32), np.eye(4)), path)
    monkeypatch.setenv(BUDGET_ENV, "100kB")
    with pytest.raises(
        MemoryBudgetError, match=r"needs 5\.1e5 bytes .*the budget is 100\.0 kB \(MEDFM_MEMORY_BUDGET\)"
    ):
        load_volume(path)
    monkeypatch.setenv(BUDGET_ENV, "8GB")
    assert load_volume(path).spatial_shape == (40, 40, 40)


def test_the_default_budget_is_a_share_of_the_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    budget, source = memory_budget()
    available = available_memory()
    assert available is not None and budget is not None
    assert 0.7 * available < budget < 0.9 * available
    assert "available" in source and BUDGET_ENV in source


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1e9", 10**9), ("123456", 123456), (" 2 gb ", 2 * 10**9)],
)
def test_sizes_parse(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 parsecs", "0", "-5GB", "1e400"])
def test_a_bad_budget_is_a_typed_error(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_ENV, text)
    with pytest.raises(MemoryBudgetError, match=BUDGET_ENV):
        check_allocation(1, "one byte")


def test_a_1e5_mm_spacing_makes_resample_ask_for_10_18_voxels(tmp_path: Path) -> None:
    path = tmp_path / "wide.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), np.diag([1e5, 1e5, 1e5, 1.0])), path)
    processor = MedicalImageProcessor(preset="mim-spleen")  # resample to 1 mm
    with pytest.warns(UserWarning, match=rf"{path}: voxel spacing .* outside what a scanner produces"):
        volume = load_volume(path)
    with pytest.raises(MemoryBudgetError) as raised:
        processor(volume)
    message = str(raised.value)
    assert str(path) in message
    assert "needs 8.0e18 bytes" in message
    assert "(1, 1000000, 1000000, 1000000) float32 grid" in message
    assert "'resample' step" in message


def test_the_same_spacing_given_with_an_array(tmp_path: Path) -> None:
    processor = MedicalImageProcessor(preset="mim-spleen")
    with pytest.warns(UserWarning, match="array input"), pytest.raises(MemoryBudgetError, match=r"8\.0e18"):
        processor(np.zeros((10, 10, 10), np.float32), spacing=(1e5, 1e5, 1e5))


def test_resize_and_pad_beyond_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_ENV, "1MB")
    image = np.zeros((4, 4, 4), np.float32)
    resizing = MedicalImageProcessor(steps=[{"name": "resize", "size": [100, 100, 100]}])
    with pytest.raises(MemoryBudgetError, match=r"\(1, 100, 100, 100\) float32 grid .*'resize' step"):
        resizing(image, spacing=1.0)
    padding = MedicalImageProcessor(steps=[{"name": "pad_to_multiple", "multiple": 128}])
    with pytest.raises(MemoryBudgetError, match=r"\(1, 128, 128, 128\) float32 padded grid"):
        padding(image, spacing=1.0)
    with pytest.raises(MemoryBudgetError, match="padded grid"):
        MedicalImageProcessor(steps=[{"name": "pad_to_multiple", "multiple": 128, "value": "min"}])(
            image, spacing=1.0
        )
    # Within the budget the same steps give the right grid.
    small = MedicalImageProcessor(steps=[{"name": "resize", "size": [8, 8, 8]}])(image, spacing=1.0)
    assert small["pixel_values"].shape == (1, 1, 8, 8, 8)


def test_mapping_a_prediction_back_onto_a_huge_grid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_ENV, "1MB")
    with pytest.raises(MemoryBudgetError, match="mapping a prediction back"):
        from medfm.processing.spatial import undo_operations

        undo_operations(
            torch.zeros(1, 2, 2, 2), [{"op": "resize", "from": [500, 500, 500], "to": [2, 2, 2]}], "linear"
        )


def test_a_dicom_whose_rows_and_columns_claim_a_huge_image_is_refused(
    tmp_path: Path, ct_small_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BUDGET_ENV, "1GB")
    ds = pydicom.dcmread(ct_small_path)
    ds.Rows, ds.Columns = 65535, 65535
    path = tmp_path / "huge.dcm"
    ds.save_as(path)
    with pytest.raises(MemoryBudgetError, match=r"1 slice\(s\) of 65535 x 65535 pixels") as raised:
        load_volume(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("spacing", [1e-4, 5e3])
def test_implausible_nifti_spacings_warn_naming_the_file(tmp_path: Path, spacing: float) -> None:
    path = tmp_path / "odd.nii"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.diag([spacing, 1.0, 1.0, 1.0])), path)
    with pytest.warns(UserWarning, match=rf"{path}: voxel spacing"):
        load_volume(path)


def test_plausible_spacings_do_not_warn(tmp_path: Path) -> None:
    path = tmp_path / "fine.nii"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.diag([0.5, 0.8, 3.0, 1.0])), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_volume(path)
        MedicalVolume.from_array(np.ones((3, 3, 3)), (1e-3, 1.0, 1e3))


def test_spatial_helpers_give_typed_errors_for_impossible_requests() -> None:
    volume = torch.zeros(1, 1, 2, 2)
    with pytest.raises(VolumeShapeError, match="reflect padding"):
        pad_symmetric(volume, [(0, 0), (3, 3), (0, 0)], mode="reflect")
    with pytest.raises(ProcessorConfigError, match="in-plane only"):
        resize(volume, (3, 4, 4), mode="bicubic")
    with pytest.raises(ProcessorConfigError, match="not one of"):
        resize(volume, (3, 4, 4), mode="cubic")


def test_reuse_freed_memory_is_set_once_and_can_be_turned_off() -> None:
    import os
    import subprocess
    import sys

    from medfm import memory

    code = "from medfm.memory import reuse_freed_memory as r; a = r(); print(a, r() == a)"
    on = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert on[1] == "True"  # idempotent; True on glibc (this machine), False elsewhere
    env = {**os.environ, memory.REUSE_FREED_MEMORY_ENV: "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert off.stdout.split() == ["False", "True"]
