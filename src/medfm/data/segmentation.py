"""Labelled segmentation data: image/label pairs from a Decathlon folder or ``dataset.json``, samples on the
processor's grid, and an endless sampler of random crops."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import (
    DatasetError,
    InvalidGeometryError,
    InvalidIntensityError,
    LabelMapError,
    VolumeNotFoundError,
    VolumeShapeError,
)
from ..io import load_volume

__all__ = [
    "SegmentationSample",
    "VolumeCropSampler",
    "check_label_map",
    "check_label_values",
    "load_modality",
    "load_segmentation_labels",
    "load_segmentation_pairs",
    "prepare_segmentation_sample",
]


@dataclass
class SegmentationSample:
    """One processed volume and its labels on the same grid.

    Attributes:
        pixel_values: ``(C, D, H, W)`` float, as the processor makes it.
        labels: ``(D, H, W)`` integer labels.
        spacing: ``(3,)`` spacing of the grid in mm.
        region: Optional ``(D, H, W)`` bool mask of voxels crops may be centred in (e.g. a training half).
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor
    spacing: torch.Tensor
    region: torch.Tensor | None = None


def read_dataset_json(path: str | os.PathLike) -> dict:
    """The top-level object of a ``dataset.json``.

    Raises:
        DatasetError: The file cannot be read, is not JSON, or its top level is not an object.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DatasetError("is not a text (JSON) file", path) from None
    except OSError as error:
        raise DatasetError(f"cannot be read ({error.strerror or error})", path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})", path
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(
            f'its top level is a JSON {type(data).__name__}; expected an object with a "training" list', path
        )
    return data


def training_entries(
    data: dict, path: str | os.PathLike, keys: Sequence[str] = ("image", "label")
) -> list[dict]:
    """The ``training`` list of a ``dataset.json`` object, every entry checked to be an object holding ``keys``.

    Raises:
        DatasetError: ``training`` is missing, not a list, or empty; an entry is not an object or lacks a key.
    """
    if "training" not in data:
        raise DatasetError(
            f'has no "training" list (it holds {sorted(data)[:10]}); expected '
            '{"training": [{"image": ..., "label": ...}, ...]}',
            path,
        )
    entries = data["training"]
    if not isinstance(entries, list):
        raise DatasetError(
            f'its "training" is a JSON {_json_type(entries)}; expected a list of objects', path
        )
    if not entries:
        raise DatasetError('its "training" list is empty; expected at least one entry', path)
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(
                f'"training" entry {index} is a JSON {_json_type(entry)}; expected an object with '
                + " and ".join(f'"{key}"' for key in keys),
                path,
            )
        missing = [key for key in keys if key not in entry]
        if missing:
            raise DatasetError(
                f'"training" entry {index} has no '
                + " or ".join(f'"{key}"' for key in missing)
                + f" (it holds {sorted(entry)})",
                path,
            )
    return entries


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _file_field(entry: dict, key: str, index: int, path: Path) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(
            f'"training" entry {index} has "{key}": {json.dumps(value)[:80]} ({_json_type(value)}); '
            "expected a file path (a non-empty string)",
            path,
        )
    return value


def load_segmentation_pairs(source: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label) file pairs from a Medical Segmentation Decathlon ``dataset.json`` or a folder.

    A folder holds ``imagesTr/`` and ``labelsTr/`` with the same file names (a Decathlon folder; images may
    carry nnU-Net's ``_0000`` channel suffix), or a ``dataset.json``.

    Raises:
        VolumeNotFoundError: The source, a listed file, or a label for an image is missing.
        DatasetError: The ``dataset.json`` is not JSON, has no ``training`` list, or an entry is not an
            ``{"image": path, "label": path}`` object.
    """
    source = Path(source)
    if source.is_dir() and (source / "dataset.json").is_file():
        source = source / "dataset.json"
    if source.is_file():
        entries = training_entries(read_dataset_json(source), source)
        pairs = [
            (
                (source.parent / _file_field(e, "image", i, source)).resolve(),
                (source.parent / _file_field(e, "label", i, source)).resolve(),
            )
            for i, e in enumerate(entries)
        ]
    elif (source / "imagesTr").is_dir():
        pairs = []
        for image in sorted((source / "imagesTr").iterdir()):
            if image.name.startswith("."):
                continue
            label_name = image.name.replace("_0000.", ".")
            pairs.append((image, source / "labelsTr" / label_name))
    else:
        raise VolumeNotFoundError("expected a dataset.json or a folder with imagesTr/ and labelsTr/", source)
    if not pairs:
        raise VolumeNotFoundError("lists no training pairs", source)
    for image, label in pairs:
        for path in (image, label):
            if not path.exists():
                raise VolumeNotFoundError(f"listed training file is missing (pair {image.name})", path)
    return pairs


