"""MedicalImageProcessor: presets, save/load through AutoImageProcessor, batching, and mapping back."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor

import medfm  # noqa: F401  (registers the processor)
from medfm.errors import InvalidGeometryError, ProcessorConfigError, VolumeShapeError
from medfm.io import MedicalVolume, load_volume, write_nifti
from medfm.processing import PRESETS, MedicalImageProcessor

RNG = np.random.default_rng(0)


def _volume_for(preset_name: str) -> MedicalVolume:
    """A small image of the kind the preset expects."""
    two_d = any(step["name"] == "resize" and step["size"][0] is None for step in PRESETS[preset_name].steps)
    channels = 2 if preset_name == "spad-chaos" else 4 if preset_name == "mim-brats" else 1
    if two_d:
        return MedicalVolume.from_array(
            RNG.integers(0, 256, size=(channels, 1, 40, 48)).astype(np.uint8), (1.0, 0.2, 0.2)
        )
    data = RNG.normal(0, 300, size=(channels, 9, 30, 28)).astype(np.float32)
    return MedicalVolume.from_array(data, spacing=(4.0, 1.1, 1.1))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_and_survives_save_load(name: str, tmp_path: Path) -> None:
    processor = MedicalImageProcessor.from_preset(name)
    volume = _volume_for(name)
    inputs = processor(volume)
    pixel_values = inputs["pixel_values"]
    assert pixel_values.dtype == torch.float32 and pixel_values.ndim == 5
    assert torch.isfinite(pixel_values).all()
    for step in processor.steps:
        if step["name"] == "pad_to_multiple":
            assert all(n % m == 0 for n, m in zip(pixel_values.shape[2:], step["multiple"]))
        if step["name"] == "resize" and step["size"][1] is not None:
            assert tuple(pixel_values.shape[3:]) == tuple(step["size"][1:])
        if step["name"] == "repeat_channels":
            assert pixel_values.shape[1] == step["num_channels"]
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is MedicalImageProcessor
    assert reloaded.steps == processor.steps and reloaded.preset == name
    assert torch.equal(reloaded(volume)["pixel_values"], pixel_values)


def test_preset_numbers_from_specs() -> None:
    btcv = PRESETS["spad-btcv"].steps
    assert btcv[0]["spacing"] == [3.0, 0.75, 0.75]
    assert (btcv[1]["low"], btcv[1]["high"]) == (-175, 250)
    assert btcv[2]["multiple"] == [4, 16, 16] and btcv[3] == {
        "name": "scale_shift",
        "scale": 2.0,
        "shift": -1.0,
    }
    assert PRESETS["mim-covid19-20"].steps[0]["spacing"] == [
        5.0,
        1.25,
        1.25,
    ]  # (x, y, z) 1.25, 1.25, 5 in the spec
    assert PRESETS["vis-mae-pretrain"].steps[-1] == {"name": "normalize", "mean": 0.223, "std": 0.202}


def test_btcv_output_values_follow_the_recipe() -> None:
    processor = MedicalImageProcessor.from_preset("spad-btcv")
    hu = np.full((1, 8, 32, 32), 37.5, np.float32)  # a value in the window: (37.5 + 175) / 425 = 0.5
    inputs = processor(hu, spacing=(3.0, 0.75, 0.75))
    values = inputs["pixel_values"][0, 0]
    assert tuple(values.shape) == (8, 32, 32)
    torch.testing.assert_close(values, torch.zeros_like(values))  # 2 * 0.5 - 1
    assert inputs["spacing"].tolist() == [[3.0, 0.75, 0.75]]


def test_batch_equals_single_and_spacing_per_item() -> None:
    processor = MedicalImageProcessor(
        steps=[{"name": "resample", "spacing": [2.0, 2.0, 2.0]}, {"name": "zscore"}]
    )
    a = RNG.random((8, 16, 16)).astype(np.float32)
    b = RNG.random((4, 16, 16)).astype(np.float32)
    batch = processor([a, b], spacing=[(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
    assert tuple(batch["pixel_values"].shape) == (2, 1, 4, 8, 8)
    assert torch.equal(batch["pixel_values"][0], processor(a, spacing=(1, 1, 1))["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1], processor(b, spacing=(2, 1, 1))["pixel_values"][0])
    five_d = processor(np.stack([a, a])[:, None], spacing=(1.0, 1.0, 1.0))
    assert tuple(five_d["pixel_values"].shape) == (2, 1, 4, 8, 8)


def test_inputs_errors() -> None:
    processor = MedicalImageProcessor(preset="ct")
    with pytest.raises(InvalidGeometryError, match="needs spacing"):
        processor(np.zeros((4, 4, 4)))
    with pytest.raises(VolumeShapeError, match="different shapes"):
        processor([np.zeros((4, 16, 16)), np.zeros((4, 32, 16))], spacing=(1.0, 1.0, 1.0))
    with pytest.raises(VolumeShapeError, match=r"expected a number, \(3,\) or \(2, 3\)"):
        processor([np.zeros((4, 4, 4))] * 2, spacing=[[1, 1, 1]] * 3)
    with pytest.raises(ProcessorConfigError, match="unknown preset"):
        MedicalImageProcessor(preset="nope")
    with pytest.raises(ProcessorConfigError, match="unexpected arguments"):
        processor(np.zeros((4, 4, 4)), spacing=(1, 1, 1), do_resize=True)


def test_nan_voxels_are_filled_with_the_channel_minimum() -> None:
    data = np.arange(27, dtype=np.float32).reshape(3, 3, 3) + 5
    data[0, 0, 0] = np.nan
    out = MedicalImageProcessor(steps=[])(data, spacing=1.0)["pixel_values"][0, 0]
    assert out[0, 0, 0] == 6.0 and torch.isfinite(out).all()


def test_squeeze_2d_and_numpy_tensors() -> None:
    processor = MedicalImageProcessor(preset="vis-mae-classification", squeeze_2d=True)
    image = RNG.integers(0, 256, size=(64, 80)).astype(np.uint8)
    inputs = processor(image, spacing=(1.0, 0.3, 0.3), return_tensors="np")
    assert isinstance(inputs["pixel_values"], np.ndarray) and inputs["pixel_values"].shape == (1, 3, 224, 224)


def _one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.stack([labels == k for k in range(classes)]).astype(np.float32)


def test_post_process_maps_labels_back_to_the_source_grid(anatomical_path: Path, tmp_path: Path) -> None:
    """Labels made on the input grid, pushed through resample + pad as probabilities, come back in place."""
    volume = load_volume(anatomical_path)  # LAS, 2 mm
    labels = (volume.array[0] > np.percentile(volume.array, 60)).astype(np.uint8)
    labels += (volume.array[0] > np.percentile(volume.array, 85)).astype(np.uint8)
    spatial = MedicalImageProcessor(
        steps=[{"name": "resample", "spacing": [1.5, 1.5, 1.5]}, {"name": "pad_to_multiple", "multiple": 16}]
    )
    inputs = spatial(volume.with_array(_one_hot(labels, 3)))
    assert inputs.grids[0].operations[0]["op"] == "resize" and inputs.grids[0].operations[1]["op"] == "pad"
    probabilities = inputs["pixel_values"]
    lean = spatial.post_process_semantic_segmentation(probabilities, inputs.grids, apply_softmax=False)[0]
    full = spatial.post_process_semantic_segmentation(
        probabilities, inputs.grids, apply_softmax=False, return_probabilities=True
    )[0]
    segmentation = lean["segmentation"]
    assert np.array_equal(segmentation.array, full["segmentation"].array)  # per-class loop == all at once
    assert full["probabilities"].array.shape == (3, *volume.spatial_shape)
    assert segmentation.spatial_shape == volume.spatial_shape
    assert np.array_equal(segmentation.affine, volume.affine)
    assert np.mean(segmentation.array[0] == labels) > 0.97
    # Written out, the label map lies exactly on the input file's grid.
    out = nib.load(write_nifti(segmentation, tmp_path / "seg.nii.gz"))
    source = nib.load(anatomical_path)
    assert out.shape == source.shape and np.array_equal(out.affine, source.affine)
    assert np.array_equal(np.asarray(out.dataobj), segmentation.to_source_array())


def test_post_process_integer_labels_use_nearest_and_undo_padding_exactly() -> None:
    processor = MedicalImageProcessor(steps=[{"name": "pad_to_multiple", "multiple": [4, 8, 8]}])
    labels = RNG.integers(0, 5, size=(3, 13, 10))
    inputs = processor(labels.astype(np.float32), spacing=(2.0, 1.0, 1.0))
    padded = inputs["pixel_values"][:, 0].round().long()  # (B, D, H, W) integer map on the model grid
    restored = processor.post_process_semantic_segmentation(padded, inputs.grids)[0]["segmentation"]
    assert np.array_equal(restored.array[0], labels)
    # Logits: the argmax of softmax is the argmax of the logits.
    logits = torch.nn.functional.one_hot(padded[0], 5).permute(3, 0, 1, 2).float()[None] * 4.0
    restored = processor.post_process_semantic_segmentation(logits, inputs.grids)[0]["segmentation"]
    assert np.array_equal(restored.array[0], labels)


def test_post_process_two_d_predictions_and_shape_errors() -> None:
    processor = MedicalImageProcessor(preset="vis-mae-segmentation", squeeze_2d=True)
    image = RNG.integers(0, 256, size=(100, 120)).astype(np.uint8)
    inputs = processor(image, spacing=(1.0, 0.5, 0.5))
    logits = torch.randn(1, 4, 320, 320)
    result = processor.post_process_semantic_segmentation(logits, inputs.grids)[0]["segmentation"]
    assert result.spatial_shape == (1, 100, 120)
    with pytest.raises(VolumeShapeError, match="does not fit the processed grid"):
        processor.post_process_semantic_segmentation(torch.randn(1, 4, 32, 32), inputs.grids)
    with pytest.raises(VolumeShapeError, match="one per image"):
        processor.post_process_semantic_segmentation(torch.randn(2, 4, 320, 320), inputs.grids)


def _centre_nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Independent centre-aligned nearest neighbour: output i reads input floor((i + 0.5) * n_in / n_out)."""
    index = [
        np.minimum(np.floor((np.arange(n) + 0.5) * m / n).astype(int), m - 1)
        for n, m in zip(shape, labels.shape)
    ]
    return labels[np.ix_(*index)]


