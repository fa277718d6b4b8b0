"""MiM fixtures: the upstream tensors, configs built from upstream_config.json and the tensors' shapes, the
key renaming upstream -> medfm, tolerances, and the tiny configs of the other MiM tests.

Nothing here knows the fixture's sizes: widths, depths, patch sizes, channels, classes and decoder sizes are
read off the state dicts; what shapes cannot tell (heads, mask ratios, sample counts, input sizes, eps) comes from
upstream_config.json under its upstream name. ``MEDFM_FIXTURES`` may point at a held-back set.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from medfm.models.mim import MiMConfig

EXPECTED_FILE = "expected.safetensors"

# --- tiny configs for the other tests (not the fixture's) -----------------------------------------------

#: Non-cubic 32 x 64 x 32 levels (token grid 2 x 4 x 2 = 16 tokens, groups of 2), three heads, two blocks.
TINY_A = dict(
    image_size=[32, 64, 32],
    embed_dims=[4, 8, 12, 24],
    depths=[1, 1, 1, 2],
    num_attention_heads=3,
    mlp_ratios=[2, 3, 2, 2],
    fpn_hidden_size=16,
    decoder_hidden_size=12,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_mlp_ratio=2,
    mask_ratio_up=0.75,
    mask_ratio_mid=0.5,
    mask_ratio_down=0.25,
    num_mid_volumes=2,
    num_down_patches=3,
)
#: Cubic 32^3 levels (8 tokens, groups of 1), stride-2/1/2/2 stages (total 8), two channels, one-block stages.
TINY_B = dict(
    image_size=[16, 16, 16],
    num_channels=2,
    embed_dims=[4, 6, 8, 12],
    depths=[1, 0, 1, 1],
    patch_sizes=[2, 1, 2, 2],
    num_attention_heads=2,
    mlp_ratios=[4, 4, 4, 1.5],
    fpn_hidden_size=8,
    decoder_hidden_size=6,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=3,
    decoder_mlp_ratio=1,
    mask_ratio_up=0.5,
    mask_ratio_mid=0.4,
    mask_ratio_down=0.7,
    num_mid_volumes=3,
    num_down_patches=3,
    layer_scale_init_value=0.5,
)

# --- upstream -> medfm key names (test-local; the converter is written separately) --------------------

_ENCODER = re.compile(r"^(pos_embed$|patch_embed\d\.|blocks\d\.)")
_REL_TABLE = re.compile(r"^(blocks4\.\d+\.attn\.)relative_position_bias_table$")
_REL_INDEX = re.compile(r"(^|\.)relative_position_index$")


def _encoder_key(key: str) -> str:
    return _REL_TABLE.sub(r"\1relative_position_bias.relative_position_bias_table", key)


def rename_pretraining(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream pre-training keys: the encoder's under ``mim.``, the rest unchanged."""
    return {("mim." + k if _ENCODER.match(k) else k): v for k, v in state.items()}


