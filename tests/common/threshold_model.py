"""A transparent stand-in segmentation model the pipeline tests share (no medfm model class: it also checks
that a plain transformers model runs in the pipelines)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput


class ThresholdConfig(PretrainedConfig):
    model_type = "medfm_test_threshold"


class ThresholdSegmenter(PreTrainedModel):
    """A transparent 'model': label 1 where the processed intensity is above 0.5. Counts its calls."""

    config_class = ThresholdConfig

    def __init__(self, config):
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0
        self.post_init()

    def forward(self, pixel_values, **kwargs):
        self.calls += 1
        x = pixel_values[:, :1] - 0.5 + 0 * self.anchor
        return SemanticSegmenterOutput(logits=torch.cat([-x, x], dim=1) * 20)
