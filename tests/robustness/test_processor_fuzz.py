"""Hypothesis run of the processor (issue 12): shapes with size-1 axes, every dtype a NIfTI can hold, spacings
from 1e-6 to 1e6 mm and every preset. Whatever the input, the processor returns finite ``pixel_values`` or
raises a :class:`~medfm.errors.MedfmError`; never another exception.

Huge grids (a 1e6 mm spacing resampled to 1 mm) are refused by the memory budget, set very small here so the
run stays fast and never allocates much.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medfm.errors import MedfmError, UnsupportedFormatError
from medfm.io import MedicalVolume
from medfm.processing import MedicalImageProcessor, list_presets

# Every real-valued scalar type NIfTI stores (nibabel's datatype codes), and the complex ones it also stores.
NIFTI_REAL_DTYPES = [
    np.uint8,
    np.int8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.longdouble,
]
NIFTI_COMPLEX_DTYPES = [np.complex64, np.complex128]

PRESETS = [p if isinstance(p, str) else p.name for p in list_presets()]
BUDGET = "16MB"


_SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e300, -1e300]


def _values(dtype: type, count: int) -> st.SearchStrategy[np.ndarray]:
    """``count`` values of ``dtype``: anything the type holds; for floats, finite values over float32's whole
    range with, sometimes, a NaN, an Inf or a value beyond float32 put in."""
    kind = np.dtype(dtype).kind
    if kind in "ui":
        info = np.iinfo(dtype)
        element = st.integers(int(info.min), int(info.max))
        return st.lists(element, min_size=count, max_size=count).map(lambda v: np.array(v, dtype=dtype))
    element = st.one_of(
        st.floats(-1e4, 1e4),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.sampled_from([0.0, -0.0, 1.0, -1024.0, 1e-40]),
    )
    finite = st.lists(element, min_size=count, max_size=count)
    specials = st.lists(st.tuples(st.integers(0, count - 1), st.sampled_from(_SPECIALS)), max_size=2)
    real = st.tuples(finite, specials).map(lambda p: _with_specials(*p))
    if kind == "c":
        return st.tuples(real, real).map(lambda p: _cast(p[0] + 1j * p[1], dtype))
    return real.map(lambda v: _cast(v, dtype))


def _with_specials(values: list[float], specials: list[tuple[int, float]]) -> np.ndarray:
    out = np.array(values, dtype=np.float64)
    for index, value in specials:
        out[index] = value
    return out


def _cast(values: np.ndarray, dtype: type) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex infinities multiply into NaN
        return values.astype(dtype)


@st.composite
def volumes(draw: st.DrawFn) -> tuple[np.ndarray, tuple[float, float, float]]:
    ndim = draw(st.sampled_from([2, 3, 4]))
    spatial = draw(st.lists(st.integers(1, 6), min_size=min(ndim, 3), max_size=min(ndim, 3)))
    shape = ([draw(st.integers(1, 3))] if ndim == 4 else []) + spatial
    dtype = draw(st.sampled_from(NIFTI_REAL_DTYPES + NIFTI_COMPLEX_DTYPES))
    count = int(np.prod(shape))
    array = draw(_values(dtype, count)).reshape(shape)
    exponent = st.floats(-6.0, 6.0)
    spacing = tuple(float(10.0**e) for e in draw(st.lists(exponent, min_size=3, max_size=3)))
    return array, spacing  # type: ignore[return-value]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(case=volumes(), preset=st.sampled_from(PRESETS), as_volume=st.booleans())
def test_processor_gives_finite_values_or_a_medfm_error(
    case: tuple[np.ndarray, tuple[float, float, float]], preset: str, as_volume: bool
) -> None:
    array, spacing = case
    processor = MedicalImageProcessor(preset=preset)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setenv("MEDFM_MEMORY_BUDGET", BUDGET)
        warnings.simplefilter("ignore")  # implausible spacings warn; the warning is tested elsewhere
        try:
            if as_volume:
                inputs = processor(MedicalVolume.from_array(array, spacing))
            else:
                inputs = processor(array, spacing=spacing)
        except MedfmError:
            return
    assert not np.iscomplexobj(array), "a complex image was processed instead of refused"
    pixel_values = inputs["pixel_values"]
    assert pixel_values.dtype == torch.float32
    assert bool(torch.isfinite(pixel_values).all())
    assert pixel_values.shape[0] == 1
    assert bool(torch.isfinite(inputs["spacing"]).all())
    assert np.all(np.isfinite(inputs.grids[0].affine))


@pytest.mark.parametrize("dtype", NIFTI_REAL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_real_nifti_dtype_is_processed(dtype: type) -> None:
    """The fuzz found longdouble (NIfTI's float128) crashing torch.from_numpy with a TypeError."""
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    inputs = MedicalImageProcessor(preset="ct")(array, spacing=(1.0, 1.0, 1.0))
    assert inputs["pixel_values"].shape == (1, 1, 16, 16, 16)
    assert bool(torch.isfinite(inputs["pixel_values"]).all())


@pytest.mark.parametrize("dtype", NIFTI_COMPLEX_DTYPES, ids=lambda d: np.dtype(d).name)
def test_complex_arrays_are_refused(dtype: type) -> None:
    """The fuzz found complex arrays silently reduced to their real part."""
    array = np.ones((2, 3, 4), dtype=dtype)
    with pytest.raises(UnsupportedFormatError, match="complex"):
        MedicalImageProcessor(preset="ct")(array, spacing=(1.0, 1.0, 1.0))
    volume = MedicalVolume(array=array[None], affine=np.eye(4))
    with pytest.raises(UnsupportedFormatError, match="complex"):
        MedicalImageProcessor(preset="ct")(volume)
