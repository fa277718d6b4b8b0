"""Segmentation evaluation: sliding-window prediction (the pipeline's own) scored with medfm.metrics."""

from __future__ import annotations

from collections.abc import Sequence

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
    "load_segmentation_pairs",
    "prepare_segmentation_sample",
    "sliding_window_logits",
]


def evaluate_segmentation(
    model: nn.Module,
    samples: Sequence[SegmentationSample],
    roi_size: Sequence[int],
    *,
    labels: Sequence[int] | None = None,
    evaluation_regions: Sequence[torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """Mean per-label Dice (and HD95, NSD) of ``model`` on ``samples``, optionally only inside regions.

    Voxels outside a sample's evaluation region are set to background in both maps before scoring.
    """
    per_label: dict[int, list[float]] = {}
    scores = []
    for index, sample in enumerate(samples):
        prediction = sliding_window_logits(model, sample.pixel_values, roi_size, spacing=sample.spacing)
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
    summary = {f"dice_{label}": float(torch.tensor(values).nanmean()) for label, values in per_label.items()}
    summary["mean_dice"] = float(torch.tensor([s["dice"] for s in scores]).nanmean())
    return summary
