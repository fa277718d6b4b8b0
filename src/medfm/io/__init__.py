"""Reading and writing medical volumes.

Every reader returns a :class:`MedicalVolume` in canonical orientation (``(C, D, H, W)``, through-plane
axis first; see :mod:`medfm.io.orientation`). Writers are atomic and never write over their input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InvalidGeometryError, UnsupportedFormatError, VolumeNotFoundError
from .atomic import atomic_output
from .dicom import is_dicom_file, read_dicom
from .nifti import is_nifti_path, read_nifti, write_nifti
from .orientation import CANONICAL_CODES, AxisTransform
from .volume import MedicalVolume, SourceGeometry, VolumeGeometry, affine_from_spacing, spacing_from_affine

__all__ = [
    "CANONICAL_CODES",
    "AxisTransform",
    "MedicalVolume",
    "SourceGeometry",
    "VolumeGeometry",
    "affine_from_spacing",
    "as_volume",
    "atomic_output",
    "load_volume",
    "read_dicom",
    "read_nifti",
    "spacing_from_affine",
    "write_nifti",
]


def load_volume(
    path: str | os.PathLike,
    *,
    allow_multichannel: bool = False,
    series_uid: str | None = None,
) -> MedicalVolume:
    """Read a NIfTI file, a DICOM file or a DICOM series folder.

    Args:
        path: ``.nii``/``.nii.gz`` file, DICOM file, or folder of DICOM slices.
        allow_multichannel: For NIfTI, read a 4th axis of length > 1 as channels instead of failing.
        series_uid: For a DICOM folder holding several series, the one to read.

    Raises:
        VolumeNotFoundError: Nothing exists at ``path``.
        UnsupportedFormatError: Neither NIfTI nor DICOM.
        MedfmError: Any subclass the format readers raise (see :func:`read_nifti`, :func:`read_dicom`).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeNotFoundError("no such file or folder", path)
    if path.is_dir():
        return read_dicom(path, series_uid=series_uid)
    if is_nifti_path(path):
        return read_nifti(path, allow_multichannel=allow_multichannel)
    if is_dicom_file(path):
        return read_dicom(path)
    raise UnsupportedFormatError(
        "format not recognised; expected NIfTI (.nii, .nii.gz), a DICOM file, or a folder of DICOM slices",
        path,
    )


def as_volume(item: Any, spacing: Any = None) -> MedicalVolume:
    """Turn a path, a :class:`MedicalVolume`, or an array plus ``spacing`` into a :class:`MedicalVolume`.

    Raises:
        InvalidGeometryError: An array was given without ``spacing``.
    """
    if isinstance(item, MedicalVolume):
        return item
    if isinstance(item, str | os.PathLike):
        return load_volume(item)
    if spacing is None:
        raise InvalidGeometryError(
            "an array input needs spacing=(z, y, x) in mm; medfm never guesses voxel size"
        )
    return MedicalVolume.from_array(item, spacing)