def load_modality(source: str | os.PathLike) -> str | None:
    """The modality a Decathlon ``dataset.json`` names (``"modality": {"0": "CT"}``), channels joined by ``+``.

    Raises:
        DatasetError: The file is not a JSON object (see :func:`read_dataset_json`).
    """
    source = Path(source)
    source = source / "dataset.json" if source.is_dir() else source
    if not source.is_file() or source.suffix != ".json":
        return None
    entry = read_dataset_json(source).get("modality")
    if isinstance(entry, dict) and entry:
        return " + ".join(str(entry[key]) for key in sorted(entry, key=str))
    return str(entry) if isinstance(entry, str) else None


def load_segmentation_labels(source: str | os.PathLike) -> dict[int, str] | None:
    """The label names of a Decathlon ``dataset.json`` (``"labels": {"0": "background", "1": "spleen"}``), as
    ``{0: "background", 1: "spleen"}``, or ``None`` when the source names none.

    Raises:
        DatasetError: The ``labels`` entry is not a map of integer values to names, or its values do not run
            from 0 without gaps.
    """
    source = Path(source)
    if source.is_dir():
        source = source / "dataset.json"
    if not source.is_file():
        return None
    entry = read_dataset_json(source).get("labels")
    if not entry:
        return None
    try:
        names = {int(value): str(name) for value, name in entry.items()}
    except (AttributeError, ValueError, TypeError):
        raise DatasetError(
            'its "labels" must map label values to names, e.g. {"0": "background", "1": "spleen"}', source
        ) from None
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f'its "labels" values {sorted(names)} must run 0, 1, ... without gaps', source)
    return dict(sorted(names.items()))


def check_label_values(labels: torch.Tensor, num_labels: int, path: str | os.PathLike) -> None:
    """Check that a label map only holds values in ``[0, num_labels)``.

    Raises:
        LabelMapError: A value outside the range; the message names the file, the values and ``--num-labels``.
    """
    values = torch.unique(labels)
    bad = [int(v) for v in values if not 0 <= int(v) < num_labels]
    if bad:
        raise LabelMapError(
            f"holds label value(s) {bad[:10]} outside [0, {num_labels}); the model has {num_labels} labels "
            f"(--num-labels {num_labels}): raise --num-labels or fix the label map",
            path,
        )


