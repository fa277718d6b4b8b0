"""Training: the Accelerate loop every objective shares, schedules, and data sampling."""

from .classification import (
    ClassificationSample,
    GroupedBatchSampler,
    evaluate_classification,
    load_classification_items,
)
from .loop import JsonlTracker, TrainingConfig, TrainingHistory, cosine_with_warmup, latest_checkpoint, train
from .segmentation import (
    SegmentationSample,
    VolumeCropSampler,
    evaluate_segmentation,
    load_segmentation_pairs,
    prepare_segmentation_sample,
    sliding_window_logits,
)

__all__ = [
    "ClassificationSample",
    "GroupedBatchSampler",
    "JsonlTracker",
    "SegmentationSample",
    "TrainingConfig",
    "TrainingHistory",
    "VolumeCropSampler",
    "cosine_with_warmup",
    "evaluate_classification",
    "evaluate_segmentation",
    "latest_checkpoint",
    "load_classification_items",
    "load_segmentation_pairs",
    "prepare_segmentation_sample",
    "sliding_window_logits",
    "train",
]
