"""DICOM reading (pydicom): a single file or a folder holding one series.

Slices are sorted by their position along the slice normal (``row_cosine x column_cosine``), the
spacing between slices comes from those positions, and the affine from Image Position/Orientation
(Patient), converted from DICOM's LPS+ to the RAS+ world medfm uses throughout.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from ..errors import (
    CorruptFileError,
    DicomSeriesError,
    EmptySeriesError,
    InvalidGeometryError,
    MedfmError,
    MixedSeriesError,
    UnsupportedFormatError,
)
from ..memory import check_allocation, warn_implausible_spacing
from .orientation import canonical_transform
from .volume import MedicalVolume, SourceGeometry, check_affine, check_intensities, narrowest_signed_int

__all__ = ["is_dicom_file", "read_dicom"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative spread of slice gaps beyond which a series is called non-uniform.
_GAP_RTOL = 0.05


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM preamble marker or a ``.dcm``/``.dicom`` name."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            if handle.read(4) == b"DICM":
                return True
    except OSError:
        return False
    # Files written without the preamble still carry a DICOM name by convention.
    return str(path).lower().endswith((".dcm", ".dicom"))


@dataclass
class _Slice:
    path: str
    header: Any
    position: float = 0.0


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.size == n and np.all(np.isfinite(out)) else None


def _read_header(path: str) -> Any | None:
    """The header of a DICOM image file, or ``None`` when the file is not one.

    Files without the 128-byte preamble are retried with ``force=True``; either way a dataset counts
    only if it describes an image (``Rows`` and ``Columns``).
    """
    for force in (False, True):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=force)
            return ds if "Rows" in ds and "Columns" in ds else None
        except Exception:  # pydicom raises many exception types on non-DICOM or damaged input
            continue
    return None


def _pixel_data(path: str, rows: int, columns: int) -> tuple[np.ndarray, Any]:
    try:
        ds = pydicom.dcmread(path, force=True)
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises many types for bad or truncated pixel data
        raise CorruptFileError(
            f"pixel data cannot be decoded ({type(error).__name__}: {error})", path
        ) from error
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected = (rows, columns) if samples == 1 else (rows, columns, samples)
    if tuple(pixels.shape) != expected:
        raise CorruptFileError(
            f"pixel data has shape {tuple(pixels.shape)}; Rows, Columns and SamplesPerPixel say {expected}",
            path,
        )
    return pixels, ds


def _palette_mapped(pixels: np.ndarray, ds: Any, path: str) -> np.ndarray:
    """A PALETTE COLOR slice mapped through its own lookup tables to (rows, columns, 3) RGB.

    Raises:
        UnsupportedFormatError: The file holds no usable palette (missing or malformed lookup tables).
    """
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(pixels, ds)
    except Exception as error:  # pydicom raises ValueError/KeyError/... for missing or malformed tables
        raise UnsupportedFormatError(
            f"PALETTE COLOR image whose palette cannot be applied ({type(error).__name__}: {error}); "
            "expected Red/Green/Blue Palette Color Lookup Table Descriptor and Data",
            path,
        ) from error
    if rgb.shape != (*pixels.shape, 3):
        raise UnsupportedFormatError(
            f"PALETTE COLOR mapping gave shape {tuple(rgb.shape)}; expected {(*pixels.shape, 3)}", path
        )
    return rgb


def _rescaled(pixels: np.ndarray, ds: Any) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1.0 and intercept == 0.0:
        return pixels
    if slope.is_integer() and intercept.is_integer():
        return pixels.astype(np.int32) * int(slope) + int(intercept)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _collect(folder: Path) -> tuple[list[_Slice], int]:
    slices, examined = [], 0
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            examined += 1
            full = os.path.join(root, name)
            header = _read_header(full)
            if header is not None:
                slices.append(_Slice(full, header))
            elif is_dicom_file(full):
                warnings.warn(f"{full}: skipped, DICOM header unreadable or without an image", stacklevel=3)
    return slices, examined


def _choose_series(slices: list[_Slice], folder: str, series_uid: str | None) -> list[_Slice]:
    by_series: dict[str, list[_Slice]] = {}
    for s in slices:
        by_series.setdefault(str(s.header.get("SeriesInstanceUID", "")), []).append(s)
    if series_uid is not None:
        if series_uid not in by_series:
            raise DicomSeriesError(
                f"no slice has SeriesInstanceUID {series_uid}; found {sorted(by_series)}", folder
            )
        return by_series[series_uid]
    if len(by_series) > 1:
        listing = "; ".join(
            f"{uid or '<missing>'} ({len(group)} files, {group[0].header.get('SeriesDescription', 'no description')})"
            for uid, group in sorted(by_series.items())
        )
        raise MixedSeriesError(
            f"holds {len(by_series)} series: {listing}; expected one (pass series_uid= to choose)", folder
        )
    return slices


def _in_plane_geometry(ds: Any, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Row cosine, column cosine, (row spacing, column spacing), and whether the file gave them."""
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if spacing is None:
        spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    complete = orientation is not None and spacing is not None
    if orientation is None:
        orientation = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    if spacing is None:
        spacing = np.array([1.0, 1.0])
    if np.any(spacing <= 0):
        raise InvalidGeometryError(f"PixelSpacing {tuple(spacing)} must be positive", path)
    return orientation[:3], orientation[3:], spacing, complete


