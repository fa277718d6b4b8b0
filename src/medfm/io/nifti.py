"""NIfTI reading and writing (nibabel), with exact round trips through the canonical orientation."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import CorruptFileError, InvalidGeometryError, UnsupportedFormatError, VolumeShapeError
from ..memory import array_bytes, check_allocation, warn_implausible_spacing
from .atomic import atomic_output
from .orientation import canonical_transform, choose_through_plane_axis
from .volume import (
    MedicalVolume,
    SourceGeometry,
    check_affine,
    check_intensities,
    narrowest_signed_int,
    spacing_from_affine,
)

__all__ = ["NIFTI_SUFFIXES", "is_nifti_path", "read_nifti", "write_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")

_DECODE_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    EOFError,
    OSError,
    OverflowError,
    TypeError,
    ValueError,
    zlib.error,
)


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _native(array: np.ndarray) -> np.ndarray:
    """Native byte order (torch cannot take big-endian arrays); values are unchanged."""
    return array.astype(array.dtype.newbyteorder("="), copy=False) if not array.dtype.isnative else array


def _voxels(image: nib.Nifti1Image, path: str) -> np.ndarray:
    """Read voxels as stored when unscaled (exact), else as float32 after slope/intercept."""
    slope, inter = image.dataobj.slope, image.dataobj.inter
    try:
        if slope in (1.0, None) and inter in (0.0, None):
            return _native(np.asarray(image.dataobj))
        return image.get_fdata(dtype=np.float32)
    except _DECODE_ERRORS as error:
        raise CorruptFileError(
            f"voxel data cannot be read ({error}); the file may be truncated", path
        ) from error


def _check_gzip_stream(path: str, keep: int = 0) -> bytes:
    """Decompress a ``.gz`` file to its end, so that gzip's CRC-32 and length check runs, and return its first
    ``keep`` bytes (the image, so it is decompressed once; what follows them is read in chunks and dropped).

    nibabel reads only the bytes it needs and never reaches the trailer, so flipped bytes in the middle of the
    stream would decode to wrong voxels without an error.

    Raises:
        CorruptFileError: The stream is damaged or truncated (the message names the check that failed).
    """
    chunk = 1 << 22
    try:
        with gzip.open(path, "rb") as stream:
            buffer = bytearray(keep)  # filled in place: no regrowth, no second copy while reading
            view, filled = memoryview(buffer), 0
            while filled < keep:
                count = stream.readinto(view[filled : filled + chunk])
                if not count:
                    break
                filled += count
            while stream.read(chunk):
                pass
        view.release()
        # bytes, so nibabel's in-memory file shares it instead of copying it
        head = bytes(buffer) if filled == keep else bytes(buffer[:filled])
        del buffer
        return head
    except (OSError, EOFError, zlib.error) as error:
        detail = str(error) or type(error).__name__
        hint = (
            "its CRC-32 check failed: the data were altered"
            if "CRC" in detail
            else "it is damaged or truncated"
        )
        raise CorruptFileError(f"the gzip stream cannot be trusted ({detail}); {hint}", path) from error


#: Header extensions larger than the voxels and this many bytes besides mark a damaged ``vox_offset``.
_MAX_HEADER_EXTENSIONS = 1 << 30


def _decompressed_once(image: nib.Nifti1Image, stored: np.dtype, path: str) -> nib.Nifti1Image:
    """The image of a ``.nii.gz`` rebuilt from its bytes, decompressed once with the stream's CRC checked.

    Only the header's ``vox_offset`` plus the voxels' size are kept in memory (the voxel budget was checked on
    the header before), so trailing data cannot grow it.
    """
    offset = int(image.dataobj.offset)
    voxels = math.prod(int(n) for n in image.shape) * stored.itemsize
    if offset > voxels + _MAX_HEADER_EXTENSIONS:
        raise CorruptFileError(
            f"the header puts the voxels {offset} bytes into the file (vox_offset), beyond any header and "
            "extensions; the header is damaged",
            path,
        )
    size = offset + voxels
    head = _check_gzip_stream(path, keep=size)
    if len(head) < size:
        raise CorruptFileError(
            f"the gzip stream holds {len(head)} bytes but the header needs {size}; the file is truncated",
            path,
        )
    try:
        return type(image).from_bytes(head)
    except _DECODE_ERRORS as error:
        raise CorruptFileError(f"not a readable NIfTI file ({error})", path) from error


def read_nifti(path: str | os.PathLike, *, allow_multichannel: bool = False) -> MedicalVolume:
    """Read a ``.nii`` / ``.nii.gz`` file into a canonical :class:`MedicalVolume`.

    A 2D file becomes one slice. A 4D file with one frame is 3D. A 4D (or 5D vector) file with several
    frames becomes channels when ``allow_multichannel`` is true and is an error otherwise.

    Args:
        path: The file.
        allow_multichannel: Read a 4th axis of length > 1 as channels.

    Raises:
        UnsupportedFormatError: The name does not end in ``.nii`` or ``.nii.gz``.
        CorruptFileError: nibabel cannot parse the header or the voxel data.
        VolumeShapeError: More than 3 spatial-or-channel dims where a 3D volume was expected.
        InvalidGeometryError: Zero spacing or a singular affine.
        InvalidIntensityError: All NaN or holding Inf.
    """
    path = os.fspath(path)
    if not is_nifti_path(path):
        raise UnsupportedFormatError("not a NIfTI file name; expected .nii or .nii.gz", path)
    compressed = path.lower().endswith(".gz")
    try:
        image = nib.load(path)  # the header only: voxels are read below
    except _DECODE_ERRORS as error:
        if compressed:
            _check_gzip_stream(path)  # a damaged stream says so rather than "not a NIfTI file"
        raise CorruptFileError(f"not a readable NIfTI file ({error})", path) from error
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise UnsupportedFormatError(
            f"nibabel read it as {type(image).__name__}; expected NIfTI-1 or NIfTI-2", path
        )

    _check_pixdim(image, path)
    stored = image.get_data_dtype()
    if stored.fields is not None or np.issubdtype(stored, np.complexfloating):
        raise UnsupportedFormatError(
            f"voxel type {stored} (RGB or complex) is not supported; expected real-valued scalar voxels", path
        )
    _check_voxel_budget(image, stored, path)
    if compressed:
        header_only = image
        image = _decompressed_once(image, stored, path)
    data = _voxels(image, path)
    if compressed:
        image = header_only  # lets the decompressed bytes go before the reoriented copy is made
    file_shape = tuple(int(n) for n in data.shape)
    channel_axis_last = False
    if data.ndim == 2:
        data = data[..., None]
    elif data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector images store components on axis 5
        data = data[:, :, :, 0, :]
    if data.ndim == 4:
        if data.shape[3] == 1:
            data = data[..., 0]
        elif allow_multichannel:
            channel_axis_last = True
        else:
            raise VolumeShapeError(
                f"is a 4D volume of shape {data.shape}; expected a 3D volume "
                "(pass allow_multichannel=True to read the 4th axis as channels)",
                path,
            )
    if data.ndim not in (3, 4):
        raise VolumeShapeError(f"has {data.ndim} dims {data.shape}; expected 3D (or 4D with channels)", path)
    check_intensities(data, path)

    affine = check_affine(image.affine, path)
    warn_implausible_spacing(spacing_from_affine(affine), path)
    spatial_shape = tuple(int(n) for n in data.shape[:3])
    transform = canonical_transform(
        affine, choose_through_plane_axis(spatial_shape, spacing_from_affine(affine), affine)
    )
    channels_first = np.moveaxis(data, -1, 0) if channel_axis_last else data[None]
    source = SourceGeometry(
        shape=spatial_shape,  # type: ignore[arg-type]
        affine=affine,
        transform=transform,
        header=image.header.copy(),
        channel_axis_last=channel_axis_last,
        file_shape=file_shape,
    )
    return MedicalVolume(
        array=np.ascontiguousarray(transform.apply(channels_first)),
        affine=affine @ transform.index_matrix(spatial_shape),
        source_path=path,
        modality=None,
        source=source,
        metadata={"description": _header_text(image.header, "descrip")},
    )


def _check_voxel_budget(image: nib.Nifti1Image, stored: np.dtype, path: str) -> None:
    """Refuse, from the header alone, a file whose voxels would not fit in the memory budget.

    Reading holds the voxels (float32 when slope/intercept scale them) and their reoriented copy.

    Raises:
        MemoryBudgetError: The header's shape times the voxel size exceeds the budget.
    """
    shape = tuple(int(n) for n in image.shape)
    slope, inter = image.dataobj.slope, image.dataobj.inter
    scaled = not (slope in (1.0, None) and inter in (0.0, None))
    dtype = np.dtype(np.float32) if scaled else stored
    check_allocation(
        2 * array_bytes(shape, dtype),
        f"a {shape} {dtype.name} voxel array and its reoriented copy (the header's dim x datatype; "
        f"the file holds {os.path.getsize(path)} bytes)",
        path,
        hint="the header may be damaged; if the image is this large, crop it or raise the budget",
    )


def _check_pixdim(image: nib.Nifti1Image, path: str) -> None:
    """Without an sform the grid comes from pixdim, which nibabel "fixes" on load (0 becomes 1 mm,
    negatives their absolute value). Read the header as stored and refuse such spacing instead."""
    if int(image.header["sform_code"]) != 0:
        return
    try:
        with nib.openers.ImageOpener(path) as handle:
            header = type(image.header).from_fileobj(handle, check=False)
    except _DECODE_ERRORS as error:
        raise CorruptFileError(f"header cannot be read ({error})", path) from error
    zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise InvalidGeometryError(
            f"pixdim spacing {tuple(float(z) for z in zooms)} has a zero, negative or non-finite axis; "
            "expected positive spacing on every axis",
            path,
        )


def _disk_dtype(array: np.ndarray, requested: np.dtype | str | None) -> np.dtype:
    """The on-disk dtype: the requested one, else the array's, made portable (bool to uint8, 64-bit
    integers to the narrowest of int16/int32 that holds the values, float16 to float32)."""
    if requested is not None:
        return np.dtype(requested)
    if array.dtype == bool:
        return np.dtype(np.uint8)
    if array.dtype == np.float16:
        return np.dtype(np.float32)
    if array.dtype in (np.int64, np.uint64):
        return narrowest_signed_int(array) or array.dtype
    return array.dtype


def _same_but_singletons(shape: tuple[int, ...], other: tuple[int, ...]) -> bool:
    return tuple(n for n in shape if n != 1) == tuple(n for n in other if n != 1)


def _header_text(header: nib.Nifti1Header, key: str) -> str:
    value = header[key]
    return value.item().decode("latin-1", "replace").strip("\x00 ") if hasattr(value, "item") else str(value)


def write_nifti(
    volume: MedicalVolume,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | str | None = None,
    to_source_grid: bool = True,
    protect: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write a volume to ``.nii`` / ``.nii.gz`` atomically; never over the file it was read from.

    With ``to_source_grid`` (the default) a volume read from a file is written in that file's voxel order
    with its affine and header codes, so a read-then-write gives back the same affine, shape and voxels.
    Otherwise (or for in-memory volumes) the canonical ``(D, H, W)`` grid and affine are written.

    Args:
        volume: What to write.
        path: Destination ending in ``.nii`` or ``.nii.gz``.
        dtype: On-disk dtype; defaults to the array's (bool is written as uint8).
        to_source_grid: Undo the canonical reorientation when the source grid is known.
        protect: More paths never to write over (the volume's own source is always protected).

    Returns:
        The destination path.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise UnsupportedFormatError("output name must end in .nii or .nii.gz", path)
    array = volume.array
    out_dtype = _disk_dtype(array, dtype)
    source = volume.source if to_source_grid else None
    if source is not None:
        data = volume.to_source_array()
        if source.file_shape is not None and _same_but_singletons(data.shape, source.file_shape):
            data = data.reshape(source.file_shape)  # e.g. a one-frame 4D file stays 4D
        header = source.header.copy() if source.header is not None else None
        affine = source.affine
    else:
        data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
        header, affine = None, volume.affine
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(np.ascontiguousarray(data), affine, header=header, dtype=out_dtype)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 0.0  # display range of the source, stale now
    if np.issubdtype(out_dtype, np.floating) or out_dtype == data.dtype:
        image.header.set_slope_inter(1.0, 0.0)  # store values as they are, no rescaling
    with atomic_output(path, inputs=[volume.source_path, *protect]) as tmp:
        nib.save(image, tmp)
    return path