def check_label_map(array: np.ndarray, path: str | os.PathLike | None, num_labels: int | None = None) -> None:
    """Check a label map as read from its file: finite, whole numbers, not negative and (with ``num_labels``)
    below ``num_labels``.

    Raises:
        LabelMapError: NaN or infinite values, fractional values (probabilities, intensities), negative values
            or values out of range; the message names the file and what was found.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise LabelMapError(f"has voxel type {array.dtype}; a label map holds integer labels", path)
    if np.issubdtype(array.dtype, np.floating):
        n_nan = int(np.isnan(array).sum())
        if n_nan:
            raise LabelMapError(
                f"holds {n_nan} NaN voxel(s) of {array.size}; a label map holds integer labels 0, 1, ...",
                path,
            )
        n_inf = int(np.isinf(array).sum())
        if n_inf:
            raise LabelMapError(
                f"holds {n_inf} infinite voxel(s) of {array.size}; a label map holds integer labels", path
            )
        fractional = array[array != np.round(array)]
        if fractional.size:
            shown = [float(v) for v in np.unique(fractional)[:5]]
            raise LabelMapError(
                f"holds {fractional.size} non-integer value(s) such as {shown}: a map of probabilities or "
                "intensities, not labels; expected integer labels 0, 1, ...",
                path,
            )
    negative = np.unique(array[array < 0])
    if negative.size:
        raise LabelMapError(
            f"holds negative label value(s) {[int(v) for v in negative[:10]]}; expected labels 0, 1, ...",
            path,
        )
    if num_labels is not None:
        high = np.unique(array[array >= num_labels])
        if high.size:
            raise LabelMapError(
                f"holds label value(s) {[int(v) for v in high[:10]]} outside [0, {num_labels}); the model has "
                f"{num_labels} labels (--num-labels {num_labels}): raise --num-labels or fix the label map",
                path,
            )


def _affine_text(affine) -> str:
    return str(np.round(np.asarray(affine, dtype=float), 3).tolist())


def prepare_segmentation_sample(
    processor,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    num_labels: int | None = None,
) -> SegmentationSample:
    """Load an image and its label map and put both on the processor's grid (labels by nearest neighbour).

    The label map is checked as read (see :func:`check_label_map`) before anything is resampled.

    Raises:
        VolumeShapeError: The label map's shape is not the image's.
        InvalidGeometryError: The label map's affine is not the image's (the message gives both, rounded).
        LabelMapError: The label map holds NaN, fractional, negative or (with ``num_labels``) too large values.
    """
    image = load_volume(image_path)
    try:
        labels = load_volume(label_path)
    except InvalidIntensityError as error:  # all NaN or holding Inf: a label map, not intensities
        raise LabelMapError(
            f"{error.reason}; a label map holds integer labels 0, 1, ...", label_path
        ) from None
    check_label_map(labels.array, label_path, num_labels)
    if labels.spatial_shape != image.spatial_shape:
        raise VolumeShapeError(
            f"label map {labels.spatial_shape} is not on the image's grid {image.spatial_shape} "
            f"(image {image_path})",
            label_path,
        )
    if not np.allclose(np.asarray(labels.affine), np.asarray(image.affine), atol=1e-3):
        raise InvalidGeometryError(
            f"label map affine {_affine_text(labels.affine)} differs from the affine "
            f"{_affine_text(image.affine)} of its image {image_path}; resample the label map onto the image",
            label_path,
        )
    inputs = processor(image)
    on_grid = processor.label_processor()(labels)["pixel_values"][0, 0].round().long()
    return SegmentationSample(inputs["pixel_values"][0], on_grid, inputs["spacing"][0])


class VolumeCropSampler:
    """An endless iterator of batches of random crops (with random flips) from segmentation samples.

    Crops are centred on a random voxel of the sample's ``region`` (everywhere when it has none), so a held-out
    part of a volume never leaks into training beyond the crop half-width. Volumes smaller than the crop are
    padded (images with their minimum, labels with 0).
    """

    def __init__(
        self,
        samples: Sequence[SegmentationSample],
        crop: Sequence[int],
        batch_size: int = 2,
        flip_axes: Sequence[int] = (2,),
        seed: int = 0,
    ):
        if not samples:
            raise ValueError("no samples to draw crops from")
        self.samples = list(samples)
        self.crop = tuple(int(n) for n in crop)
        self.batch_size = batch_size
        self.flip_axes = tuple(flip_axes)
        self.generator = torch.Generator().manual_seed(seed)

    def _pad(self, sample: SegmentationSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, labels = sample.pixel_values, sample.labels
        region = sample.region if sample.region is not None else torch.ones_like(labels, dtype=torch.bool)
        pads = []
        for n, c in reversed(list(zip(labels.shape, self.crop))):
            extra = max(c - n, 0)
            pads += [extra // 2, extra - extra // 2]
        if any(pads):
            image = torch.nn.functional.pad(image, pads, value=float(image.min()))
            labels = torch.nn.functional.pad(labels, pads, value=0)
            region = torch.nn.functional.pad(region, pads, value=False)
        return image, labels, region

    def _crop(self, sample: SegmentationSample) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels, region = self._pad(sample)
        centres = region.nonzero()
        centre = centres[torch.randint(len(centres), (1,), generator=self.generator)][0]
        starts = [
            int(min(max(c - n // 2, 0), size - n)) for c, n, size in zip(centre, self.crop, labels.shape)
        ]
        index = tuple(slice(s, s + n) for s, n in zip(starts, self.crop))
        crop_image, crop_labels = image[(slice(None), *index)], labels[index]
        for axis in self.flip_axes:  # axis of (D, H, W)
            if torch.rand(1, generator=self.generator) < 0.5:
                crop_image, crop_labels = crop_image.flip(axis + 1), crop_labels.flip(axis)
        return crop_image, crop_labels

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(self.samples), (self.batch_size,), generator=self.generator).tolist()
        crops = [self._crop(self.samples[i]) for i in picks]
        return {
            "pixel_values": torch.stack([c[0] for c in crops]),
            "labels": torch.stack([c[1] for c in crops]).long(),
        }