def _check_consistent(slices: list[_Slice], label: str) -> None:
    """One image size, orientation and pixel spacing, and single-frame files only."""
    for s in slices:
        frames = int(s.header.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise UnsupportedFormatError(
                f"{s.path} is a multi-frame DICOM ({frames} frames); only single-frame slices are supported",
                label,
            )
    for name, key in (
        ("size", lambda h: (int(h.Rows), int(h.Columns))),
        ("ImageOrientationPatient", lambda h: _rounded(h.get("ImageOrientationPatient"), 6, 3)),
        ("PixelSpacing", lambda h: _rounded(h.get("PixelSpacing"), 2, 4)),
    ):
        values = Counter(key(s.header) for s in slices)
        if len(values) > 1:
            raise DicomSeriesError(f"slices differ in {name} {dict(values)}; expected one value", label)


def _rounded(value: Any, n: int, decimals: int) -> tuple[float, ...] | None:
    floats = _floats(value, n)
    return None if floats is None else tuple(np.round(floats, decimals).tolist())


def _slice_step(slices: list[_Slice], normal: np.ndarray, label: str) -> np.ndarray:
    """Sort ``slices`` in place along the slice normal and return the LPS vector from one slice to the next.

    The step is ``(last - first) / (n - 1)``: along the normal for ordinary series, sheared for a gantry
    tilt. Every slice must lie on that line at equal steps; a missing slice or a second stack is an error,
    since no single affine could place the slices.
    """
    first = slices[0].header
    header_gap = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 0) or 1.0
    positions = [_floats(s.header.get("ImagePositionPatient"), 3) for s in slices]
    if all(p is None for p in positions):
        if len(slices) > 1:
            slices.sort(key=lambda s: int(s.header.get("InstanceNumber", 0) or 0))
            warnings.warn(
                f"{label}: no ImagePositionPatient; slices ordered by InstanceNumber, {header_gap:g} mm apart",
                stacklevel=3,
            )
        return normal * header_gap
    if any(p is None for p in positions):
        raise DicomSeriesError("some slices lack ImagePositionPatient; expected it on every slice", label)
    for s, p in zip(slices, positions):
        s.position = float(p @ normal)
    order = np.argsort([s.position for s in slices], kind="stable")
    slices[:] = [slices[i] for i in order]
    positions = np.asarray([positions[i] for i in order])
    if len(slices) == 1:
        return normal * header_gap
    gaps = np.diff([s.position for s in slices])
    if np.any(gaps < 1e-4):
        raise DicomSeriesError(
            f"{int(np.sum(gaps < 1e-4)) + 1} slices share a position (several echoes, phases or "
            "acquisitions?); expected one slice per position",
            label,
        )
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    expected = positions[0] + np.arange(len(slices))[:, None] * step
    deviation = float(np.abs(positions - expected).max())
    if deviation > _GAP_RTOL * float(np.linalg.norm(step)):
        raise DicomSeriesError(
            f"slices are not evenly spaced on one line (gaps {gaps.min():.4g} to {gaps.max():.4g} mm, "
            f"off by up to {deviation:.3g} mm); a slice may be missing. Expected a regular series",
            label,
        )
    return step


def read_dicom(path: str | os.PathLike, *, series_uid: str | None = None) -> MedicalVolume:
    """Read a DICOM file or a folder holding one series into a canonical :class:`MedicalVolume`.

    Slices are sorted along the slice normal; the slice axis of the affine runs from the first slice's
    ImagePositionPatient to the last's, so gantry-tilted series keep their (sheared) geometry. Stored
    values are rescaled (CT in Hounsfield units); MONOCHROME1 images are inverted so that higher means
    brighter, as in every other modality; PALETTE COLOR images are mapped through their lookup tables to
    three (RGB) channels.

    Args:
        path: A DICOM file, or a folder (searched recursively) of DICOM slices.
        series_uid: The SeriesInstanceUID to read when the folder holds several series.

    Raises:
        VolumeNotFoundError: The path does not exist.
        EmptySeriesError: A folder holds no DICOM image.
        MixedSeriesError: A folder holds several series and ``series_uid`` was not given.
        DicomSeriesError: Slices disagree on size, orientation or pixel spacing, share a position, or are
            not evenly spaced.
        CorruptFileError: A file's header or pixel data cannot be decoded.
        UnsupportedFormatError: A single file that is not a DICOM image, a multi-frame file, or a PALETTE
            COLOR image whose lookup tables are missing or malformed.
    """
    path = Path(path)
    label = os.fspath(path)
    if path.is_dir():
        slices, examined = _collect(path)
        if not slices:
            raise EmptySeriesError(
                f"no DICOM image found among {examined} files; expected a DICOM series", label
            )
        slices = _choose_series(slices, label, series_uid)
    else:
        header = _read_header(label)
        if header is None:
            if is_dicom_file(label):
                raise CorruptFileError(
                    "DICOM header cannot be parsed or holds no image (no Rows/Columns)", label
                )
            raise UnsupportedFormatError("not a DICOM image file", label)
        slices = [_Slice(label, header)]
    try:
        return _assemble(slices, label)
    except MedfmError:
        raise
    except Exception as error:  # malformed values surface as many types (ValueError, TypeError, ...)
        raise CorruptFileError(f"unusable DICOM content ({type(error).__name__}: {error})", label) from error


