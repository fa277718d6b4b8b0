"""Segmentation metrics: known values on shapes with exact answers, spacing, and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfm.errors import InvalidGeometryError, LabelMapError, MedfmError
from medfm.io import MedicalVolume
from medfm.metrics import mean_metrics, segmentation_metrics


def _cube(shape, start, size, label=1) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(s, s + n) for s, n in zip(start, size))] = label
    return out


def test_identical_maps_are_perfect() -> None:
    ref = _cube((20, 20, 20), (5, 5, 5), (6, 6, 6)) + _cube((20, 20, 20), (12, 12, 12), (4, 4, 4), label=2)
    result = segmentation_metrics(ref, ref, spacing=1.0)
    assert set(result) == {1, 2}
    for metrics in result.values():
        assert metrics.dice == 1.0 and metrics.hd95 == 0.0 and metrics.nsd == 1.0


def test_dice_and_spacing_aware_distances() -> None:
    ref = _cube((30, 30, 30), (10, 10, 10), (10, 10, 10))
    shifted = _cube((30, 30, 30), (12, 10, 10), (10, 10, 10))  # 2 voxels along D
    # Overlap 8/10 of the cube: Dice = 2 * 800 / 2000 = 0.8.
    iso = segmentation_metrics(shifted, ref, spacing=(1.0, 1.0, 1.0))[1]
    assert iso.dice == pytest.approx(0.8)
    assert iso.hd95 == pytest.approx(2.0)
    thick = segmentation_metrics(shifted, ref, spacing=(3.0, 1.0, 1.0))[1]
    assert thick.dice == pytest.approx(0.8)  # Dice ignores spacing
    assert thick.hd95 == pytest.approx(6.0)  # 2 voxels of 3 mm
    # Volumes carry their spacing.
    a = MedicalVolume.from_array(shifted, spacing=(3.0, 1.0, 1.0))
    b = MedicalVolume.from_array(ref, spacing=(3.0, 1.0, 1.0))
    assert segmentation_metrics(a, b)[1].hd95 == pytest.approx(6.0)
    # Surface Dice grows with the tolerance.
    assert (
        segmentation_metrics(shifted, ref, spacing=1.0, tolerance_mm=0.5)[1].nsd
        < segmentation_metrics(shifted, ref, spacing=1.0, tolerance_mm=2.5)[1].nsd
        == pytest.approx(1.0)
    )


def test_missing_labels_and_means() -> None:
    ref = _cube((10, 10, 10), (2, 2, 2), (4, 4, 4))
    result = segmentation_metrics(np.zeros_like(ref), ref, labels=[1, 2], spacing=1.0)
    assert result[1].dice == 0.0 and math.isinf(result[1].hd95) and result[1].reference_voxels == 64
    assert math.isnan(result[2].dice)  # absent from both
    means = mean_metrics(result)
    assert means["dice"] == 0.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="same grid"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), spacing=1.0)
    a = MedicalVolume.from_array(np.zeros((4, 4, 4), np.uint8), spacing=1.0)
    b = MedicalVolume.from_array(np.zeros((4, 4, 4), np.uint8), spacing=2.0)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(a, b)


def test_plain_arrays_need_spacing() -> None:
    """Distances (HD95, surface Dice) are in mm: plain arrays without spacing are refused, never scored at 1 mm."""
    ref = _cube((12, 12, 12), (3, 3, 3), (5, 5, 5))
    for prediction, reference in [(ref, ref), (torch.from_numpy(ref), ref)]:
        with pytest.raises(InvalidGeometryError, match="spacing=") as caught:
            segmentation_metrics(prediction, reference)
        assert isinstance(caught.value, (MedfmError, ValueError))
    # One volume is enough: it carries the spacing for the array beside it.
    volume = MedicalVolume.from_array(ref, spacing=(3.0, 1.0, 1.0))
    shifted = _cube((12, 12, 12), (4, 3, 3), (5, 5, 5))
    assert segmentation_metrics(shifted, volume)[1].hd95 == pytest.approx(3.0)
    # An explicit spacing that contradicts the volume's, or of the wrong length, is refused too.
    with pytest.raises(InvalidGeometryError, match="contradicts"):
        segmentation_metrics(shifted, volume, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InvalidGeometryError, match="2 values"):
        segmentation_metrics(shifted, ref, spacing=(1.0, 1.0))
    with pytest.raises(InvalidGeometryError, match="positive"):
        segmentation_metrics(shifted, ref, spacing=(0.0, 1.0, 1.0))
    # A 2D map takes (y, x), or the (z, y, x) of a one-slice volume.
    flat = ref[5]
    assert segmentation_metrics(flat, flat, spacing=(0.5, 0.5))[1].dice == 1.0
    assert segmentation_metrics(flat, flat, spacing=(3.0, 0.5, 0.5))[1].dice == 1.0


_REF = _cube((12, 12, 12), (3, 3, 3), (5, 5, 5))
_PROBABILITIES = np.random.default_rng(0).random((3, 12, 12, 12)).astype(np.float32)
_PROBABILITIES /= _PROBABILITIES.sum(0, keepdims=True)

NOT_LABEL_MAPS = {
    "sigmoid map": (_PROBABILITIES[1], "probabilities"),
    "softmax over a channel axis": (_PROBABILITIES, "argmax"),
    "one-hot floats": (np.stack([_REF == 0, _REF == 1]).astype(np.float32), "argmax"),
    "logits": (_PROBABILITIES[1] * 8 - 4, "non-integer"),
    "single-channel probabilities": (_PROBABILITIES[1:2], "probabilities"),
    "torch probabilities": (torch.from_numpy(_PROBABILITIES), "argmax"),
    "NaN": (np.where(_REF > 0, np.nan, 0.0), "NaN"),
    "multi-channel volume": (MedicalVolume.from_array(_PROBABILITIES, spacing=1.0), "channels"),
    "probability volume": (MedicalVolume.from_array(_PROBABILITIES[1], spacing=1.0), "probabilities"),
}


@pytest.mark.parametrize("case", NOT_LABEL_MAPS)
def test_probability_maps_are_not_label_maps(case: str) -> None:
    """Probabilities, logits and per-class channels are refused where integer labels are expected, on
    either side."""
    item, phrase = NOT_LABEL_MAPS[case]
    with pytest.raises(LabelMapError, match=phrase):
        segmentation_metrics(item, _REF, spacing=1.0)
    with pytest.raises(LabelMapError, match="reference"):
        segmentation_metrics(_REF, item, spacing=1.0)


def test_integer_valued_maps_are_label_maps() -> None:
    """Whole-number floats (a label NIfTI read as float), booleans and a (1, D, H, W) map are labels."""
    for item in (_REF.astype(np.float64), _REF.astype(bool), _REF[None].astype(np.float32)):
        assert segmentation_metrics(item, _REF, spacing=1.0)[1].dice == 1.0
