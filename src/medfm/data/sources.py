"""Where pre-training volumes come from: a folder, a Decathlon ``dataset.json``, or explicit paths.

Sources are probed once, cheaply (NIfTI headers; DICOM series are read), for their canonical shape and
spacing, which decide the anisotropy group a volume is sampled in. A file that cannot be probed is skipped
with a warning naming it; a source with nothing usable is an error before any model is built.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from ..errors import DatasetError, MedfmError
from ..io import load_volume
from ..io.nifti import is_nifti_path
from ..io.orientation import canonical_transform, choose_through_plane_axis
from ..io.volume import spacing_from_affine

__all__ = ["VolumeInfo", "discover_volumes", "probe_volumes", "volumes_from_hf_dataset"]


@dataclass(frozen=True)
class VolumeInfo:
    """A usable volume: its path, canonical ``(D, H, W)`` shape and ``(z, y, x)`` spacing in mm."""

    path: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def discover_volumes(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Volume paths in ``source``: a folder (NIfTI files and DICOM series folders, recursively), a Decathlon
    ``dataset.json`` (its ``training`` images and ``test`` entries), or an iterable of paths.

    Raises:
        DatasetError: The source does not exist or holds no candidate volume.
    """
    if not isinstance(source, str | os.PathLike):
        paths = [Path(p) for p in source]
    else:
        root = Path(source)
        if root.is_dir() and (root / "dataset.json").is_file():
            root = root / "dataset.json"
        if root.is_file() and root.suffix == ".json":
            listing = json.loads(root.read_text())
            entries = [e["image"] if isinstance(e, dict) else e for e in listing.get("training", [])]
            entries += [e["image"] if isinstance(e, dict) else e for e in listing.get("test", [])]
            paths = [(root.parent / e).resolve() for e in entries]
        elif root.is_dir():
            paths = []
            for folder, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                names = sorted(f for f in files if not f.startswith("."))
                paths += [Path(folder) / f for f in names if is_nifti_path(f)]
                if any(f.lower().endswith(".dcm") for f in names):
                    paths.append(Path(folder))  # a DICOM series folder
        else:
            raise DatasetError("no such folder or dataset.json", root)
    if not paths:
        raise DatasetError(
            "holds no NIfTI file or DICOM series; expected volumes to pre-train on",
            source if isinstance(source, str | os.PathLike) else None,
        )
    return paths


def volumes_from_hf_dataset(
    dataset, column: str | None = None, cache_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Volume paths from a Hugging Face ``datasets.Dataset`` with a ``datasets.Nifti`` column.

    The column is read undecoded (its files' paths); rows stored as bytes only are written once to
    ``cache_dir``. (For labelled data, note that ``niftifolder`` loses folder-name labels of ``.nii.gz`` files;
    give labels in a ``metadata.jsonl`` instead.)

    Raises:
        DatasetError: No Nifti column, or no row with data.
    """
    import datasets

    columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Nifti)]
    column = column or (columns[0] if columns else None)
    if column is None or column not in dataset.features:
        raise DatasetError(f"the dataset has no Nifti column (columns: {list(dataset.features)})")
    raw = dataset.cast_column(column, datasets.Nifti(decode=False))
    paths = []
    for index, row in enumerate(raw[column]):
        if row.get("path") and Path(row["path"]).is_file():
            paths.append(Path(row["path"]))
        elif row.get("bytes"):
            folder = Path(cache_dir or Path.home() / ".cache" / "medfm" / "nifti")
            folder.mkdir(parents=True, exist_ok=True)
            suffix = ".nii.gz" if row["bytes"][:2] == b"\x1f\x8b" else ".nii"  # gzip magic, else plain NIfTI
            target = folder / f"{index:07d}{suffix}"
            if not target.exists():
                target.write_bytes(row["bytes"])
            paths.append(target)
    if not paths:
        raise DatasetError(f"column {column!r} holds no volume")
    return paths


def _probe(path: Path) -> VolumeInfo:
    if is_nifti_path(path):
        try:
            image = nib.load(path)
        except Exception as error:  # nibabel raises many types on damaged headers
            raise DatasetError(f"header cannot be read ({error})", path) from error
        spatial = tuple(int(n) for n in image.shape[:3]) + (1,) * max(0, 3 - len(image.shape))
        affine = image.affine
        transform = canonical_transform(
            affine, choose_through_plane_axis(spatial, spacing_from_affine(affine), affine)
        )
        canonical_affine = affine @ transform.index_matrix(spatial)
        return VolumeInfo(path, transform.canonical_shape(spatial), spacing_from_affine(canonical_affine))
    volume = load_volume(path)
    return VolumeInfo(path, volume.spatial_shape, volume.spacing)


def probe_volumes(paths: Iterable[Path]) -> list[VolumeInfo]:
    """:class:`VolumeInfo` of every path that can be read; the others are skipped with a warning.

    Raises:
        DatasetError: None of the paths is usable.
    """
    infos, skipped = [], []
    for path in paths:
        try:
            infos.append(_probe(Path(path)))
        except (MedfmError, OSError, ValueError) as error:
            skipped.append(str(path))
            warnings.warn(f"skipping {path}: {error}", stacklevel=2)
    if not infos:
        raise DatasetError(
            f"none of the {len(skipped)} candidate volumes can be read (skipped: {skipped[:5]})"
        )
    return infos