def _check_pixel_budget(ds: Any, rows: int, columns: int, count: int, label: str) -> None:
    """Refuse, from the headers alone, a series whose voxels would not fit in the memory budget.

    Reading holds the decoded slices (4 bytes a sample once rescaled), their stack, and its reoriented copy.

    Raises:
        MemoryBudgetError: Rows x Columns x slices x samples x bytes exceeds the budget.
    """
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    stored = max(1, -(-int(ds.get("BitsAllocated", 16) or 16) // 8))
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds
    itemsize = max(stored, 4) if rescaled else stored
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        samples, itemsize = 3, 4  # mapped to RGB through 8- or 16-bit tables, then widened to int32
    shape = (count, rows, columns) if samples == 1 else (count, rows, columns, samples)
    voxels = count * rows * columns * samples
    check_allocation(
        3 * voxels * itemsize,
        f"{count} slice(s) of {rows} x {columns} pixels x {samples} sample(s) at {itemsize} bytes, "
        f"an array {shape} held three times while reading (slices, stack, reoriented copy)",
        label,
        hint="the headers may be damaged (Rows, Columns); if the series is this large, raise the budget",
    )


def _assemble(slices: list[_Slice], label: str) -> MedicalVolume:
    _check_consistent(slices, label)
    first = slices[0].header
    row_cos, col_cos, pixel_spacing, has_geometry = _in_plane_geometry(first, slices[0].path)
    normal = np.cross(row_cos, col_cos)
    step = _slice_step(slices, normal, label)
    origin = _floats(slices[0].header.get("ImagePositionPatient"), 3)
    if not has_geometry or origin is None:
        warnings.warn(
            f"{label}: incomplete patient geometry (ImagePositionPatient/ImageOrientationPatient/PixelSpacing); "
            "assuming an axial grid at the origin with 1 mm where values are missing",
            stacklevel=3,
        )

    rows, columns = int(first.Rows), int(first.Columns)
    _check_pixel_budget(first, rows, columns, len(slices), label)
    planes = []
    for s in slices:
        pixels, ds = _pixel_data(s.path, rows, columns)
        if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":  # indices into a colour table
            planes.append(_palette_mapped(pixels, ds, s.path))
        else:
            planes.append(_rescaled(pixels, ds))
    stacked = np.stack(planes)  # (k, rows, cols) or (k, rows, cols, samples)
    photometric = str(first.get("PhotometricInterpretation", ""))
    if photometric == "MONOCHROME1":  # stored so that low values are bright: flip to the usual sense
        wide = stacked.astype(np.int32) if np.issubdtype(stacked.dtype, np.integer) else stacked
        stacked = wide.max() + wide.min() - wide
    if np.issubdtype(stacked.dtype, np.integer):  # keep integers exact, in int16 when they fit (CT in HU)
        stacked = stacked.astype(narrowest_signed_int(stacked) or stacked.dtype, copy=False)
    # Colour images: samples become channels.
    data = np.moveaxis(stacked, -1, 0) if stacked.ndim == 4 else stacked[None]
    check_intensities(data, label)

    lps = np.eye(4)
    lps[:3, 0] = step  # slice index: from one slice's position to the next
    lps[:3, 1] = col_cos * pixel_spacing[0]  # row index: PixelSpacing[0] is the distance between rows
    lps[:3, 2] = row_cos * pixel_spacing[1]  # column index: PixelSpacing[1] between columns
    lps[:3, 3] = origin if origin is not None else 0.0
    affine = check_affine(_LPS_TO_RAS @ lps, label)
    warn_implausible_spacing(np.linalg.norm(affine[:3, :3], axis=0), label, stacklevel=4)

    spatial_shape = tuple(int(n) for n in data.shape[1:])
    transform = canonical_transform(affine, through_plane_axis=0)
    tilt = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), 0.0, 1.0))))
    return MedicalVolume(
        array=np.ascontiguousarray(transform.apply(data)),
        affine=affine @ transform.index_matrix(spatial_shape),
        source_path=label,
        modality=str(first.get("Modality")) if first.get("Modality") else None,
        source=SourceGeometry(shape=spatial_shape, affine=affine, transform=transform),  # type: ignore[arg-type]
        metadata={
            "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
            "series_description": str(first.get("SeriesDescription", "")),
            "photometric_interpretation": photometric,
            "num_slices": len(slices),
            "gantry_tilt_degrees": round(tilt, 4),
        },
    )
