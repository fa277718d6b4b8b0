"""Training: the Accelerate loop every objective shares, schedules, objectives and evaluation.

The fine-tuning data pieces live in :mod:`medfm.data`; they are re-exported here for the scripts that
import them from ``medfm.training``.
"""

from ..data.classification import ClassificationSample, GroupedBatchSampler, load_classification_items
from ..data.segmentation import (
    SegmentationSample,
    VolumeCropSampler,
    load_segmentation_pairs,
    prepare_segmentation_sample,
)
from ..inference import sliding_window_logits
from .classification import evaluate_classification
from .loop import JsonlTracker, TrainingConfig, TrainingHistory, cosine_with_warmup, latest_checkpoint, train
from .segmentation import evaluate_segmentation

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
