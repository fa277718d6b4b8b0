"""Each preprocessing step: its numbers, its parameters' validation, and its serialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm.errors import ProcessorConfigError
from medfm.processing import STEP_TYPES, ProcessingState, step_from_dict
from medfm.processing.spatial import padding_to_multiple, resized_affine, shape_for_spacing


def _state(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> ProcessingState:
    affine = np.diag([*spacing, 1.0])
    return ProcessingState(tensor=torch.as_tensor(array, dtype=torch.float32), affine=affine)


def _run(spec: dict, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> ProcessingState:
    state = _state(array, spacing)
    step_from_dict(spec).apply(state)
    return state


RNG = np.random.default_rng(0)
CT = (RNG.normal(0, 400, size=(1, 4, 6, 5))).astype(np.float32)


def test_window_maps_and_clips() -> None:
    out = _run({"name": "window", "low": -175, "high": 250}, CT).tensor.numpy()
    expected = np.clip((np.clip(CT, -175, 250) + 175) / 425, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    out = _run(
        {"name": "window", "low": -1, "high": 1, "out_min": -1, "out_max": 1}, CT / 1000
    ).tensor.numpy()
    np.testing.assert_allclose(out, np.clip(CT / 1000, -1, 1), atol=1e-6)


def test_scale_shift_is_two_x_minus_one() -> None:
    x = RNG.random((1, 2, 3, 4)).astype(np.float32)
    out = _run({"name": "scale_shift", "scale": 2.0, "shift": -1.0}, x).tensor.numpy()
    np.testing.assert_allclose(out, 2 * x - 1, atol=1e-7)


def test_zscore_nonzero_takes_stats_from_positive_voxels() -> None:
    x = np.zeros((2, 3, 4, 5), np.float32)
    x[:, 1:] = RNG.random((2, 2, 4, 5)) * 10 + 1
    out = _run({"name": "zscore", "nonzero": True}, x).tensor.numpy()
    for c in range(2):
        positive = x[c][x[c] > 0]
        expected = (x[c] - positive.mean()) / (positive.std() + 1e-8)
        np.testing.assert_allclose(out[c], expected, rtol=1e-5, atol=1e-5)
    plain = _run({"name": "zscore"}, x).tensor.numpy()
    assert abs(plain[0].mean()) < 1e-5 and abs(plain[0].std() - 1) < 1e-4


def test_minmax_with_upstream_epsilons() -> None:
    x = RNG.integers(0, 255, size=(3, 1, 8, 8)).astype(np.float32)
    out = _run({"name": "minmax", "offset": 1e-6, "eps": 1e-6}, x).tensor.numpy()
    np.testing.assert_allclose(out, (x - x.min() + 1e-6) / (x.max() - x.min() + 1e-6), rtol=1e-6)
    lvm = _run({"name": "minmax", "out_max": 255.0, "eps": 0.01, "floor": True}, x).tensor.numpy()
    np.testing.assert_array_equal(lvm, np.floor((x - x.min()) * 255 / (x.max() - x.min() + 0.01)))


def test_percentile_clip_matches_numpy_above_minimum() -> None:
    x = CT.copy()
    x[0, 0] = x.min() - 100  # an air floor that must not drag the low percentile down
    out = _run({"name": "percentile_clip", "lower": 0.5, "upper": 99.5}, x).tensor.numpy()
    above = x[x > x.min()]
    low, high = np.percentile(above, [0.5, 99.5])
    np.testing.assert_allclose(out, (np.clip(x, low, high) - low) / (high - low), rtol=1e-5, atol=1e-6)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)


def test_normalize_per_channel_and_channel_mismatch() -> None:
    x = RNG.random((3, 1, 4, 4)).astype(np.float32)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = _run({"name": "normalize", "mean": mean, "std": std}, x).tensor.numpy()
    np.testing.assert_allclose(
        out, (x - np.reshape(mean, (3, 1, 1, 1))) / np.reshape(std, (3, 1, 1, 1)), rtol=1e-5
    )
    with pytest.raises(ProcessorConfigError, match="3 values but the image has 2 channels"):
        _run({"name": "normalize", "mean": mean, "std": std}, x[:2])


def test_repeat_channels() -> None:
    x = RNG.random((1, 2, 3, 3)).astype(np.float32)
    out = _run({"name": "repeat_channels", "num_channels": 3}, x).tensor.numpy()
    assert out.shape == (3, 2, 3, 3) and all(np.array_equal(out[c], x[0]) for c in range(3))
    with pytest.raises(ProcessorConfigError, match="from an image with 2"):
        _run({"name": "repeat_channels", "num_channels": 3}, np.zeros((2, 1, 2, 2)))


def test_resample_shape_spacing_and_record() -> None:
    x = RNG.random((1, 10, 20, 30)).astype(np.float32)
    state = _run({"name": "resample", "spacing": [2.0, 0.5, None]}, x, spacing=(1.0, 1.0, 0.7))
    assert tuple(state.tensor.shape) == (1, 5, 40, 30)
    assert state.spacing == pytest.approx((2.0, 0.5, 0.7))
    assert state.operations == [{"op": "resize", "from": [10, 20, 30], "to": [5, 40, 30]}]
    # A 2D image keeps its single slice.
    flat = _run({"name": "resample", "spacing": [1.0, 1.0, 1.0]}, x[:, :1], spacing=(1e8, 0.5, 0.5))
    assert tuple(flat.tensor.shape) == (1, 1, 10, 15)


def test_resample_keeps_world_positions() -> None:
    """A linear ramp in world coordinates stays the same ramp on the resampled grid."""
    spacing = (2.5, 0.8, 0.6)
    shape = (12, 20, 24)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = grid * np.array(spacing)
    ramp = (world @ np.array([0.3, -0.2, 0.1]))[None].astype(np.float32)
    state = _run({"name": "resample", "spacing": [1.25, 1.6, 1.0]}, ramp, spacing=spacing)
    new_shape = tuple(state.tensor.shape[1:])
    new_grid = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij"), axis=-1)
    new_world = new_grid @ state.affine[:3, :3].T + state.affine[:3, 3]
    expected = new_world @ np.array([0.3, -0.2, 0.1])
    interior = tuple(slice(2, n - 2) for n in new_shape)  # linear interpolation is exact away from the border
    np.testing.assert_allclose(state.tensor[0].numpy()[interior], expected[interior], atol=1e-4)


def test_pad_to_multiple_symmetric_value_and_affine() -> None:
    x = np.ones((2, 5, 6, 7), np.float32)
    x[1] -= 3
    state = _run({"name": "pad_to_multiple", "multiple": [4, 4, 4], "value": "min"}, x)
    assert tuple(state.tensor.shape) == (2, 8, 8, 8)
    assert state.operations == [{"op": "pad", "pads": [[1, 2], [1, 1], [0, 1]]}]
    assert state.tensor[0, 0].max() == 1.0 and state.tensor[1, 0].max() == -2.0  # each channel's own minimum
    # Voxel (1, 1, 0) of the padded grid is voxel (0, 0, 0) of the input: same world position.
    np.testing.assert_allclose(state.affine @ [1, 1, 0, 1], [0, 0, 0, 1])
    assert padding_to_multiple((16, 17), (16, 16)) == [(0, 0), (7, 8)]


def test_resized_affine_and_shape_helpers() -> None:
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    out = resized_affine(affine, (10, 10, 10), (5, 20, 10))
    np.testing.assert_allclose(np.diag(out)[:3], [4.0, 0.5, 1.0])
    np.testing.assert_allclose(
        out[:3, 3], [1.0, -0.25, 0.0]
    )  # centres move by half the old/new voxel difference
    assert shape_for_spacing((10, 1, 7), (1.0, 1.0, 1.0), (2.0, 0.5, None)) == (5, 1, 7)


@pytest.mark.parametrize("name", sorted(STEP_TYPES))
def test_every_step_serialises_round_trip(name: str) -> None:
    step = STEP_TYPES[name]  # defaults where they exist; window needs its bounds
    spec = {"name": name, "low": 0.0, "high": 1.0} if name == "window" else {"name": name}
    built = step_from_dict(spec)
    again = step_from_dict(built.to_dict())
    assert type(again) is step and again.to_dict() == built.to_dict()


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ({"name": "blur"}, "unknown step 'blur'"),
        ({"low": 1}, "must be a dict with a 'name'"),
        ({"name": "window", "low": 5, "high": 1}, "must exceed low"),
        ({"name": "window", "lo": 5}, "unexpected keyword"),
        ({"name": "resample", "spacing": [1.0, 0.0, 1.0]}, "must be positive"),
        ({"name": "resample", "spacing": [1.0, 1.0]}, "needs 3 values"),
        ({"name": "resize", "mode": "lanczos"}, "is not one of"),
        ({"name": "pad_to_multiple", "value": "max"}, "number or 'min'"),
        ({"name": "percentile_clip", "lower": 90, "upper": 10}, "lower < upper"),
    ],
)
def test_bad_step_specs(spec: dict, phrase: str) -> None:
    with pytest.raises(ProcessorConfigError, match=phrase):
        step_from_dict(spec)
