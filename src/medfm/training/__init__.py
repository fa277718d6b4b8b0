"""Training: the Accelerate loop every objective shares, schedules, and data sampling."""

from .classification import (
    ClassificationSample,
    GroupedBatchSampler,
    evaluate_classification,
    load_classification_items,
)
from .loop import TrainingConfig, TrainingHistory, cosine_with_warmup, train
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
    "SegmentationSample",
    "TrainingConfig",
    "TrainingHistory",
    "VolumeCropSampler",
    "cosine_with_warmup",
    "evaluate_classification",
    "evaluate_segmentation",
    "load_classification_items",
    "load_segmentation_pairs",
    "prepare_segmentation_sample",
    "sliding_window_logits",
    "train",
]