def test_integer_labels_restore_with_centre_aligned_nearest() -> None:
    processor = MedicalImageProcessor(
        steps=[{"name": "resize", "size": [5, 7, 9]}, {"name": "pad_to_multiple", "multiple": 4}]
    )
    volume = RNG.random((7, 10, 6)).astype(np.float32)
    inputs = processor(volume, spacing=1.0)
    grid = inputs.grids[0]
    assert grid.shape == (8, 8, 12)
    on_grid = RNG.choice([0, 5, 9], size=(1, *grid.shape))  # labels a model could emit; only these values
    restored = processor.post_process_semantic_segmentation(torch.as_tensor(on_grid), inputs.grids)[0][
        "segmentation"
    ]
    pads = grid.operations[1]["pads"]
    unpadded = on_grid[0][tuple(slice(b, n - a) for (b, a), n in zip(pads, grid.shape))]
    assert np.array_equal(restored.array[0], _centre_nearest(unpadded, (7, 10, 6)))
    assert set(np.unique(restored.array)) <= {0, 5, 9}


def test_numpy_parameters_serialise(tmp_path: Path) -> None:
    processor = MedicalImageProcessor(
        steps=[{"name": "normalize", "mean": np.array([0.5, 0.4, 0.3]), "std": np.float32(0.25)}]
    )
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert reloaded.steps[0]["mean"] == pytest.approx([0.5, 0.4, 0.3]) and reloaded.steps[0]["std"] == 0.25


