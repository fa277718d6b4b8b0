"""Upstream parity: converted fixture weights reproduce every tensor of shared/fixtures/spad/expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import medfm  # noqa: F401
from medfm.models.spad import (
    SpadViTForMaskedImageModeling,
    SpadViTForSemanticSegmentation,
    SpadViTModel,
    SpadVTModel,
)
from medfm.models.spad.convert_spad import (
    convert_spad_checkpoint,
    convert_tokenizer_state_dict,
    convert_vit_state_dict,
    infer_tokenizer_config,
    infer_vit_config,
)

from .conftest import IMAGENET_MEAN, IMAGENET_STD, TINY_VIT, TOLERANCE


@pytest.fixture(scope="module")
def converted(spad, tmp_path_factory) -> Path:
    """The fixture weights run through the real conversion entry point into a model folder."""
    folder = tmp_path_factory.mktemp("converted")
    save_file(spad.vit_state, str(folder / "pumit.safetensors"))
    save_file(spad.tokenizer_state, str(folder / "tokenizer.safetensors"))
    return convert_spad_checkpoint(
        folder / "pumit.safetensors",
        folder / "spad-tiny",
        tokenizer=folder / "tokenizer.safetensors",
        config_overrides={"num_attention_heads": 4, "mask_layer_ids": [2, 3], "out_indices": [0, 1, 2, 3]},
    )


def test_config_inferred_from_shapes(spad) -> None:
    config = infer_vit_config(spad.vit_state, {"num_attention_heads": 4})
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "codebook_size"):
        assert getattr(config, key) == TINY_VIT[key]
    assert (
        config.pos_embed_shape == [3, 5, 5]
        and config.patch_size == [16, 16, 16]
        and config.adaptive_patch_embed
    )
    vt = infer_tokenizer_config(convert_tokenizer_state_dict(spad.tokenizer_state))
    assert vt.downsample_channels == [8, 16, 16] and vt.upsample_channels == [8, 16, 16]
    assert (vt.codebook_size, vt.embedding_dim, vt.start_stride) == (64, 16, 4)


@pytest.mark.parametrize("name", ["vit3d_aniso", "vit3d_iso", "vit2d"])
def test_backbone_outputs(name: str, spad, converted: Path) -> None:
    model = SpadViTModel.from_pretrained(converted).eval()
    inputs, expected = spad.inputs, spad.expected
    with torch.no_grad():
        out = model(
            inputs[f"{name}.pixel_values"], spacing=inputs[f"{name}.spacing"], output_hidden_states=True
        )
    assert model.resolve_aniso_d(inputs[f"{name}.pixel_values"], inputs[f"{name}.spacing"], None) == int(
        inputs[f"{name}.aniso_d"]
    )
    torch.testing.assert_close(out.hidden_states[0], expected[f"{name}.embeddings"], **TOLERANCE)
    for i in range(4):
        torch.testing.assert_close(out.hidden_states[i + 1], expected[f"{name}.block_{i}"], **TOLERANCE)
    torch.testing.assert_close(out.last_hidden_state, expected[f"{name}.last_hidden_state"], **TOLERANCE)
    torch.testing.assert_close(out.pooler_output, expected[f"{name}.last_hidden_state"][:, 0], **TOLERANCE)
    grid = model.token_grid(inputs[f"{name}.pixel_values"].shape, int(inputs[f"{name}.aniso_d"]))
    cos, sin = model.rope(grid)
    torch.testing.assert_close(cos, expected[f"{name}.rope_cos"], **TOLERANCE)
    torch.testing.assert_close(sin, expected[f"{name}.rope_sin"], **TOLERANCE)


def test_two_d_input_as_four_dims(spad, converted: Path) -> None:
    model = SpadViTModel.from_pretrained(converted).eval()
    image = spad.inputs["vit2d.pixel_values"][:, :, 0]  # (B, C, H, W)
    with torch.no_grad():
        out = model(image)  # no spacing: a 2D image is aniso_d 5
    torch.testing.assert_close(out.last_hidden_state, spad.expected["vit2d.last_hidden_state"], **TOLERANCE)


def test_masked_image_modeling(spad, converted: Path) -> None:
    model = SpadViTForMaskedImageModeling.from_pretrained(converted).eval()
    model.set_tokenizer(SpadVTModel.from_pretrained(converted, subfolder="tokenizer"))
    x01 = spad.inputs["mim.pixel_values_01"]
    with torch.no_grad():
        out = model(
            (x01 - IMAGENET_MEAN) / IMAGENET_STD,
            spacing=spad.inputs["mim.spacing"],
            visible_indices=spad.inputs["mim.visible_idx"],
            tokenizer_pixel_values=2 * x01 - 1,
            output_hidden_states=True,
        )
        hidden = model.spad_vit(
            (x01 - IMAGENET_MEAN) / IMAGENET_STD,
            spacing=spad.inputs["mim.spacing"],
            visible_indices=spad.inputs["mim.visible_idx"],
        ).last_hidden_state
    assert torch.equal(out.bool_masked_pos, spad.expected["mim.masked_mask"])
    torch.testing.assert_close(out.target_logits, spad.expected["mim.tokenizer_logits"], **TOLERANCE)
    torch.testing.assert_close(hidden, spad.expected["mim.last_hidden_state"], **TOLERANCE)
    torch.testing.assert_close(out.logits, spad.expected["mim.masked_logits"], **TOLERANCE)
    torch.testing.assert_close(out.loss.reshape(1), spad.expected["mim.loss"], **TOLERANCE)
    # The same with the mask given as bool_masked_pos and precomputed targets.
    with torch.no_grad():
        again = model(
            (x01 - IMAGENET_MEAN) / IMAGENET_STD,
            spacing=spad.inputs["mim.spacing"],
            bool_masked_pos=spad.expected["mim.masked_mask"],
            target_logits=spad.expected["mim.tokenizer_logits"],
        )
    torch.testing.assert_close(again.loss.reshape(1), spad.expected["mim.loss"], **TOLERANCE)


@pytest.mark.parametrize("name", ["tok3d", "tok2d"])
def test_tokenizer(name: str, spad, converted: Path) -> None:
    tokenizer = SpadVTModel.from_pretrained(converted, subfolder="tokenizer").eval()
    with torch.no_grad():
        out = tokenizer(spad.inputs[f"{name}.pixel_values"], spacing=spad.inputs[f"{name}.spacing"])
    torch.testing.assert_close(out.z, spad.expected[f"{name}.z"], **TOLERANCE)
    torch.testing.assert_close(out.logits, spad.expected[f"{name}.logits"], **TOLERANCE)
    torch.testing.assert_close(out.z_q, spad.expected[f"{name}.z_q"], **TOLERANCE)
    torch.testing.assert_close(out.reconstruction, spad.expected[f"{name}.x_rec"], **TOLERANCE)


def test_adapted_segmentation_backbone(spad, converted: Path) -> None:
    """Loading the pre-trained weights into a fixed-patch, 1-channel config adapts them as upstream does."""
    model = SpadViTForSemanticSegmentation.from_pretrained(
        converted,
        patch_size=(4, 16, 16),
        adaptive_patch_embed=False,
        in_channels=1,
        pos_embed_shape=(4, 4, 4),
        num_labels=3,
    ).eval()
    adapter = spad.adapter_state
    torch.testing.assert_close(
        model.spad_vit.patch_embed.proj.weight, adapter["patch_embed.proj.weight"], **TOLERANCE
    )
    torch.testing.assert_close(model.spad_vit.pos_embed, adapter["pos_embed"], **TOLERANCE)
    # The adapter's own (random upstream) parameters, then the four features.
    pyramid = {k: v for k, v in adapter.items() if k.startswith(("fpn.", "norms."))}
    missing, unexpected = model.pyramid.load_state_dict(pyramid, strict=False)
    assert not unexpected and not missing
    with torch.no_grad():
        features, hidden = model.extract_features(
            spad.inputs["adapter.pixel_values"], spacing=spad.inputs["adapter.spacing"]
        )
    for i in range(4):
        torch.testing.assert_close(hidden[i + 1], spad.expected[f"adapter.block_{i}"], **TOLERANCE)
        torch.testing.assert_close(features[i], spad.expected[f"adapter.feature_{i}"], **TOLERANCE)


def test_conversion_keeps_upstream_names(spad) -> None:
    converted = convert_vit_state_dict(spad.vit_state)
    assert set(converted) == {k if k.startswith("mim_head.") else f"spad_vit.{k}" for k in spad.vit_state}
