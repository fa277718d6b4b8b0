"""pipeline("medical-segmentation"): inputs of every kind, exact output geometry, sliding windows, outputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import medfm  # noqa: F401
from medfm.io import load_volume
from medfm.processing import MedicalImageProcessor

from ..common.threshold_model import ThresholdConfig, ThresholdSegmenter
from ..common.tiny_models import save_tiny_segmentation_model
from ..conftest import write_dicom_series


@pytest.fixture
def threshold_pipeline():
    model = ThresholdSegmenter(ThresholdConfig(id2label={0: "background", 1: "bright"})).eval()
    processor = MedicalImageProcessor(steps=[{"name": "minmax"}, {"name": "pad_to_multiple", "multiple": 8}])
    return pipeline("medical-segmentation", model=model, image_processor=processor)


def test_labels_land_on_the_input_grid_exactly(
    threshold_pipeline, anatomical_path: Path, tmp_path: Path
) -> None:
    source = nib.load(anatomical_path)
    data = np.asarray(source.dataobj).astype(np.float32)
    scaled = (data - data.min()) / (data.max() - data.min())
    out = threshold_pipeline(str(anatomical_path), roi_size=(8, 16, 16), save_to=tmp_path / "seg.nii.gz")
    # Values: the label map, in the file's own voxel order, is exactly the threshold of the input.
    assert out["label_map"].shape == source.shape
    assert np.array_equal(out["label_map"], (scaled > 0.5).astype(np.uint8))
    written = nib.load(out["saved_to"])
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    assert np.array_equal(np.asarray(written.dataobj), out["label_map"])
    stats = out["labels"]
    assert stats[1]["name"] == "bright" and stats[1]["voxels"] == int((scaled > 0.5).sum())
    assert stats[1]["volume_ml"] == pytest.approx(stats[1]["voxels"] * 8 / 1000)  # 2 mm isotropic voxels


def test_volume_larger_than_the_window_uses_several_windows(
    threshold_pipeline, anatomical_path: Path
) -> None:
    model = threshold_pipeline.model
    whole = threshold_pipeline(str(anatomical_path), roi_size=(32, 48, 40))
    calls_whole, model.calls = model.calls, 0
    tiled = threshold_pipeline(str(anatomical_path), roi_size=(8, 16, 16), overlap=0.25)
    assert calls_whole == 1 and model.calls > 10
    assert np.array_equal(whole["label_map"], tiled["label_map"])  # a voxel-wise model: windows agree


def test_dicom_array_and_batch_inputs(threshold_pipeline, tmp_path: Path, ct_small_path: Path) -> None:
    positions = [np.array([0.0, 0.0, 2.5 * k]) for k in range(4)]
    write_dicom_series(tmp_path / "ct", ct_small_path, positions, pixel_spacing=(0.5, 0.7))
    series = load_volume(tmp_path / "ct")
    from_folder = threshold_pipeline(str(tmp_path / "ct"))
    assert from_folder["segmentation"].spatial_shape == series.spatial_shape
    assert np.allclose(from_folder["segmentation"].affine, series.affine)
    # An anisotropic array with its spacing: the label map has the array's own shape.
    array = np.random.default_rng(0).random((5, 30, 20)).astype(np.float32)
    from_array = threshold_pipeline(array, spacing=(4.0, 0.8, 0.8))
    assert from_array["label_map"].shape == (5, 30, 20)
    assert from_array["segmentation"].spacing == pytest.approx((4.0, 0.8, 0.8))
    scaled = (array - array.min()) / (array.max() - array.min())
    assert np.array_equal(from_array["label_map"], (scaled > 0.5).astype(np.uint8))
    batch = threshold_pipeline([str(tmp_path / "ct"), series])
    assert len(batch) == 2 and np.array_equal(batch[0]["label_map"], batch[1]["label_map"])


def test_probabilities_overlay_and_refusals(
    threshold_pipeline, anatomical_path: Path, tmp_path: Path
) -> None:
    out = threshold_pipeline(str(anatomical_path), return_probabilities=True, overlay_to=tmp_path / "o.png")
    probabilities = out["probabilities"].array
    assert probabilities.shape == (2, *out["segmentation"].spatial_shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert Image.open(out["overlay"]).format == "PNG"
    local = tmp_path / "in.nii"
    local.write_bytes(anatomical_path.read_bytes())
    from medfm.errors import OverwriteInputError

    with pytest.raises(OverwriteInputError):
        threshold_pipeline(str(local), save_to=local)
    assert local.read_bytes() == anatomical_path.read_bytes()
    with pytest.raises(ValueError, match="overlap"):
        threshold_pipeline(str(anatomical_path), overlap=1.5)
    with pytest.raises(TypeError, match="unexpected"):
        threshold_pipeline(str(anatomical_path), windows=3)


def test_spad_model_from_a_folder(anatomical_path: Path, tmp_path: Path) -> None:
    """A real medfm model loaded by path: processor from the folder, bfloat16 autocast, output geometry."""
    save_tiny_segmentation_model(tmp_path)
    segmenter = pipeline("medical-segmentation", model=str(tmp_path))
    out = segmenter(str(anatomical_path), roi_size=(8, 32, 64), bfloat16=True)
    assert out["label_map"].shape == nib.load(anatomical_path).shape
    assert set(np.unique(out["label_map"])) <= {0, 1, 2}
    with pytest.raises(ValueError, match="multiple of"):
        segmenter(str(anatomical_path), roi_size=(8, 30, 64))