def test_all_nan_channel_becomes_zero() -> None:
    data = np.ones((2, 3, 4, 4), np.float32)
    data[1] = np.nan
    out = MedicalImageProcessor(steps=[])(MedicalVolume.from_array(data, spacing=1.0))["pixel_values"][0]
    assert torch.equal(out[1], torch.zeros(3, 4, 4)) and torch.equal(out[0], torch.ones(3, 4, 4))


# A constant image in, the value each recipe's formula gives out (spec numbers; interior of the image).
_CONSTANT_CASES = [
    ("spad-btcv", 37.5, 0.0),  # window [-175, 250] -> 0.5, then 2x-1
    ("mim-btcv", 250.0, 1.0),  # window top
    ("mim-lung", -1000.0, 0.0),  # window bottom
    ("mim-covid19-20", -250.0, 0.5),  # (-250 + 1000) / 1500
    ("unimiss-pretrain-3d", 512.0, 0.5),  # HU / 1024
    ("unimiss-ricord", 400.0, (325 - 158.58) / 324.70),  # clip at 325, then (x - 158.58) / 324.70
    ("vis-mae-pretrain", 255.0, (1.0 - 0.223) / 0.202),
    ("vis-mae-classification", 51.0, 0.2),
    ("lvm-med-classification", 255.0, None),  # per channel: (1 - mean_c) / std_c
    ("unimiss-pretrain-2d", 255.0, 1.0),
]


