"""Segmentation metrics: known values on shapes with exact answers, spacing, and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfm.io import MedicalVolume
from medfm.metrics import mean_metrics, segmentation_metrics


def _cube(shape, start, size, label=1) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(s, s + n) for s, n in zip(start, size))] = label
    return out


def test_identical_maps_are_perfect() -> None:
    ref = _cube((20, 20, 20), (5, 5, 5), (6, 6, 6)) + _cube((20, 20, 20), (12, 12, 12), (4, 4, 4), label=2)
    result = segmentation_metrics(ref, ref)
    assert set(result) == {1, 2}
    for metrics in result.values():
        assert metrics.dice == 1.0 and metrics.hd95 == 0.0 and metrics.nsd == 1.0


def test_dice_and_spacing_aware_distances() -> None:
    ref = _cube((30, 30, 30), (10, 10, 10), (10, 10, 10))
    shifted = _cube((30, 30, 30), (12, 10, 10), (10, 10, 10))  # 2 voxels along D
    # Overlap 8/10 of the cube: Dice = 2 * 800 / 2000 = 0.8.
    iso = segmentation_metrics(shifted, ref)[1]
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
        segmentation_metrics(shifted, ref, tolerance_mm=0.5)[1].nsd
        < segmentation_metrics(shifted, ref, tolerance_mm=2.5)[1].nsd
        == pytest.approx(1.0)
    )


def test_missing_labels_and_means() -> None:
    ref = _cube((10, 10, 10), (2, 2, 2), (4, 4, 4))
    result = segmentation_metrics(np.zeros_like(ref), ref, labels=[1, 2])
    assert result[1].dice == 0.0 and math.isinf(result[1].hd95) and result[1].reference_voxels == 64
    assert math.isnan(result[2].dice)  # absent from both
    means = mean_metrics(result)
    assert means["dice"] == 0.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="same grid"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    a = MedicalVolume.from_array(np.zeros((4, 4, 4), np.uint8), spacing=1.0)
    b = MedicalVolume.from_array(np.zeros((4, 4, 4), np.uint8), spacing=2.0)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(a, b)
