"""Data: pre-training volume sources, a dataset of random crops and a sampler grouped by anisotropy; labelled
segmentation and classification data for fine-tuning."""

from .classification import ClassificationSample, GroupedBatchSampler, load_classification_items
from .pretraining import AnisotropyBatchSampler, PretrainingDataset, SampleKey, collate_samples
from .segmentation import (
    SegmentationSample,
    VolumeCropSampler,
    load_segmentation_pairs,
    prepare_segmentation_sample,
)
from .sources import VolumeInfo, discover_volumes, probe_volumes, volumes_from_hf_dataset

__all__ = [
    "AnisotropyBatchSampler",
    "ClassificationSample",
    "GroupedBatchSampler",
    "PretrainingDataset",
    "SampleKey",
    "SegmentationSample",
    "VolumeCropSampler",
    "VolumeInfo",
    "collate_samples",
    "discover_volumes",
    "load_classification_items",
    "load_segmentation_pairs",
    "prepare_segmentation_sample",
    "probe_volumes",
    "volumes_from_hf_dataset",
]
