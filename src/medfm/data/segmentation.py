"""Labelled segmentation data: image/label pairs from a Decathlon folder or ``dataset.json``, samples on the
processor's grid, and an endless sampler of random crops."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DatasetError, LabelMapError, VolumeNotFoundError, VolumeShapeError
from ..io import load_volume

__all__ = [
    "SegmentationSample",
    "VolumeCropSampler",
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


def load_segmentation_pairs(source: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label) file pairs from a Medical Segmentation Decathlon ``dataset.json`` or a folder.

    A folder holds ``imagesTr/`` and ``labelsTr/`` with the same file names (a Decathlon folder; images may
    carry nnU-Net's ``_0000`` channel suffix), or a ``dataset.json``.

    Raises:
        VolumeNotFoundError: The source, a listed file, or a label for an image is missing.
    """
    source = Path(source)
    if source.is_dir() and (source / "dataset.json").is_file():
        source = source / "dataset.json"
    if source.is_file():
        entries = json.loads(source.read_text()).get("training", [])
        pairs = [
            ((source.parent / e["image"]).resolve(), (source.parent / e["label"]).resolve()) for e in entries
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
    """The modality a Decathlon ``dataset.json`` names (``"modality": {"0": "CT"}``), channels joined by ``+``."""
    source = Path(source)
    source = source / "dataset.json" if source.is_dir() else source
    if not source.is_file() or source.suffix != ".json":
        return None
    try:
        entry = json.loads(source.read_text()).get("modality")
    except (json.JSONDecodeError, AttributeError):
        return None
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
    entry = json.loads(source.read_text()).get("labels")
    if not entry:
        return None
    try:
        names = {int(value): str(name) for value, name in entry.items()}
    except (AttributeError, ValueError):
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


def prepare_segmentation_sample(
    processor, image_path: str | os.PathLike, label_path: str | os.PathLike
) -> SegmentationSample:
    """Load an image and its label map and put both on the processor's grid (labels by nearest neighbour).

    Raises:
        VolumeShapeError: The label map is not on the image's grid.
    """
    image = load_volume(image_path)
    labels = load_volume(label_path)
    if labels.spatial_shape != image.spatial_shape or not torch.allclose(
        torch.as_tensor(labels.affine), torch.as_tensor(image.affine), atol=1e-3
    ):
        raise VolumeShapeError(
            f"label map {labels.spatial_shape} is not on the image's grid {image.spatial_shape}", label_path
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
