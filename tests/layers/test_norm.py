"""Channels-first LayerNorm against the normalisation written out, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from medfm.layers.norm import ChannelsFirstLayerNorm


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_normalises_over_channels(spatial) -> None:
    torch.manual_seed(0)
    norm = ChannelsFirstLayerNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    x = torch.randn(2, 4, *spatial)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    shape = (1, 4) + (1,) * len(spatial)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(shape) + norm.bias.view(shape)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