def rename_segmentation(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``backbone.k`` -> ``mim.k``, the UNETR decoder's keys under ``decoder.``; index buffers dropped."""
    out = {}
    for key, value in state.items():
        if _REL_INDEX.search(key):
            continue
        if key.startswith("backbone."):
            out["mim." + _encoder_key(key.removeprefix("backbone."))] = value
        else:
            out["decoder." + key] = value
    return out


def rename_classification(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``head`` -> ``classifier``, ``norm`` stays, the encoder under ``mim.``; index buffers dropped."""
    out = {}
    for key, value in state.items():
        if _REL_INDEX.search(key):
            continue
        if key.startswith("head."):
            out["classifier." + key.removeprefix("head.")] = value
        elif key.startswith("norm."):
            out[key] = value
        else:
            out["mim." + _encoder_key(key)] = value
    return out


# --- configs from upstream arguments and shapes ---------------------------------------------------------


def _eps(norm_layer: str | None, default: float) -> float:
    """The eps of upstream's ``partial(nn.LayerNorm, eps=...)`` string."""
    match = re.search(r"eps\s*=\s*([0-9.eE+-]+)", norm_layer or "")
    return float(match.group(1)) if match else default


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def encoder_shape_fields(encoder: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Fields the encoder's tensors tell: widths, depths, patch sizes, channels, MLP ratios, fpn width."""
    dims = [encoder[f"patch_embed{i}.proj.weight"].shape[0] for i in range(1, 5)]
    fields: dict[str, Any] = {
        "embed_dims": dims,
        "num_channels": encoder["patch_embed1.proj.weight"].shape[1],
        "patch_sizes": [encoder[f"patch_embed{i}.proj.weight"].shape[2] for i in range(1, 5)],
        "depths": [_count(encoder, f"blocks{i}.") for i in range(1, 5)],
    }
    ratios = []
    for stage, width in enumerate(dims, start=1):
        key = f"blocks{stage}.0.mlp.fc1.weight"
        ratios.append(encoder[key].shape[0] / width if key in encoder else 4)
    fields["mlp_ratios"] = [int(r) if float(r).is_integer() else r for r in ratios]
    if "fpn.0.weight" in encoder:
        fields["fpn_hidden_size"] = encoder["fpn.0.weight"].shape[0]
    return fields


def _check_stated(stated: dict[str, Any], fields: dict[str, Any], names: dict[str, str]) -> None:
    """upstream_config.json must agree with what the tensors say."""
    for theirs, ours in names.items():
        if theirs in stated:
            value = stated[theirs]
            value = value[:4] if ours == "embed_dims" else value
            assert list(value) == list(fields[ours]) if isinstance(value, list) else value == fields[ours], (
                f"upstream_config.json {theirs}={stated[theirs]} disagrees with the tensors ({ours}={fields[ours]})"
            )


_SHAPE_NAMES = {
    "embed_dim": "embed_dims",
    "depth": "depths",
    "patch_size": "patch_sizes",
    "in_chans": "num_channels",
}


def _common_fields(arguments: dict[str, Any], encoder: dict[str, torch.Tensor]) -> dict[str, Any]:
    fields = encoder_shape_fields(encoder)
    _check_stated(arguments, fields, _SHAPE_NAMES)
    fields["num_attention_heads"] = arguments["num_heads"]
    fields["qkv_bias"] = bool(arguments.get("qkv_bias", True))
    fields["layer_norm_eps"] = _eps(arguments.get("norm_layer"), 1e-6)
    image = arguments["img_size"]
    fields["image_size"] = list(image[0] if isinstance(image[0], list) else image)
    return fields


def pretraining_config(upstream: dict[str, Any], state: dict[str, torch.Tensor]) -> MiMConfig:
    """MiMConfig of the upstream pre-training model: shapes from ``state``, the rest from its arguments."""
    arguments = upstream["pretraining"]
    args = arguments.get("args", {})
    encoder = {k: v for k, v in state.items() if _ENCODER.match(k)}
    fields = _common_fields(arguments, encoder)
    for name in ("up_roi", "roi_z", "down_roi"):
        if name in args:  # upstream's forward reads the level size from these; they must equal img_size[0]
            assert args[name] in fields["image_size"], (
                f"args.{name}={args[name]} vs img_size {fields['image_size']}"
            )
    loss_name = args.get("attn_loss_name", "byol")
    if loss_name != "byol":
        pytest.fail(
            f"only upstream's 'byol' alignment is reproducible; the fixture used {loss_name!r}", pytrace=False
        )
    fields.update(
        decoder_hidden_size=state["decoder_embed.weight"].shape[0],
        decoder_num_hidden_layers=_count(state, "decoder_blocks."),
        decoder_num_attention_heads=arguments["decoder_num_heads"],
        decoder_mlp_ratio=state["decoder_blocks.0.mlp.fc1.weight"].shape[0]
        / state["decoder_embed.weight"].shape[0],
        norm_pix_loss=bool(arguments.get("norm_pix_loss", False)),
        mask_ratio_up=args["mask_ratio_up"],
        mask_ratio_mid=args["mask_ratio_mid"],
        mask_ratio_down=args["mask_ratio_down"],
        num_mid_volumes=args["sample_usual"],
        num_down_patches=args["sample_down"],
        alignment="released",
        loss_weights=list(arguments.get("loss_weights", [1, 1, 1, 0.1, 0.1])),
    )
    if int(args.get("sr_ratio", 1)) != 1 or args.get("not_use_attn", False):
        pytest.fail(
            "sr_ratio != 1 or not_use_attn is not an upstream variant medfm implements", pytrace=False
        )
    return MiMConfig(**fields)


def segmentation_config(upstream: dict[str, Any], state: dict[str, torch.Tensor]) -> MiMConfig:
    """MiMConfig of the upstream ConvViT3dUNETR."""
    arguments = upstream["segmentation"]
    backbone = arguments["backbone"]
    encoder = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    fields = _common_fields(backbone, encoder)
    fields["image_size"] = list(arguments.get("img_size", fields["image_size"]))
    fields.update(
        use_absolute_position_embeddings="pos_embed" in encoder,
        use_relative_position_bias=any(k.endswith("relative_position_bias_table") for k in encoder),
        layer_scale_init_value=backbone.get("init_values", 1.0) if "blocks4.0.gamma_1" in encoder else None,
        drop_path_rate=float(backbone.get("drop_path_rate", 0.0)),
        num_labels=state["out.conv.conv.weight"].shape[0],
        segmentation_feature_size=state["encoder1.layer.conv1.conv.weight"].shape[0],
        normalize_features=bool(arguments.get("normalize", True)),
    )
    assert state["encoder1.layer.conv1.conv.weight"].shape[1] == fields["num_channels"]
    return MiMConfig(**fields)


def classification_config(upstream: dict[str, Any], state: dict[str, torch.Tensor]) -> MiMConfig:
    """MiMConfig of the upstream classification ConvViT3d (mean pooling, norm, head)."""
    arguments = upstream["classification"]
    if not arguments.get("global_pool", True):
        pytest.fail("only global_pool=True (mean of the tokens) is upstream's classifier", pytrace=False)
    encoder = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
    fields = _common_fields(arguments, encoder)
    fields.update(
        use_absolute_position_embeddings="pos_embed" in encoder,
        use_relative_position_bias=any(k.endswith("relative_position_bias_table") for k in encoder),
        layer_scale_init_value=arguments.get("init_values", 1.0) if "blocks4.0.gamma_1" in encoder else None,
        drop_path_rate=float(arguments.get("drop_path_rate", 0.0)),
        num_labels=state["head.weight"].shape[0],
    )
    return MiMConfig(**fields)


# --- the fixture folder ---------------------------------------------------------------------------------


class MiMFixtures:
    """One MiM fixture folder: tensors, ``upstream_config.json``, configs and tolerances."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.upstream: dict[str, Any] = json.loads((folder / "upstream_config.json").read_text())
        self.pretraining_state = load_file(str(folder / "upstream_state_dict.safetensors"))
        self.segmentation_state = load_file(str(folder / "upstream_seg_state_dict.safetensors"))
        self.classification_state = load_file(str(folder / "upstream_cls_state_dict.safetensors"))
        self.inputs = load_file(str(folder / "inputs.safetensors"))
        self.expected = load_file(str(folder / EXPECTED_FILE))

    @cached_property
    def pretraining_config(self) -> MiMConfig:
        return pretraining_config(self.upstream, self.pretraining_state)

    @cached_property
    def segmentation_config(self) -> MiMConfig:
        return segmentation_config(self.upstream, self.segmentation_state)

    @cached_property
    def classification_config(self) -> MiMConfig:
        return classification_config(self.upstream, self.classification_state)

    def tolerance(self, key: str) -> dict[str, float] | None:
        """``assert_close`` tolerances of ``key`` from upstream_config.json (``None``: do not compare)."""
        table = self.upstream.get("tolerances", {})
        entry = table.get(key, table.get("default"))
        if entry is None:
            pytest.fail(f"{self.folder / 'upstream_config.json'} has no tolerances.default", pytrace=False)
        if entry.get("compare", True) is False:
            return None
        return {"atol": float(entry.get("atol", 0.0)), "rtol": float(entry.get("rtol", 0.0))}

    def assert_close(self, actual: torch.Tensor, key: str, diffs: dict[str, float] | None = None) -> None:
        """Compare with ``expected[key]`` at its tolerance (exact for integer tensors and zero tolerances)."""
        expected = self.expected[key]
        tolerance = self.tolerance(key)
        actual = actual.detach().to(expected.dtype).reshape(expected.shape)
        if diffs is not None and expected.is_floating_point():
            diffs[key] = float((actual.double() - expected.double()).abs().max())
        if tolerance is None:
            return
        if not expected.is_floating_point() or (tolerance["atol"] == 0 and tolerance["rtol"] == 0):
            assert torch.equal(actual, expected), f"{key}: differs ({(actual != expected).sum()} elements)"
        else:
            torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="session")
def mim_fixtures(upstream_fixtures) -> MiMFixtures:
    return MiMFixtures(upstream_fixtures("mim"))


@pytest.fixture(scope="session")
def register_mim_auto_classes():
    """Map ``model_type="mim"`` to the MiM classes in transformers' Auto classes (idempotent; what the family
    record does once it is registered)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForPreTraining,
        AutoModelForSemanticSegmentation,
    )

    from medfm.models.mim import (
        MiMForImageClassification,
        MiMForPreTraining,
        MiMForSemanticSegmentation,
        MiMModel,
    )

    AutoConfig.register("mim", MiMConfig, exist_ok=True)
    for auto, model in (
        (AutoModel, MiMModel),
        (AutoModelForPreTraining, MiMForPreTraining),
        (AutoModelForImageClassification, MiMForImageClassification),
        (AutoModelForSemanticSegmentation, MiMForSemanticSegmentation),
    ):
        auto.register(MiMConfig, model, exist_ok=True)
