"""SPAD fixtures: upstream tensors and the tiny configs they were made with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfm.models.spad import SpadViTConfig, SpadVTConfig

# The constructor arguments recorded in shared/fixtures/spad/config.json.
TINY_VIT = dict(
    hidden_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    pos_embed_shape=(3, 5, 5),
    codebook_size=64,
    mask_layer_ids=[2, 3],
    out_indices=[0, 1, 2, 3],
)
TINY_VT = dict(
    downsample_channels=[8, 16, 16], upsample_channels=[8, 16, 16], codebook_size=64, embedding_dim=16
)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # the fixture README's recommendation for a float32 CPU port


class SpadFixtures:
    def __init__(self, folder: Path):
        self.folder = folder
        self.vit_state = load_file(str(folder / "upstream_state_dict.safetensors"))
        self.tokenizer_state = load_file(str(folder / "tokenizer_state_dict.safetensors"))
        self.adapter_state = load_file(str(folder / "adapter_state_dict.safetensors"))
        self.inputs = load_file(str(folder / "inputs.safetensors"))
        self.expected = load_file(str(folder / "expected.safetensors"))


@pytest.fixture(scope="session")
def spad(upstream_fixtures) -> SpadFixtures:
    return SpadFixtures(upstream_fixtures("spad"))


@pytest.fixture
def tiny_vit_config() -> SpadViTConfig:
    return SpadViTConfig(**TINY_VIT)


@pytest.fixture
def tiny_vt_config() -> SpadVTConfig:
    return SpadVTConfig(**TINY_VT)
