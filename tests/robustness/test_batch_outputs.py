"""Batch outputs never collide (issue 12, item 8): a list input with one ``save_to`` / ``overlay_to`` file is
refused before anything runs; a folder or an ``{index}``/``{name}`` pattern gives each input its own file;
a failure in item k names the item and what earlier items already wrote. Bad inputs are made at test time."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from transformers import pipeline

import medfm  # noqa: F401
from medfm.errors import BatchItemError, BatchOutputError, MedfmError, OverwriteInputError
from medfm.processing import MedicalImageProcessor

from ..common.threshold_model import ThresholdConfig, ThresholdSegmenter


@pytest.fixture
def segmenter():
    model = ThresholdSegmenter(ThresholdConfig(id2label={0: "background", 1: "bright"})).eval()
    processor = MedicalImageProcessor(steps=[{"name": "minmax"}, {"name": "pad_to_multiple", "multiple": 8}])
    return pipeline("medical-segmentation", model=model, image_processor=processor)


def _volume(path: Path, seed: int) -> Path:
    data = np.random.default_rng(seed).random((12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    return [_volume(folder / f"case{k}.nii.gz", k) for k in range(3)]


def _snapshot(paths: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


@pytest.mark.parametrize("key, name", [("save_to", "seg.nii.gz"), ("overlay_to", "overlay.png")])
def test_one_file_for_a_list_is_refused_before_anything_runs(segmenter, inputs, tmp_path, key, name) -> None:
    before = _snapshot(inputs)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BatchOutputError, match=r"one file for a list of 3 inputs.*\{index\}"):
        segmenter([str(p) for p in inputs], **{key: out / name})
    assert list(out.iterdir()) == []  # nothing written
    assert _snapshot(inputs) == before


def test_a_one_item_list_may_take_a_file(segmenter, inputs, tmp_path) -> None:
    (result,) = segmenter([str(inputs[0])], save_to=tmp_path / "one.nii.gz")
    assert result["saved_to"] == tmp_path / "one.nii.gz" and (tmp_path / "one.nii.gz").is_file()


def test_a_folder_takes_one_file_per_input_named_after_it(segmenter, inputs, tmp_path) -> None:
    out = tmp_path / "segs"
    out.mkdir()
    results = segmenter([str(p) for p in inputs], save_to=out, overlay_to=str(tmp_path / "pngs") + "/")
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["case0.png", "case1.png", "case2.png"]
    for path, result in zip(inputs, results):
        written = np.asarray(nib.load(out / path.name).dataobj)
        assert np.array_equal(written, result["label_map"])


def test_a_pattern_takes_index_and_name(segmenter, inputs, tmp_path) -> None:
    array = np.random.default_rng(9).random((6, 8, 8)).astype(np.float32)
    results = segmenter(
        [str(inputs[0]), array], spacing=(1.0, 1.0, 1.0), save_to=str(tmp_path / "{index}-{name}_seg.nii.gz")
    )
    assert [r["saved_to"].name for r in results] == ["0-case0_seg.nii.gz", "1-item-1_seg.nii.gz"]


def test_a_pattern_that_gives_two_inputs_one_name_is_refused(segmenter, inputs, tmp_path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    twin = _volume(other / "case0.nii.gz", 7)
    with pytest.raises(BatchOutputError, match="items 0 and 1 the same output"):
        segmenter([str(inputs[0]), str(twin)], save_to=str(tmp_path / "out" / "{name}.nii.gz"))
    assert not (tmp_path / "out").exists()


def test_a_bad_pattern_field_is_refused(segmenter, inputs, tmp_path) -> None:
    with pytest.raises(BatchOutputError, match="other than"):
        segmenter([str(p) for p in inputs], save_to=str(tmp_path / "{index}-{case}.nii.gz"))


def test_a_folder_holding_the_inputs_is_refused_before_writing_over_one(segmenter, inputs) -> None:
    before = _snapshot(inputs)
    with pytest.raises(OverwriteInputError, match="item 0 would write over input item 0"):
        segmenter([str(p) for p in inputs], save_to=inputs[0].parent)
    assert _snapshot(inputs) == before


def test_a_failure_in_item_k_names_it_and_what_was_written(segmenter, inputs, tmp_path) -> None:
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.write_bytes(inputs[0].read_bytes()[:200])  # truncated
    out = tmp_path / "out"
    batch = [str(inputs[0]), str(inputs[1]), str(broken), str(inputs[2])]
    with pytest.raises(BatchItemError) as caught:
        segmenter(batch, save_to=str(out) + "/")
    error = caught.value
    assert isinstance(error, MedfmError) and isinstance(error.error, MedfmError)
    assert error.index == 2 and "item 2 of 4 (broken)" in str(error) and "broken.nii.gz" in str(error)
    assert error.written == [out / "case0.nii.gz", out / "case1.nii.gz"]
    assert str(out / "case1.nii.gz") in str(error)
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz"]  # item 3 never ran


def test_a_failure_without_outputs_still_names_the_item(segmenter, inputs, tmp_path) -> None:
    with pytest.raises(BatchItemError, match=r"item 1 of 2 \(missing\).*no such file.*nothing"):
        segmenter([str(inputs[0]), str(tmp_path / "missing.nii.gz")])


def test_a_single_input_may_take_a_folder(segmenter, inputs, tmp_path) -> None:
    result = segmenter(str(inputs[1]), save_to=str(tmp_path / "one") + "/")
    assert result["saved_to"] == tmp_path / "one" / "case1.nii.gz" and result["saved_to"].is_file()
