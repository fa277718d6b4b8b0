"""Configs are validated on construction and on ``from_pretrained``: one InvalidConfigError naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfm.errors import InvalidConfigError
from medfm.models.spad import SpadViTConfig, SpadViTModel, SpadVTConfig

from ..common.tiny_models import TINY_VIT

BAD_VIT = [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"intermediate_size": -4}, "intermediate_size"),
    ({"num_attention_heads": "2"}, "num_attention_heads"),
    ({"in_channels": 1.5}, "in_channels"),
    ({"in_channels": True}, "in_channels"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ({"layer_norm_eps": -1e-5}, "layer_norm_eps"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps"),
    ({"rope_base": [-10000.0, 10000.0, 10000.0]}, "rope_base"),
    ({"rope_base": [0, 1, 1]}, "rope_base"),
    ({"num_labels": 3, "id2label": {0: "a", 1: "b"}}, "num_labels"),
    ({"id2label": {0: "a", 5: "b"}}, "id2label"),
    ({"out_indices": [0, 1, 2, 9]}, "out_indices"),
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"patch_size": [4, 16.5, 16]}, "patch_size"),
    ({"mask_ratio": 1.5}, "mask_ratio"),
    ({"qkv_bias": "yes"}, "qkv_bias"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_VIT, ids=[str(c[0]) for c in BAD_VIT])
def test_bad_vit_config_is_refused_on_construction(fields: dict, field: str) -> None:
    with pytest.raises(InvalidConfigError, match=field) as info:
        SpadViTConfig(**{**TINY_VIT, **fields})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("fields", "field"), BAD_VIT[:13], ids=[str(c[0]) for c in BAD_VIT[:13]])
def test_bad_vit_config_is_refused_on_from_pretrained(tmp_path: Path, fields: dict, field: str) -> None:
    SpadViTConfig(**TINY_VIT).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update({k: (v if k != "id2label" else {str(i): n for i, n in v.items()}) for k, v in fields.items()})
    (tmp_path / "config.json").write_text(json.dumps(data, allow_nan=True))
    with pytest.raises(InvalidConfigError, match=field):
        SpadViTConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
        ({"start_stride": 3}, "start_stride"),
        ({"downsample_channels": [16, 0]}, "downsample_channels"),
    ],
)
def test_bad_tokenizer_config_is_refused(fields: dict, field: str) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        SpadVTConfig(**fields)


def test_assignment_after_construction_is_caught_when_the_model_is_built() -> None:
    config = SpadViTConfig(**TINY_VIT)
    config.layer_norm_eps = -1.0
    with pytest.raises(InvalidConfigError, match="layer_norm_eps"):
        SpadViTModel(config)


def test_fewer_layers_than_the_checkpoint_is_refused(tmp_path: Path) -> None:
    SpadViTModel(SpadViTConfig(**TINY_VIT)).save_pretrained(tmp_path)
    depth = TINY_VIT["num_hidden_layers"]
    with pytest.raises(InvalidConfigError):
        SpadViTModel.from_pretrained(tmp_path, num_hidden_layers=depth - 1)


def test_valid_configs_still_build() -> None:
    SpadViTConfig(**TINY_VIT)
    SpadViTConfig(**TINY_VIT, num_labels=2, id2label={0: "a", 1: "b"})
    SpadVTConfig()


def test_more_blocks_in_the_checkpoint_than_the_config_is_refused_unless_asked(tmp_path) -> None:
    """Loading a 2-block checkpoint with num_hidden_layers=1 would silently drop a block."""
    from medfm.errors import InvalidConfigError
    from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling, SpadViTModel

    SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT)).save_pretrained(
        tmp_path
    )  # keys under spad_vit.blocks.N
    with pytest.raises(InvalidConfigError, match="holds 2 blocks but num_hidden_layers=1"):
        SpadViTModel.from_pretrained(tmp_path, num_hidden_layers=1, out_indices=[0, 0, 0, 0])
    model = SpadViTModel.from_pretrained(
        tmp_path, num_hidden_layers=1, out_indices=[0, 0, 0, 0], allow_fewer_layers=True
    )
    assert len(model.blocks) == 1
    assert len(SpadViTModel.from_pretrained(tmp_path).blocks) == 2
