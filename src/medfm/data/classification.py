"""Labelled classification data: files from class folders or a JSON list, and batches that share a shape
and an anisotropy level."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DatasetError, VolumeNotFoundError
from ..layers.anisotropy import grid_anisotropy

__all__ = [
    "ClassificationSample",
    "GroupedBatchSampler",
    "anisotropy_group",
    "load_classification_items",
    "stratified_split",
]

_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".dcm")


@dataclass
class ClassificationSample:
    """One processed image ``(C, D, H, W)``, its grid spacing ``(3,)`` and its class index."""

    pixel_values: torch.Tensor
    spacing: torch.Tensor
    label: int


def load_classification_items(source: str | os.PathLike) -> tuple[list[tuple[Path, str]], list[str]]:
    """(file, class name) items and the sorted class names.

    ``source`` is a folder with one sub-folder per class (NIfTI or DICOM files inside), or a JSON file with a
    ``training`` list of ``{"image": path, "label": name}`` (paths relative to the file).

    A label in the JSON list is a class name (a non-empty string) or a class index (a non-negative whole
    number; ``2.0`` counts as ``2``).

    Raises:
        VolumeNotFoundError: Nothing usable at ``source``, or a listed file is missing.
        DatasetError: The JSON file is not JSON, has no ``training`` list, or an entry is not an
            ``{"image": path, "label": name}`` object (a missing key, a non-string path, a label that is a
            negative, fractional or NaN number, a boolean, null or a list).
    """
    from .segmentation import _file_field, read_dataset_json, training_entries

    source = Path(source)
    if source.is_file():
        entries = training_entries(read_dataset_json(source), source)
        items = [
            (
                (source.parent / _file_field(e, "image", i, source)).resolve(),
                _class_label(e["label"], i, source),
            )
            for i, e in enumerate(entries)
        ]
    elif source.is_dir():
        items = [
            (path, folder.name)
            for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
            for path in sorted(folder.iterdir())
            if path.name.lower().endswith(_IMAGE_SUFFIXES) or path.is_dir()
        ]
    else:
        raise VolumeNotFoundError("expected a folder of class folders or a JSON list", source)
    if not items:
        raise VolumeNotFoundError("holds no labelled image", source)
    for path, _ in items:
        if not path.exists():
            raise VolumeNotFoundError("listed image is missing", path)
    return items, sorted({name for _, name in items})


def _class_label(value: object, index: int, path: Path) -> str:
    """A JSON label as a class name: a non-empty string, or a non-negative whole number."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            problem = f"{value} is not a class"
        elif value < 0:
            problem = f"{value} is negative"
        elif isinstance(value, float) and not value.is_integer():
            problem = f"{value} is not a whole number"
        else:
            return str(int(value))
    else:
        problem = f"{json.dumps(value)[:60]} is a JSON {_json_type(value)}"
    raise DatasetError(
        f'"training" entry {index} has "label": {problem}; expected a class name (a non-empty string) or a '
        "class index 0, 1, ...",
        path,
    )


def _json_type(value: object) -> str:
    from .segmentation import _json_type as name

    return name(value)


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(training, validation) indices holding out about ``val_fraction`` of each class.

    Every class with at least two samples puts at least one in validation and keeps at least one for training;
    a class with a single sample trains on it. The order within a class is a seeded shuffle.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1); got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        held = (
            0
            if len(members) < 2 or val_fraction == 0
            else min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        )
        val += members[:held]
        train += members[held:]
    return sorted(train), sorted(val)


def anisotropy_group(sample: ClassificationSample) -> int:
    """The anisotropy level of a sample (single-slice images are 2D, level 5, whatever their thickness)."""
    return grid_anisotropy(sample.pixel_values.shape[1], sample.spacing)


class GroupedBatchSampler:
    """An endless iterator of batches whose samples share a shape and a group key, drawn uniformly over the
    groups' samples.

    Args:
        samples: The samples.
        batch_size: Samples per batch.
        seed: Seed of the draws.
        group_key: What else a batch must share besides the shape; by default the anisotropy level (one
            spacing-adaptive forward runs one level), ``None`` for the shape alone.
        include_spacing: Put the (first sample's) ``spacing`` in the batch, for models whose forward takes it.
    """

    def __init__(
        self,
        samples: Sequence[ClassificationSample],
        batch_size: int = 4,
        seed: int = 0,
        group_key: Callable[[ClassificationSample], Hashable] | None = anisotropy_group,
        include_spacing: bool = True,
    ):
        if not samples:
            raise ValueError("no samples to draw batches from")
        groups: dict[tuple, list[ClassificationSample]] = defaultdict(list)
        for sample in samples:
            key = group_key(sample) if group_key is not None else None
            groups[(tuple(sample.pixel_values.shape), key)].append(sample)
        self.groups = list(groups.values())
        self.weights = torch.tensor([len(g) for g in self.groups], dtype=torch.float)
        self.batch_size = batch_size
        self.include_spacing = include_spacing
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        group = self.groups[int(torch.multinomial(self.weights, 1, generator=self.generator))]
        picks = torch.randint(len(group), (self.batch_size,), generator=self.generator).tolist()
        chosen = [group[i] for i in picks]
        batch = {
            "pixel_values": torch.stack([s.pixel_values for s in chosen]),
            "labels": torch.tensor([s.label for s in chosen]),
        }
        if self.include_spacing:
            batch["spacing"] = chosen[0].spacing
        return batch
