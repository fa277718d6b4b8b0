"""Training: the Accelerate loop every objective shares, schedules, and data sampling."""

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
    "SegmentationSample",
    "TrainingConfig",
    "TrainingHistory",
    "VolumeCropSampler",
    "cosine_with_warmup",
    "evaluate_segmentation",
    "load_segmentation_pairs",
    "prepare_segmentation_sample",
    "sliding_window_logits",
    "train",
]
