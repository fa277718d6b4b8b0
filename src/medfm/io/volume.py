"""`MedicalVolume`: one image with its geometry, in medfm's canonical orientation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InvalidGeometryError, InvalidIntensityError, UnsupportedFormatError, VolumeShapeError
from ..memory import warn_implausible_spacing
from .orientation import AxisTransform

__all__ = [
    "MedicalVolume",
    "SourceGeometry",
    "VolumeGeometry",
    "affine_from_spacing",
    "check_affine",
    "check_intensities",
    "narrowest_signed_int",
    "spacing_from_affine",
]


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis in mm (column norms of the affine's 3x3 part)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def narrowest_signed_int(array: np.ndarray) -> np.dtype | None:
    """int16 or int32, whichever is the narrowest to hold every value of an integer array; else ``None``."""
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return None
    low, high = int(array.min()), int(array.max())
    for candidate in (np.int16, np.int32):
        if np.iinfo(candidate).min <= low and high <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    return None


def affine_from_spacing(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """An affine for a canonical axial ``(D, H, W)`` grid (codes ``S P L``) with the given spacing.

    Args:
        spacing: Voxel size ``(z, y, x)`` in mm.
        origin: World (RAS+) position of voxel ``(0, 0, 0)`` in mm.
    """
    sz, sy, sx = (float(s) for s in spacing)
    affine = np.array(
        [
            [0.0, 0.0, -sx, 0.0],  # W runs towards patient left: -R
            [0.0, -sy, 0.0, 0.0],  # H runs towards posterior: -A
            [sz, 0.0, 0.0, 0.0],  # D runs towards superior: +S
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    affine[:3, 3] = origin
    return affine


def check_affine(affine: np.ndarray, path: str | os.PathLike | None = None) -> np.ndarray:
    """Validate a voxel-to-world affine and return it as float64.

    Raises:
        InvalidGeometryError: Not 4x4, not finite, zero spacing along an axis, or singular.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InvalidGeometryError(f"affine has shape {affine.shape}; expected (4, 4)", path)
    if not np.all(np.isfinite(affine)):
        raise InvalidGeometryError("affine has non-finite entries; expected finite numbers", path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InvalidGeometryError(
            f"voxel spacing {tuple(round(float(s), 6) for s in spacing)} has a zero axis; "
            "expected positive spacing on every axis",
            path,
        )
    # Scale-free singularity test: the determinant of the column-normalised 3x3 part.
    if abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-6:
        raise InvalidGeometryError(
            "affine is singular (its axes are not independent); expected an invertible affine", path
        )
    return affine


def check_intensities(array: np.ndarray, path: str | os.PathLike | None = None) -> None:
    """Reject arrays that no model can use: all NaN, or holding +/-Inf.

    A partly NaN array (e.g. background outside a brain mask) is allowed; processors fill it.

    Raises:
        InvalidIntensityError: What was found, with counts.
    """
    if array.size == 0:
        raise VolumeShapeError(f"array is empty (shape {array.shape}); expected at least one voxel", path)
    if not np.issubdtype(array.dtype, np.floating):
        return
    n_inf = int(np.isinf(array).sum())
    if n_inf:
        raise InvalidIntensityError(
            f"{n_inf} of {array.size} voxels are +/-Inf; expected finite intensities", path
        )
    n_nan = int(np.isnan(array).sum())
    if n_nan == array.size:
        raise InvalidIntensityError("every voxel is NaN; expected finite intensities", path)


@dataclass(frozen=True)
class SourceGeometry:
    """Where a volume came from, enough to write it back voxel-for-voxel.

    Attributes:
        shape: Spatial shape of the source grid, in the source's axis order.
        affine: Source voxel-to-world (RAS+) affine.
        transform: How the source grid was reoriented to canonical.
        header: The NIfTI header of the source file (copied), or ``None``; writers reuse its codes and units.
        channel_axis_last: Whether the source stored channels as a trailing axis (a 4D/5D NIfTI).
        file_shape: The voxel array's shape in the file, singleton axes included (``(X, Y, Z, 1)``...).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    transform: AxisTransform
    header: Any = None
    channel_axis_last: bool = False
    file_shape: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class VolumeGeometry:
    """A volume's grid without its voxels: enough to put a prediction back on that grid.

    Attributes:
        spatial_shape: ``(D, H, W)`` of the canonical grid.
        affine: Canonical voxel-to-world affine.
        source: How to return to the source file's grid, if known.
        source_path: The file the volume came from, if any.
        modality: Modality tag of the volume.
    """

    spatial_shape: tuple[int, int, int]
    affine: np.ndarray
    source: SourceGeometry | None = None
    source_path: str | None = None
    modality: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    def attach(self, array: np.ndarray, metadata: dict[str, Any] | None = None) -> MedicalVolume:
        """A :class:`MedicalVolume` with ``array`` (``(D, H, W)`` or ``(C, D, H, W)``) on this grid."""
        if array.ndim == 3:
            array = array[None]
        if tuple(array.shape[1:]) != self.spatial_shape:
            raise VolumeShapeError(
                f"array spatial shape {tuple(array.shape[1:])} is not the grid's {self.spatial_shape}"
            )
        return MedicalVolume(
            array=array,
            affine=self.affine,
            source_path=self.source_path,
            modality=self.modality,
            source=self.source,
            metadata=dict(metadata or {}),
        )


@dataclass(frozen=True, eq=False)
class MedicalVolume:
    """An image and its geometry in canonical orientation (see :mod:`medfm.io.orientation`).

    Attributes:
        array: Voxels as ``(C, D, H, W)``; ``D`` is through-plane. A 2D image has ``D == 1``.
        affine: 4x4 map from a canonical voxel index ``(d, h, w)`` to world RAS+ millimetres.
        source_path: File or folder it was read from, if any.
        modality: ``"CT"``, ``"MR"``... when the file says.
        source: How to map back to the source grid (set by readers); ``None`` for in-memory arrays.
        metadata: Free-form facts from the file (series description, photometric interpretation...).
    """

    array: np.ndarray
    affine: np.ndarray
    source_path: str | None = None
    modality: str | None = None
    source: SourceGeometry | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise VolumeShapeError(
                f"MedicalVolume.array must be (C, D, H, W); got {self.array.ndim} dims {self.array.shape}",
                self.source_path,
            )
        object.__setattr__(self, "affine", check_affine(self.affine, self.source_path))
        if (
            self.source is not None
            and self.source.transform.canonical_shape(self.source.shape) != self.spatial_shape
        ):
            raise VolumeShapeError(
                f"array spatial shape {self.spatial_shape} does not match the source grid {self.source.shape}",
                self.source_path,
            )

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_array(
        cls,
        array: Any,
        spacing: Sequence[float] | float,
        *,
        affine: np.ndarray | None = None,
        modality: str | None = None,
    ) -> MedicalVolume:
        """Wrap an in-memory NumPy array or torch tensor already in canonical ``(D, H, W)`` order.

        Args:
            array: ``(H, W)``, ``(D, H, W)`` or ``(C, D, H, W)``. A torch tensor is moved to CPU.
            spacing: ``(z, y, x)`` voxel size in mm, or one number for isotropic voxels. A 2D image
                takes ``(1, y, x)`` or ``(y, x)``.
            affine: Optional voxel-to-world affine; when given it must agree with ``spacing``.
            modality: Optional modality tag.

        Raises:
            VolumeShapeError: Wrong number of dimensions.
            InvalidGeometryError: Non-positive or non-finite spacing, or an affine that disagrees with it.
            InvalidIntensityError: All NaN or holding Inf.
            UnsupportedFormatError: Complex (or non-numeric) values, as for a complex NIfTI.
        """
        if hasattr(array, "detach"):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[None, None]
        elif array.ndim == 3:
            array = array[None]
        elif array.ndim != 4:
            raise VolumeShapeError(
                f"array has {array.ndim} dims {array.shape}; expected (H, W), (D, H, W) or (C, D, H, W)"
            )
        if array.dtype.kind not in "biuf":
            raise UnsupportedFormatError(
                f"array of dtype {array.dtype} ({'complex' if array.dtype.kind == 'c' else 'not numeric'}); "
                "expected real-valued scalar voxels (take .real, .imag or abs() first)"
            )
        spacing_t = _as_spacing(spacing)
        warn_implausible_spacing(spacing_t)
        check_intensities(array)
        if affine is None:
            affine = affine_from_spacing(spacing_t)
        else:
            affine = check_affine(affine)
            if not np.allclose(spacing_from_affine(affine), spacing_t, rtol=1e-4):
                raise InvalidGeometryError(
                    f"affine spacing {spacing_from_affine(affine)} disagrees with spacing {spacing_t}"
                )
        return cls(array=np.ascontiguousarray(array), affine=affine, modality=modality)

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None) -> MedicalVolume:
        """A new volume with other voxels (e.g. a label map).

        Keeps the source geometry when the grid is unchanged (same spatial shape, no new affine), so the
        result writes back onto the input's grid; drops it otherwise.
        """
        if array.ndim == 3:
            array = array[None]
        same_grid = affine is None and tuple(array.shape[1:]) == self.spatial_shape
        return replace(
            self,
            array=array,
            affine=self.affine if affine is None else affine,
            source=self.source if same_grid else None,
        )

    # -- geometry ----------------------------------------------------------------------------------

    @property
    def geometry(self) -> VolumeGeometry:
        """This volume's grid, without the voxels."""
        return VolumeGeometry(self.spatial_shape, self.affine, self.source, self.source_path, self.modality)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(z, y, x)`` in mm along ``(D, H, W)``."""
        return spacing_from_affine(self.affine)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def is_2d(self) -> bool:
        return self.array.shape[1] == 1

    @property
    def orientation(self) -> str:
        """Axis codes of ``(D, H, W)`` in the RAS+ world, e.g. ``"SPL"`` for a canonical axial volume."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def source_orientation(self) -> str | None:
        return "".join(nib.aff2axcodes(self.source.affine)) if self.source is not None else None

    def to_source_array(self) -> np.ndarray:
        """Voxels in the source file's order: ``(X, Y, Z)``, or ``(X, Y, Z, C)`` for multi-channel files."""
        if self.source is None:
            raise ValueError("this volume was not read from a file; it has no source grid to return to")
        data = self.source.transform.invert(self.array)  # (C, X, Y, Z)
        if self.source.channel_axis_last:
            return np.moveaxis(data, 0, -1)
        return data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)  # e.g. RGB DICOM

    def describe(self) -> dict[str, Any]:
        """Geometry and intensity statistics as plain Python values (used by ``medfm inspect``)."""
        finite = (
            self.array[np.isfinite(self.array)]
            if np.issubdtype(self.array.dtype, np.floating)
            else self.array
        )
        finite = finite.astype(np.float64, copy=False)
        return {
            "path": self.source_path,
            "modality": self.modality,
            "shape (C, D, H, W)": tuple(int(n) for n in self.array.shape),
            "dtype": str(self.array.dtype),
            "spacing (z, y, x) mm": tuple(round(s, 6) for s in self.spacing),
            "orientation": self.orientation,
            "source orientation": self.source_orientation,
            "source shape": self.source.shape if self.source is not None else None,
            "field of view (z, y, x) mm": tuple(
                round(n * s, 3) for n, s in zip(self.spatial_shape, self.spacing)
            ),
            "min": float(finite.min()),
            "max": float(finite.max()),
            "mean": float(finite.mean()),
            "std": float(finite.std()),
            "p0.5": float(np.percentile(finite, 0.5)),
            "p99.5": float(np.percentile(finite, 99.5)),
            "nan voxels": int(self.array.size - finite.size),
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`describe` for programs (``medfm inspect --json``): snake_case keys, JSON values.

        Keys: ``path``, ``modality``, ``shape`` (``[C, D, H, W]``), ``dtype``, ``spacing`` (``[z, y, x]`` mm),
        ``orientation`` (axis codes of ``D, H, W``), ``affine`` (4x4, canonical voxel to world RAS+ mm),
        ``source_orientation``, ``source_shape``, ``field_of_view`` (``[z, y, x]`` mm), ``min``, ``max``,
        ``mean``, ``std``, ``p0_5``, ``p99_5``, ``nan_voxels``.
        """
        human = self.describe()
        source_shape = human["source shape"]
        return {
            "path": human["path"],
            "modality": human["modality"],
            "shape": list(human["shape (C, D, H, W)"]),
            "dtype": human["dtype"],
            "spacing": list(human["spacing (z, y, x) mm"]),
            "orientation": human["orientation"],
            "affine": [[float(v) for v in row] for row in np.asarray(self.affine)],
            "source_orientation": human["source orientation"],
            "source_shape": [int(n) for n in source_shape] if source_shape is not None else None,
            "field_of_view": list(human["field of view (z, y, x) mm"]),
            "min": human["min"],
            "max": human["max"],
            "mean": human["mean"],
            "std": human["std"],
            "p0_5": human["p0.5"],
            "p99_5": human["p99.5"],
            "nan_voxels": human["nan voxels"],
        }


def _as_spacing(spacing: Sequence[float] | float, path: str | None = None) -> tuple[float, float, float]:
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, 3)
    elif values.size == 2:
        values = np.concatenate([[1.0], values])
    if values.size != 3:
        raise InvalidGeometryError(
            f"spacing {tuple(values)} has {values.size} values; expected (z, y, x)", path
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InvalidGeometryError(
            f"spacing {tuple(float(v) for v in values)} must be finite and positive (mm)", path
        )
    return tuple(float(v) for v in values)  # type: ignore[return-value]
