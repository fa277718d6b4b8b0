"""Data for pre-training: volume sources, a dataset of random crops, and a sampler grouped by anisotropy."""

from .pretraining import AnisotropyBatchSampler, PretrainingDataset, SampleKey, collate_samples
from .sources import VolumeInfo, discover_volumes, probe_volumes, volumes_from_hf_dataset

__all__ = [
    "AnisotropyBatchSampler",
    "PretrainingDataset",
    "SampleKey",
    "VolumeInfo",
    "collate_samples",
    "discover_volumes",
    "probe_volumes",
    "volumes_from_hf_dataset",
]
