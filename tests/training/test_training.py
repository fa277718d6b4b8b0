"""The shared training loop, its schedule, and the segmentation crop sampler."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from medfm.training import SegmentationSample, TrainingConfig, VolumeCropSampler, cosine_with_warmup, train


def test_cosine_with_warmup_shape() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, warmup=4, total=14, min_ratio=0.1)
    rates = []
    for _ in range(14):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == pytest.approx(1.0) and rates[9] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))


def test_crops_stay_inside_their_region_and_pad_small_volumes() -> None:
    labels = torch.zeros(16, 40, 40, dtype=torch.long)
    labels[:, :, 20:] = 1  # the right part is "held out"
    region = torch.zeros_like(labels, dtype=torch.bool)
    region[:, :, 4:12] = True
    image = labels[None].float()
    sampler = VolumeCropSampler(
        [SegmentationSample(image, labels, torch.ones(3), region)],
        crop=(8, 16, 8),
        batch_size=3,
        flip_axes=(),
        seed=1,
    )
    for _ in range(20):
        batch = next(sampler)
        assert batch["pixel_values"].shape == (3, 1, 8, 16, 8) and batch["labels"].shape == (3, 8, 16, 8)
        assert int(batch["labels"].sum()) == 0  # never a voxel from the held-out part
    small = VolumeCropSampler(
        [SegmentationSample(torch.ones(1, 4, 4, 4), torch.ones(4, 4, 4, dtype=torch.long), torch.ones(3))],
        crop=(8, 8, 8),
        batch_size=1,
    )
    batch = next(small)
    assert batch["labels"].shape == (1, 8, 8, 8) and int(batch["labels"].sum()) == 64


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, pixel_values, labels):
        logits = self.conv(pixel_values)
        return SemanticSegmenterOutput(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def test_loop_learns_and_evaluates() -> None:
    torch.manual_seed(0)
    labels = (torch.rand(8, 16, 16) > 0.5).long()
    sample = SegmentationSample(labels[None].float() * 2 - 1, labels, torch.ones(3))
    sampler = VolumeCropSampler([sample], crop=(4, 8, 8), batch_size=2, seed=0)
    evaluations = []
    history = train(
        _Tiny(),
        sampler,
        TrainingConfig(steps=60, learning_rate=0.1, warmup_steps=5, eval_every=20),
        on_eval=lambda model, step: evaluations.append(step) or step,
    )
    assert len(history.losses) == 60 and history.losses[-1] < history.losses[0] / 5
    assert [step for step, _ in history.evaluations] == [20, 40, 60] == evaluations
