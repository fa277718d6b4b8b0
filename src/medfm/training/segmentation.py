"""Segmentation evaluation: sliding-window prediction (the pipeline's own) scored with medfm.metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

# The data pieces moved to medfm.data; importable from here as before.
from ..data.segmentation import (
    SegmentationSample,
    VolumeCropSampler,
    load_segmentation_pairs,
    prepare_segmentation_sample,
)
from ..inference import sliding_window_logits
from ..metrics import mean_metrics, segmentation_metrics

__all__ = [
    "SegmentationSample",
    "VolumeCropSampler",
    "evaluate_segmentation",
    "label_key",
    "load_segmentation_pairs",
    "prepare_segmentation_sample",
    "sliding_window_logits",
]


def label_key(label: int, names: Mapping[int, str] | None = None) -> str:
    """The name a label's scores go under: its name in ``names`` as a key (``"left kidney"`` ->
    ``left_kidney``), else its value."""
    name = (names or {}).get(int(label))
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() if name else ""
    return slug or str(int(label))


def _mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of the values that are numbers; ``None`` when none is (a score that cannot be computed)."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else None


def evaluate_segmentation(
    model: nn.Module,
    samples: Sequence[SegmentationSample],
    roi_size: Sequence[int],
    *,
    labels: Sequence[int] | None = None,
    evaluation_regions: Sequence[torch.Tensor | None] | None = None,
    label_names: Mapping[int, str] | None = None,
) -> dict[str, float | None]:
    """Per-label and mean Dice of ``model`` on ``samples``, optionally only inside regions.

    Voxels outside a sample's evaluation region are set to background in both maps before scoring. Keys are
    ``dice_<name>`` (names from ``label_names``, e.g. a model's ``id2label``; the label value without one) and
    ``mean_dice``. A score that cannot be computed (a label absent from every reference and prediction) is
    ``None``, never NaN, so it is ``null`` in JSON.
    """
    per_label: dict[int, list[float]] = {}
    scores = []
    for index, sample in enumerate(samples):
        prediction = sliding_window_logits(
            model, sample.pixel_values, roi_size, spacing=sample.spacing, progress=False
        )
        prediction = prediction[0].argmax(0).cpu()
        reference = sample.labels.clone()
        region = evaluation_regions[index] if evaluation_regions is not None else None
        if region is not None:
            prediction[~region] = 0
            reference[~region] = 0
        result = segmentation_metrics(
            prediction.numpy(),
            reference.numpy(),
            labels=labels,
            spacing=tuple(float(s) for s in sample.spacing),
        )
        scores.append(mean_metrics(result))
        for label, metrics in result.items():
            per_label.setdefault(label, []).append(metrics.dice)
    summary: dict[str, float | None] = {
        f"dice_{label_key(label, label_names)}": _mean_or_none(values) for label, values in per_label.items()
    }
    summary["mean_dice"] = _mean_or_none([s["dice"] for s in scores])
    return summary
