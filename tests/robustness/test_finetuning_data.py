"""Fine-tuning validates its data before the first step (issue 12, item 7): a malformed ``dataset.json``,
label maps with NaN, fractional, negative or out-of-range values, and image/label pairs whose affines differ
each give one typed error naming the file, before any model is built. Bad files are made at test time."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfm.data.classification import load_classification_items
from medfm.data.segmentation import (
    load_segmentation_labels,
    load_segmentation_pairs,
    prepare_segmentation_sample,
)
from medfm.errors import DatasetError, InvalidGeometryError, LabelMapError, MedfmError, VolumeShapeError
from medfm.processing import MedicalImageProcessor

from ..examples import load_example

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _image(path: Path, affine=AFFINE, shape=(12, 10, 8)) -> Path:
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), affine), path)
    return path


def _labels(path: Path, array: np.ndarray, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _good_labels() -> np.ndarray:
    array = np.zeros((12, 10, 8), dtype=np.uint8)
    array[3:8, 2:6, 2:6] = 1
    return array


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _image(tmp_path / "img.nii.gz"), _labels(tmp_path / "lab.nii.gz", _good_labels())


def _dataset(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(text)
    return path


MALFORMED = {
    "not json": ("{training: [", r"not valid JSON.*line 1"),
    "binary garbage": (None, r"not a text \(JSON\) file|not valid JSON"),
    "top level a list": ('[{"image": "img.nii.gz", "label": "lab.nii.gz"}]', "top level is a JSON list"),
    "missing training": ('{"labels": {"0": "bg", "1": "fg"}}', r'no "training" list'),
    "training a dict": ('{"training": {"image": "img.nii.gz"}}', r'"training" is a JSON object'),
    "training a string": ('{"training": "img.nii.gz"}', r'"training" is a JSON string'),
    "training empty": ('{"training": []}', "list is empty"),
    "entry a string": ('{"training": ["img.nii.gz"]}', r"entry 0 is a JSON string"),
    "entry without image": ('{"training": [{"label": "lab.nii.gz"}]}', r'entry 0 has no "image"'),
    "entry without label": ('{"training": [{"image": "img.nii.gz"}]}', r'entry 0 has no "label"'),
    "image a number": ('{"training": [{"image": 3, "label": "lab.nii.gz"}]}', r'"image": 3 \(number\)'),
    "label null": ('{"training": [{"image": "img.nii.gz", "label": null}]}', r'"label": null \(null\)'),
    "image a list": (
        '{"training": [{"image": ["img.nii.gz"], "label": "lab.nii.gz"}]}',
        r'"image": \["img.nii.gz"\] \(array\)',
    ),
    "image empty": ('{"training": [{"image": "", "label": "lab.nii.gz"}]}', "non-empty string"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_dataset_json_is_one_dataset_error(tmp_path: Path, pair, case: str) -> None:
    text, phrase = MALFORMED[case]
    path = tmp_path / "dataset.json"
    if text is None:
        path.write_bytes(b"\xff\xfe\x00garbage\x9c")
    else:
        path.write_text(text)
    before = path.read_bytes()
    with pytest.raises(DatasetError, match=phrase) as caught:
        load_segmentation_pairs(tmp_path)
    assert caught.value.path == str(path)
    assert path.read_bytes() == before


def test_bad_labels_names_are_a_dataset_error(tmp_path: Path, pair) -> None:
    for labels in ('"bg"', "[1, 2]", '{"x": "bg"}'):
        path = _dataset(tmp_path, '{"training": [], "labels": ' + labels + "}")
        with pytest.raises(DatasetError, match='"labels"') as caught:
            load_segmentation_labels(path)
        assert caught.value.path == str(path)
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_segmentation_labels(_dataset(tmp_path, "{"))


LABEL_MAPS = {
    "negative": (
        lambda a: np.where(a == 1, -1, 0).astype(np.int16),
        None,
        r"negative label value\(s\) \[-1\]",
    ),
    "fractional floats": (
        lambda a: a.astype(np.float32) * 0.7,
        None,
        r"non-integer value\(s\) such as \[0\.(7|69)",
    ),
    "probabilities": (
        lambda a: np.random.default_rng(1).random(a.shape).astype(np.float32),
        None,
        "probabilities or intensities",
    ),
    "some NaN": (lambda a: np.where(a == 1, np.nan, 0).astype(np.float32), None, r"NaN voxel\(s\)"),
    "all NaN": (lambda a: np.full(a.shape, np.nan, np.float32), None, "NaN"),
    "infinite": (lambda a: np.where(a == 1, np.inf, 0).astype(np.float32), None, "Inf|infinite"),
    "out of range": (lambda a: a * 5, 2, r"\[5\] outside \[0, 2\).*--num-labels 2"),
}


@pytest.mark.parametrize("case", sorted(LABEL_MAPS))
def test_bad_label_maps_are_a_label_map_error(tmp_path: Path, pair, case: str) -> None:
    make, num_labels, phrase = LABEL_MAPS[case]
    image, _ = pair
    bad = _labels(tmp_path / "bad.nii.gz", make(_good_labels()))
    processor = MedicalImageProcessor(steps=[{"name": "minmax"}])
    with pytest.raises(LabelMapError, match=phrase) as caught:
        prepare_segmentation_sample(processor, image, bad, num_labels)
    assert caught.value.path == str(bad)


def test_whole_float_labels_are_accepted(tmp_path: Path, pair) -> None:
    image, _ = pair
    labels = _labels(tmp_path / "float.nii.gz", _good_labels().astype(np.float32))
    sample = prepare_segmentation_sample(MedicalImageProcessor(steps=[{"name": "minmax"}]), image, labels, 2)
    assert set(sample.labels.unique().tolist()) == {0, 1}


def test_affines_that_differ_are_named_both(tmp_path: Path, pair) -> None:
    image, _ = pair
    shifted = AFFINE.copy()
    shifted[:3, 3] = [10.0, 0.0, 0.0]
    bad = _labels(tmp_path / "shifted.nii.gz", _good_labels(), shifted)
    with pytest.raises(InvalidGeometryError) as caught:
        prepare_segmentation_sample(MedicalImageProcessor(steps=[{"name": "minmax"}]), image, bad)
    message = str(caught.value)
    assert caught.value.path == str(bad) and str(image) in message
    first, second = (part.split("]]")[0] for part in message.split("[[")[1:3])
    assert message.count("[[") == 2 and first != second  # both affines, rounded
    assert "0000" not in message  # rounded to 3 decimals


def test_shapes_that_differ_are_a_shape_error(tmp_path: Path, pair) -> None:
    image, _ = pair
    bad = _labels(tmp_path / "small.nii.gz", np.zeros((6, 10, 8), np.uint8))
    with pytest.raises(VolumeShapeError, match="not on the image's grid"):
        prepare_segmentation_sample(MedicalImageProcessor(steps=[{"name": "minmax"}]), image, bad)


CLASSIFICATION = {
    "not json": ("[", "not valid JSON"),
    "missing training": ("{}", r'no "training" list'),
    "label a list": ('[{"image": "a.nii.gz", "label": ["x"]}]', r'"label": \["x"\] is a JSON array'),
    "label negative": ('[{"image": "a.nii.gz", "label": -1}]', "-1 is negative"),
    "label fractional": ('[{"image": "a.nii.gz", "label": 1.5}]', "1.5 is not a whole number"),
    "label NaN": ('[{"image": "a.nii.gz", "label": NaN}]', "nan is not a class"),
    "label boolean": ('[{"image": "a.nii.gz", "label": true}]', "is a JSON boolean"),
    "label empty": ('[{"image": "a.nii.gz", "label": ""}]', "is a JSON string"),
    "image missing key": ('[{"label": "x"}]', r'entry 0 has no "image"'),
}


@pytest.mark.parametrize("case", sorted(CLASSIFICATION))
def test_malformed_classification_json_is_one_dataset_error(tmp_path: Path, case: str) -> None:
    entries, phrase = CLASSIFICATION[case]
    _image(tmp_path / "a.nii.gz")
    text = entries if case in ("not json", "missing training") else '{"training": ' + entries + "}"
    path = _dataset(tmp_path, text)
    with pytest.raises(DatasetError, match=phrase) as caught:
        load_classification_items(path)
    assert caught.value.path == str(path)


def test_whole_number_classification_labels_are_class_names(tmp_path: Path) -> None:
    _image(tmp_path / "a.nii.gz")
    _image(tmp_path / "b.nii.gz")
    entries = [{"image": "a.nii.gz", "label": 0}, {"image": "b.nii.gz", "label": 1.0}]
    items, classes = load_classification_items(_dataset(tmp_path, json.dumps({"training": entries})))
    assert classes == ["0", "1"] and [name for _, name in items] == ["0", "1"]


def _run_example(name: str, data: Path, tmp_path: Path, *extra: str):
    arguments = [
        "--model",
        str(tmp_path / "no-such-model"),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "run"),
    ]
    return load_example(name).main([*arguments, *extra, "--steps", "1"])


@pytest.mark.parametrize(
    "case", ["not json", "entry without label", "negative", "out of range", "some NaN", "affine"]
)
def test_the_segmentation_example_refuses_bad_data_before_the_model(tmp_path: Path, pair, case: str) -> None:
    """``--model`` names no model: the data error comes first, so nothing was built or written."""
    image, labels = pair
    entry = {"image": image.name, "label": labels.name}
    if case == "not json":
        _dataset(tmp_path, "{oops")
    elif case == "entry without label":
        _dataset(tmp_path, json.dumps({"training": [{"image": image.name}]}))
    else:
        if case == "affine":
            shifted = AFFINE.copy()
            shifted[0, 3] = 4.0
            _labels(tmp_path / "bad.nii.gz", _good_labels(), shifted)
        else:
            make = {"negative": LABEL_MAPS["negative"][0], "some NaN": LABEL_MAPS["some NaN"][0]}.get(
                case, lambda a: a * 3
            )
            _labels(tmp_path / "bad.nii.gz", make(_good_labels()))
        entry["label"] = "bad.nii.gz"
        _dataset(tmp_path, json.dumps({"training": [entry]}))
    with pytest.raises(MedfmError) as caught:
        _run_example(
            "finetune_segmentation", tmp_path, tmp_path, "--num-labels", "2", "--preset", "spad-btcv"
        )
    assert "no-such-model" not in str(caught.value)
    assert str(tmp_path) in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_classification_example_refuses_bad_data_before_the_model(tmp_path: Path) -> None:
    _image(tmp_path / "a.nii.gz")
    path = _dataset(tmp_path, '{"training": [{"image": "a.nii.gz", "label": -2}]}')
    with pytest.raises(DatasetError, match="-2 is negative") as caught:
        _run_example("finetune_classification", path, tmp_path, "--preset", "spad-btcv")
    assert caught.value.path == str(path)
