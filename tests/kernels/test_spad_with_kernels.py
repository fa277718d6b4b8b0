"""SPAD-ViT running on medfm's Triton kernels (under the interpreter) equals SPAD-ViT on plain PyTorch: the
packed stream through the flash-attention kernel and the fused RoPE, and the padded MIM path whose partial
blocks rotate per-sample subsets of tokens. Values and gradients."""

from __future__ import annotations

import collections
import importlib

import pytest
import torch

import medfm  # noqa: F401  (registers medfm_varlen)
from medfm.kernels import triton_available
from medfm.layers import FUSED_ROPE_ENV, VARLEN_IMPLEMENTATION
from medfm.layers.varlen_attention import VARLEN_BACKEND_ENV
from medfm.models.spad import SpadViTConfig, SpadViTModel

from ..common.tiny_models import TINY_PACKING_VIT, mixed_volumes

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="triton is not installed (pip install 'medfm[triton]')"
)


@pytest.fixture
def kernel_launches(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts launches of the RoPE kernel and of the flash-attention kernels (proof that they ran)."""
    launches: collections.Counter = collections.Counter()
    rope = importlib.import_module("medfm.kernels.rope3d")
    flash = importlib.import_module("medfm.kernels.flash_varlen")
    for module, name, label in ((rope, "_launch", "rope"), (flash, "_launcher", "attention")):
        original = getattr(module, name)

        def counted(*args, original=original, label=label):
            launches[label] += 1
            return original(*args)

        monkeypatch.setattr(module, name, counted)
    return launches


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    model.zero_grad()
    return grads


def _assert_same_gradients(got: dict, expected: dict) -> None:
    """Float32 noise only: on this tiny model even plain fp32 SDPA gradients sit up to ~1e-4 (absolute) from a
    float64 run, so the bound is a few times that; a wrong mask, scale or angle is off by orders more."""
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=5e-4, rtol=1e-3, msg=name)


def test_packed_stream_on_the_kernels_equals_each_volume_alone(
    monkeypatch: pytest.MonkeyPatch, kernel_launches: collections.Counter
) -> None:
    torch.manual_seed(0)
    model = SpadViTModel(SpadViTConfig(**TINY_PACKING_VIT)).train()
    volumes = mixed_volumes()
    separate = []
    for volume, spacing in volumes:  # plain PyTorch: eager rotation, ordinary SDPA, one volume at a time
        output = model(volume[None], spacing=spacing).last_hidden_state[0]
        output.pow(2).sum().backward()
        separate.append(output.detach())
    expected_grads = _gradients(model)
    assert not kernel_launches

    monkeypatch.setenv(FUSED_ROPE_ENV, "1")
    monkeypatch.setenv(VARLEN_BACKEND_ENV, "triton")
    model.set_attn_implementation(VARLEN_IMPLEMENTATION)
    packed = model.forward_packed([v for v, _ in volumes], spacings=[s for _, s in volumes])
    packed.last_hidden_state.pow(2).sum().backward()
    blocks = TINY_PACKING_VIT["num_hidden_layers"]
    assert kernel_launches == {"rope": 2 * blocks, "attention": 2 * blocks}  # forward and backward, per block
    for pieces, single in zip(packed.unpack(), separate):
        torch.testing.assert_close(pieces, single, atol=1e-5, rtol=1e-5)
    _assert_same_gradients(_gradients(model), expected_grads)


def test_fused_rope_in_the_masked_partial_blocks(
    monkeypatch: pytest.MonkeyPatch, kernel_launches: collections.Counter
) -> None:
    """Blocks outside mask_layer_ids see only the visible tokens, each with its own position (per sample)."""
    torch.manual_seed(0)
    config = SpadViTConfig(**{**TINY_PACKING_VIT, "num_hidden_layers": 3, "mask_layer_ids": [0]})
    model = SpadViTModel(config, use_mask_token=True).train()
    pixel_values = torch.randn(2, 3, 32, 48, 32)
    masked = torch.rand(2, 2 * 3 * 2, generator=torch.Generator().manual_seed(1)).argsort(1) < 5

    def run():
        output = model(pixel_values, aniso_d=0, bool_masked_pos=masked).last_hidden_state
        output.pow(2).sum().backward()
        return output.detach(), _gradients(model)

    monkeypatch.setenv(FUSED_ROPE_ENV, "0")
    expected, expected_grads = run()
    assert not kernel_launches
    monkeypatch.setenv(FUSED_ROPE_ENV, "1")
    got, grads = run()
    assert kernel_launches == {"rope": 2 * config.num_hidden_layers}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _assert_same_gradients(grads, expected_grads)
