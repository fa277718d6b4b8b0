"""Canonical orientation: through-plane axis first, in-plane axes in radiological display order.

medfm arrays are ``(C, D, H, W)``. ``D`` is the through-plane (slice) axis, the one whose spacing usually
differs from the two in-plane ones (SPAD's rule, and most 3D models, depend on that). The in-plane axes
follow the DICOM display convention, so that ``array[c, d]`` is a slice as a radiologist would view it:

=========== ================= ===========================================================
acquisition  axis codes        meaning
=========== ================= ===========================================================
axial        ``S P L``         slices inferior to superior; rows anterior->posterior;
                               columns patient right->left (patient's right on the left)
coronal      ``P I L``         slices anterior to posterior; rows head->feet; columns R->L
sagittal     ``R I P``         slices left to right; rows head->feet; columns A->P
=========== ================= ===========================================================

Each row is the DICOM stacking direction ``row_cosine x column_cosine`` for that plane, so a DICOM
series loads without flips. Axis codes are nibabel's: the direction each array axis points to in the
RAS+ world.

A reorientation is a permutation with flips, so it is exact and exactly invertible: :class:`AxisTransform`
keeps it, and writers use it to put voxels back in the file's original order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

__all__ = [
    "CANONICAL_CODES",
    "AxisTransform",
    "canonical_transform",
    "choose_through_plane_axis",
    "transform_to_codes",
]

#: Target axis codes for (D, H, W), keyed by the world axis (0=R/L, 1=A/P, 2=S/I) the slices stack along.
CANONICAL_CODES: dict[int, tuple[str, str, str]] = {
    2: ("S", "P", "L"),  # axial
    1: ("P", "I", "L"),  # coronal
    0: ("R", "I", "P"),  # sagittal
}

# Spacings within this relative tolerance count as equal when deciding which axis is through-plane.
_SPACING_RTOL = 1e-2


@dataclass(frozen=True)
class AxisTransform:
    """A permutation with flips that maps a source voxel grid onto the canonical one.

    Canonical axis ``i`` is source axis ``perm[i]``, reversed when ``flip[i]`` is true.

    Attributes:
        perm: Source spatial axis for each canonical axis.
        flip: Whether each canonical axis runs opposite to its source axis.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def identity(cls) -> AxisTransform:
        return cls((0, 1, 2), (False, False, False))

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Reorient the last three axes of ``array`` (source order) to canonical order."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + p for p in self.perm)))
        flip_axes = tuple(lead + i for i, f in enumerate(self.flip) if f)
        return np.flip(out, axis=flip_axes) if flip_axes else out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Undo :meth:`apply` on the last three axes of ``array`` (canonical order back to source order)."""
        lead = array.ndim - 3
        flip_axes = tuple(lead + i for i, f in enumerate(self.flip) if f)
        if flip_axes:
            array = np.flip(array, axis=flip_axes)
        inverse = np.argsort(self.perm)
        return np.transpose(array, (*range(lead), *(lead + int(p) for p in inverse)))

    def index_matrix(self, source_shape: Sequence[int]) -> np.ndarray:
        """The 4x4 matrix taking a canonical voxel index to the source voxel index.

        ``canonical_affine = source_affine @ index_matrix(source_shape)``.
        """
        matrix = np.zeros((4, 4))
        matrix[3, 3] = 1.0
        for i, (p, f) in enumerate(zip(self.perm, self.flip)):
            if f:
                matrix[p, i] = -1.0
                matrix[p, 3] = source_shape[p] - 1
            else:
                matrix[p, i] = 1.0
        return matrix

    def canonical_shape(self, source_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(source_shape[p]) for p in self.perm)  # type: ignore[return-value]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _SPACING_RTOL * max(a, b)


def choose_through_plane_axis(shape: Sequence[int], spacing: Sequence[float], affine: np.ndarray) -> int:
    """Pick the source voxel axis that is through-plane.

    In order: the only axis of size 1 (a 2D image); else the axis whose spacing is the odd one out while
    the other two are equal (thick slices); else, for an isotropic grid, the axis nearest the world S/I
    axis (axial by convention); else, when all three spacings differ, the axis with the largest spacing.

    Args:
        shape: Spatial shape of the source grid (3 values).
        spacing: Voxel size of each source axis in mm.
        affine: Source voxel-to-world (RAS+) affine, used for the isotropic case.
    """
    singleton = [i for i, n in enumerate(shape) if n == 1]
    if len(singleton) == 1:
        return singleton[0]
    odd_one_out = []
    for axis in range(3):
        a, b = (spacing[i] for i in range(3) if i != axis)
        if _close(a, b) and not _close(spacing[axis], a):
            odd_one_out.append(axis)
    if len(odd_one_out) == 1:
        return odd_one_out[0]
    if all(_close(spacing[0], s) for s in spacing[1:]):
        world_axis_of_voxel = io_orientation(affine)[:, 0]
        return int(np.flatnonzero(world_axis_of_voxel == 2)[0])
    return int(np.argmax(spacing))


def canonical_transform(affine: np.ndarray, through_plane_axis: int) -> AxisTransform:
    """The transform that brings a grid with ``affine`` into canonical orientation.

    Args:
        affine: Source voxel-to-world (RAS+) affine.
        through_plane_axis: Source voxel axis that becomes ``D``.
    """
    world_axis = int(io_orientation(affine)[through_plane_axis, 0])
    return transform_to_codes(affine, CANONICAL_CODES[world_axis])


def transform_to_codes(affine: np.ndarray, codes: Sequence[str]) -> AxisTransform:
    """The transform that makes a grid's axes point to ``codes`` (nibabel axis codes, e.g. ``"IPL"``).

    Args:
        affine: The grid's voxel-to-world (RAS+) affine.
        codes: Target direction of each axis.
    """
    # transform[i] = (target axis for source axis i, flip sign)
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes)))
    perm = [0, 0, 0]
    flip = [False, False, False]
    for source_axis, (target_axis, sign) in enumerate(transform):
        perm[int(target_axis)] = source_axis
        flip[int(target_axis)] = bool(sign < 0)
    return AxisTransform(tuple(perm), tuple(flip))  # type: ignore[arg-type]
