"""Upstream parity: converted fixture weights reproduce every tensor of the SPAD fixture's expected outputs.

Nothing here is a constant of the fixture: configs come from the fixture folder's upstream_config.json and
the tensors' shapes (through the converter's own inference), tolerances from its "tolerances", and the
inputs to run from the names in inputs/expected.safetensors. A held-back fixture set made with other
configs and other input names of the same pattern runs as it is: ``MEDFM_FIXTURES=<folder> pytest ...``.
"""

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

from ...conftest import fixtures_root
from .conftest import (
    ADAPTER_OUTPUTS,
    MIM_OUTPUTS,
    TOKENIZER_OUTPUTS,
    VIT_FIXED,
    VIT_OUTPUTS,
    SpadFixtures,
    discover_inputs,
)

# The parametrised tests and the kind of fixture input each runs on (see discover_inputs).
_KINDS = {"name": "vit", "name_2d": "vit2d", "tok_name": "tok", "mim_name": "mim", "adapter_name": "adapter"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise over the input prefixes found in the fixture folder.

    Without the folder every test gets one placeholder, so that the ``spad`` fixture fails it (a missing
    fixture is never a skip).
    """
    folder = fixtures_root() / "spad"
    found = discover_inputs(folder) if (folder / "inputs.safetensors").is_file() else None
    for argument, kind in _KINDS.items():
        if argument in metafunc.fixturenames:
            metafunc.parametrize(argument, found[kind] if found is not None else ["fixtures-missing"])


@pytest.fixture(scope="module")
def converted(spad: SpadFixtures, tmp_path_factory) -> Path:
    """The fixture weights run through the real conversion entry point into a model folder.

    Only the fields shapes cannot tell (heads, mask layers, out indices, RoPE bases...) are passed, read
    from upstream_config.json; everything else the converter infers.
    """
    folder = tmp_path_factory.mktemp("converted")
    save_file(spad.vit_state, str(folder / "pumit.safetensors"))
    save_file(spad.tokenizer_state, str(folder / "tokenizer.safetensors"))
    return convert_spad_checkpoint(
        folder / "pumit.safetensors",
        folder / "spad-fixture",
        tokenizer=folder / "tokenizer.safetensors",
        config_overrides=spad.vit_overrides,
    )


def _as_three(value) -> list[int]:
    return [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]


def test_fixture_covers_every_output(spad: SpadFixtures) -> None:
    """Every expected tensor belongs to an input these tests run, and every kind of input is there."""
    found, config = spad.discovered, spad.vit_config
    for kind in ("vit", "tok", "mim", "adapter"):
        assert found[kind], f"no {kind} input found in {spad.folder}"
    blocks, features = config.num_hidden_layers, len(config.out_indices)
    covered = set()
    for kind, suffixes in (
        ("vit", VIT_OUTPUTS),
        ("tok", TOKENIZER_OUTPUTS),
        ("mim", MIM_OUTPUTS),
        ("adapter", ADAPTER_OUTPUTS),
    ):
        for prefix in found[kind]:
            covered |= spad.expected_outputs(prefix, suffixes, blocks=blocks, features=features)
    assert covered == set(spad.expected), (
        f"not run: {sorted(set(spad.expected) - covered)}; missing: {sorted(covered - set(spad.expected))}"
    )


def test_upstream_arguments_medfm_implements(spad: SpadFixtures) -> None:
    """The upstream choices medfm implements one way only are the fixture's."""
    arguments = spad.vit_arguments
    for name, value in VIT_FIXED.items():
        assert arguments.get(name, value) == value, f"upstream {name}={arguments[name]!r} is not supported"
    if "quantize" in spad.tokenizer_arguments:
        assert spad.tokenizer_arguments["quantize"].get("mode", "soft") == "soft"
    for name in ("embed_dim", "depth", "num_heads"):
        if name in spad.adapter_arguments:
            assert spad.adapter_arguments[name] == arguments[name], f"the adapter's {name} is the ViT's"


def test_config_inferred_from_shapes(spad: SpadFixtures) -> None:
    """The converter infers from the tensors' shapes what upstream_config.json states."""
    arguments, tokenizer = spad.vit_arguments, spad.tokenizer_arguments
    config = infer_vit_config(spad.vit_state, {"num_attention_heads": arguments["num_heads"]})
    assert config.hidden_size == arguments["embed_dim"]
    assert config.num_hidden_layers == arguments["depth"]
    assert config.in_channels == arguments["in_channels"]
    assert config.intermediate_size == int(arguments["embed_dim"] * arguments["mlp_ratio"])
    assert config.codebook_size == tokenizer["quantize"]["num_embeddings"]
    assert config.pos_embed_shape == list(arguments["pos_embed_shape"])
    assert config.patch_size == _as_three(arguments["patch_size"])
    assert config.adaptive_patch_embed == arguments["adaptive_patch_embed"]
    assert config.qkv_bias == arguments.get("qkv_bias", True)
    vt = infer_tokenizer_config(convert_tokenizer_state_dict(spad.tokenizer_state))
    assert vt.in_channels == tokenizer["in_channels"]
    assert vt.downsample_channels == list(tokenizer["downsample_layer_channels"])
    assert vt.upsample_channels == list(tokenizer["upsample_layer_channels"])
    assert vt.start_stride == tokenizer["start_stride"]
    assert vt.codebook_size == tokenizer["quantize"]["num_embeddings"]
    assert vt.embedding_dim == tokenizer["quantize"]["embedding_dim"]


def test_converted_config_is_the_fixtures(spad: SpadFixtures, converted: Path) -> None:
    """The conversion entry point writes the config inferred from shapes plus upstream_config.json's."""
    model_config = SpadViTModel.from_pretrained(converted).config
    for key, value in spad.vit_config.to_diff_dict().items():
        if key not in ("architectures", "transformers_version", "dtype", "torch_dtype"):
            assert getattr(model_config, key) == value, key
    tokenizer_config = SpadVTModel.from_pretrained(converted, subfolder="tokenizer").config
    for key, value in spad.tokenizer_config.to_diff_dict().items():
        if key not in ("architectures", "transformers_version", "dtype", "torch_dtype"):
            assert getattr(tokenizer_config, key) == value, key


def test_backbone_outputs(name: str, spad: SpadFixtures, converted: Path) -> None:
    model = SpadViTModel.from_pretrained(converted).eval()
    pixel_values, spacing = spad.inputs[f"{name}.pixel_values"], spad.inputs[f"{name}.spacing"]
    aniso_d = int(spad.inputs[f"{name}.aniso_d"])
    with torch.no_grad():
        out = model(pixel_values, spacing=spacing, output_hidden_states=True)
    assert model.resolve_aniso_d(pixel_values, spacing, None) == aniso_d
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    spad.assert_close(out.hidden_states[0], f"{name}.embeddings")
    for i in range(model.config.num_hidden_layers):
        spad.assert_close(out.hidden_states[i + 1], f"{name}.block_{i}")
    spad.assert_close(out.last_hidden_state, f"{name}.last_hidden_state")
    last = spad.expected[f"{name}.last_hidden_state"]
    spad.assert_close(out.pooler_output, f"{name}.last_hidden_state", expected=last[:, 0])
    cos, sin = model.rope(model.token_grid(pixel_values.shape, aniso_d))
    spad.assert_close(cos, f"{name}.rope_cos")
    spad.assert_close(sin, f"{name}.rope_sin")


def test_two_d_input_as_four_dims(name_2d: str, spad: SpadFixtures, converted: Path) -> None:
    model = SpadViTModel.from_pretrained(converted).eval()
    image = spad.inputs[f"{name_2d}.pixel_values"][:, :, 0]  # (B, C, H, W)
    with torch.no_grad():
        out = model(image)  # no spacing: a 2D image is treated as infinitely thick
    spad.assert_close(out.last_hidden_state, f"{name_2d}.last_hidden_state")


def test_masked_image_modeling(mim_name: str, spad: SpadFixtures, converted: Path) -> None:
    model = SpadViTForMaskedImageModeling.from_pretrained(converted).eval()
    model.set_tokenizer(SpadVTModel.from_pretrained(converted, subfolder="tokenizer"))
    x01 = spad.inputs[f"{mim_name}.pixel_values_01"]
    mean, std = spad.vit_input_norm
    spacing, visible = spad.inputs[f"{mim_name}.spacing"], spad.inputs[f"{mim_name}.visible_idx"]
    with torch.no_grad():
        out = model(
            (x01 - mean) / std,
            spacing=spacing,
            visible_indices=visible,
            tokenizer_pixel_values=spad.tokenizer_input(x01),
            output_hidden_states=True,
        )
        hidden = model.spad_vit(
            (x01 - mean) / std, spacing=spacing, visible_indices=visible
        ).last_hidden_state
    if f"{mim_name}.aniso_d" in spad.inputs:
        assert model.spad_vit.resolve_aniso_d(x01, spacing, None) == int(spad.inputs[f"{mim_name}.aniso_d"])
    spad.assert_close(out.bool_masked_pos, f"{mim_name}.masked_mask")
    spad.assert_close(out.target_logits, f"{mim_name}.tokenizer_logits")
    spad.assert_close(hidden, f"{mim_name}.last_hidden_state")
    spad.assert_close(out.logits, f"{mim_name}.masked_logits")
    spad.assert_close(out.loss.reshape(1), f"{mim_name}.loss")
    # The same with the mask given as bool_masked_pos and precomputed targets.
    with torch.no_grad():
        again = model(
            (x01 - mean) / std,
            spacing=spacing,
            bool_masked_pos=spad.expected[f"{mim_name}.masked_mask"],
            target_logits=spad.expected[f"{mim_name}.tokenizer_logits"],
        )
    spad.assert_close(again.loss.reshape(1), f"{mim_name}.loss")


def test_tokenizer(tok_name: str, spad: SpadFixtures, converted: Path) -> None:
    tokenizer = SpadVTModel.from_pretrained(converted, subfolder="tokenizer").eval()
    with torch.no_grad():
        out = tokenizer(spad.inputs[f"{tok_name}.pixel_values"], spacing=spad.inputs[f"{tok_name}.spacing"])
    spad.assert_close(out.z, f"{tok_name}.z")
    spad.assert_close(out.logits, f"{tok_name}.logits")
    spad.assert_close(out.z_q, f"{tok_name}.z_q")
    spad.assert_close(out.reconstruction, f"{tok_name}.x_rec")


def test_adapted_segmentation_backbone(adapter_name: str, spad: SpadFixtures, converted: Path) -> None:
    """Loading the pre-trained weights into the adapter's config (upstream_config.json's "adapter": fixed
    patches, other channels, another position table) adapts them as upstream does."""
    model = SpadViTForSemanticSegmentation.from_pretrained(
        converted, **spad.adapter_overrides, num_labels=3
    ).eval()
    adapter = spad.adapter_state
    for key, ours in (
        ("patch_embed.proj.weight", model.spad_vit.patch_embed.proj.weight),
        ("pos_embed", model.spad_vit.pos_embed),
    ):
        spad.assert_close(ours, key, expected=adapter[key], file="adapter_state_dict.safetensors")
    # The adapter's own (random upstream) parameters, then the block outputs and features.
    pyramid = {k: v for k, v in adapter.items() if k.startswith(("fpn.", "norms."))}
    missing, unexpected = model.pyramid.load_state_dict(pyramid, strict=False)
    assert not unexpected and not missing
    with torch.no_grad():
        features, backbone = model.extract_features(
            spad.inputs[f"{adapter_name}.pixel_values"], spacing=spad.inputs[f"{adapter_name}.spacing"]
        )
    # The backbone's output (or, from older medfm, its hidden states).
    hidden = getattr(backbone, "hidden_states", backbone)
    for i in range(model.config.num_hidden_layers):
        spad.assert_close(hidden[i + 1], f"{adapter_name}.block_{i}")
    assert len(features) == len(model.config.out_indices)
    for j, feature in enumerate(features):
        spad.assert_close(feature, f"{adapter_name}.feature_{j}")


def test_conversion_keeps_upstream_names(spad: SpadFixtures) -> None:
    converted = convert_vit_state_dict(spad.vit_state)
    assert set(converted) == {k if k.startswith("mim_head.") else f"spad_vit.{k}" for k in spad.vit_state}
