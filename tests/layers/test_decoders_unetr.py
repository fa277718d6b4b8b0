"""UnetrDecoder: shapes in 2D and 3D, gradients, MiM's upstream decoder keys, and MiM's seg logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from medfm.layers.decoders.unetr import UnetrDecoder

# MiM's base decoder keys (MONAI 1.0 blocks in ConvViT3dUNETR) map one to one onto UnetrDecoder's names:
#   encoder1.layer.conv{1,2,3}.conv.weight         -> encoder1 (image, UnetResBlock with a 1x1 projection)
#   encoder{2,3,4,10}.layer.conv{1,2}.conv.weight  -> encoder2..4 on hs0..hs2, encoder10 on hs4 (fpn)
#   decoder{1..5}.transp_conv.conv.weight          -> the x2 transposed convs
#   decoder{1..5}.conv_block.conv{1,2,3}.conv.weight -> the residual blocks after the concatenation
#   out.conv.conv.{weight,bias}                    -> UnetOutBlock
SEG_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "mim" / "mim_upstream_seg_keys.json"


def _features(shape, channels, batch: int = 1):
    return [torch.randn(batch, c, *[s // 2 ** (i + 1) for s in shape]) for i, c in enumerate(channels)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_and_gradients(spatial_dims) -> None:
    feature_size, channels = 2, [3, 5, 7, 16, 9]
    decoder = UnetrDecoder(spatial_dims, 1, channels, feature_size, out_channels=4)
    shape = (64, 32) if spatial_dims == 2 else (64, 32, 32)  # InstanceNorm needs > 1 voxel at stride 32
    image = torch.randn(2, 1, *shape)
    logits = decoder(image, _features(shape, channels, batch=2))
    assert logits.shape == (2, 4, *shape)
    logits.square().mean().backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_parameter_names_and_shapes_hold_mim_base_decoder() -> None:
    spec = json.loads(SEG_KEYS.read_text())
    config = spec["seg_config"]
    upstream = {k: tuple(v) for k, v in spec["seg_keys"].items() if not k.startswith("backbone.")}
    decoder = UnetrDecoder(
        3,
        config["in_channels"],
        config["backbone"]["embed_dim"],  # four stages and the fpn map
        config["feature_size"],
        config["out_channels"],
        norm_name=config["norm_name"],
    )
    ours = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert ours == upstream


def test_reproduces_mim_segmentation_logits(upstream_fixtures) -> None:
    """Fixture backbone maps, normalised as MiM's seg net does (parameter-free channel LN, eps 1e-5)."""
    folder = upstream_fixtures("mim")
    state = load_file(folder / "upstream_seg_state_dict.safetensors")
    inputs, expected = load_file(folder / "inputs.safetensors"), load_file(folder / "expected.safetensors")
    weights = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    maps = [expected[f"backbone.hidden_states.{i}"] for i in range(5)]
    decoder = UnetrDecoder(
        3,
        weights["encoder1.layer.conv1.conv.weight"].shape[1],
        [m.shape[1] for m in maps],
        weights["encoder1.layer.conv1.conv.weight"].shape[0],
        weights["out.conv.conv.weight"].shape[0],
    ).eval()
    decoder.load_state_dict(weights, strict=True)
    maps = [F.layer_norm(m.movedim(1, -1), (m.shape[1],), eps=1e-5).movedim(-1, 1) for m in maps]
    with torch.no_grad():
        logits = decoder(inputs["seg.pixel_values"], maps)
    torch.testing.assert_close(logits, expected["seg.logits"], atol=1e-4, rtol=1e-4)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="8 \\* feature_size = 16 channels; got 12"):
        UnetrDecoder(3, 1, [2, 4, 8, 12, 32], 2, 3)
    with pytest.raises(ValueError, match="five encoder maps"):
        UnetrDecoder(3, 1, [2, 4, 8, 16], 2, 3)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UnetrDecoder(1, 1, [2, 4, 8, 16, 32], 2, 3)
    decoder = UnetrDecoder(2, 1, [2, 4, 8, 16, 32], 2, 3)
    image = torch.randn(1, 1, 64, 64)
    features = _features((64, 64), [2, 4, 8, 16, 32])
    with pytest.raises(ValueError, match="expected five encoder maps"):
        decoder(image, features[:4])
    features[2] = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"encoder map 2 should be \(B, 8, \*\(8, 8\)\) \(stride 8\)"):
        decoder(image, features)
    with pytest.raises(ValueError, match="expected a 2D image"):
        decoder(torch.randn(1, 1, 64, 64, 64), features)