@pytest.mark.parametrize(("name", "value", "expected"), _CONSTANT_CASES, ids=[c[0] for c in _CONSTANT_CASES])
def test_preset_output_values(name: str, value: float, expected: float | None) -> None:
    volume = _volume_for(name)
    constant = volume.with_array(np.full(volume.array.shape, value, np.float32))
    pixel_values = MedicalImageProcessor.from_preset(name)(constant)["pixel_values"][0]
    if expected is None:
        from medfm.processing.presets import IMAGENET_MEAN, IMAGENET_STD

        expected_per_channel = [(1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
        for channel, want in zip(pixel_values, expected_per_channel):
            torch.testing.assert_close(channel, torch.full_like(channel, want))
        return
    pads = [
        op
        for op in MedicalImageProcessor.from_preset(name)(constant).grids[0].operations
        if op["op"] == "pad"
    ]
    interior = (
        pixel_values[
            (slice(None), *(slice(b, n - a) for (b, a), n in zip(pads[0]["pads"], pixel_values.shape[1:])))
        ]
        if pads
        else pixel_values
    )
    torch.testing.assert_close(interior, torch.full_like(interior, expected), atol=1e-5, rtol=1e-5)


def test_post_process_argmax_by_class_leaves_the_callers_probabilities_alone() -> None:
    # No step changes the grid, so each class channel comes back as a view of the input: the running maximum
    # must not be written into it. Ties go to the first class, as argmax.
    processor = MedicalImageProcessor(steps=[])
    inputs = processor(np.zeros((4, 5, 6), dtype=np.float32), spacing=(1.0, 1.0, 1.0))
    probabilities = torch.rand(1, 3, 4, 5, 6)
    probabilities[0, 2, 0, 0, 0] = probabilities[0, 0, 0, 0, 0] = 2.0  # a tie between classes 0 and 2
    kept = probabilities.clone()
    restored = processor.post_process_semantic_segmentation(probabilities, inputs.grids, apply_softmax=False)
    assert torch.equal(probabilities, kept)
    labels = restored[0]["segmentation"].array[0]
    assert np.array_equal(labels, probabilities[0].argmax(0).numpy()) and labels[0, 0, 0] == 0
