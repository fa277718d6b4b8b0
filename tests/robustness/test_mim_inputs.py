"""Bad inputs to the MiM entry points, as a new user would give them: ``medfm convert mim`` and
``convert_mim_checkpoint``, ``MiMConfig`` and ``from_pretrained`` overrides, the models' forwards,
``examples/pretrain_mim.py --model mim``, and ``medfm segment`` / ``medfm classify`` with MiM folders.

Each case asserts the typed error (a :class:`~medfm.errors.MedfmError` subclass) and a fragment of its message naming
the input or field; converter cases also assert that nothing was written (no output, no temporary folder) and the
input is unchanged, CLI cases that the error is one stderr line without a traceback. Bad files are made at test time
from the MiM fixture's small upstream state dicts and from tiny models.
"""

from __future__ import annotations

import hashlib
import json
import runpy
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import medfm  # noqa: F401  (registers the families)
from medfm.cli import main
from medfm.errors import (
    CheckpointMismatchError,
    CorruptFileError,
    InvalidConfigError,
    MedfmError,
    NonFiniteWeightsError,
    OutputPathError,
    OverwriteInputError,
    PretrainingOptionError,
    UnsupportedFormatError,
    VolumeNotFoundError,
    VolumeShapeError,
    WrongTaskError,
)
from medfm.layers.position import sincos_position_table
from medfm.models.mim import (
    MiMConfig,
    MiMForImageClassification,
    MiMForPreTraining,
    MiMForSemanticSegmentation,
    MiMModel,
    MiMNoise,
)
from medfm.models.mim.convert_mim import convert_mim_checkpoint
from medfm.processing import MedicalImageProcessor

from ..common.tiny_models import TINY_VIT
from ..conftest import NIBABEL_DATA, family_fixtures
from ..examples import EXAMPLES, load_example

#: A tiny MiM: 32^3 levels (a 2^3 token grid), one block per stage, a 12-wide one-block decoder.
TINY = dict(
    image_size=[32, 32, 32],
    embed_dims=[4, 8, 16, 24],
    depths=[1, 1, 1, 1],
    num_attention_heads=2,
    fpn_hidden_size=8,
    decoder_hidden_size=12,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    num_mid_volumes=2,
    num_down_patches=2,
)
#: The segmentation network needs a window whose fpn map has two voxels: 64 x 32 x 32.
SEG_SIZE = [64, 32, 32]

# --- helpers -------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its bytes (folders: ``dir``): what a refused call may not change."""
    return {
        str(p.relative_to(folder)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
    }


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _write_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:  # upstream's checkpoint-final.pth layout
        torch.save({"model": state, "epoch": 1}, path)
    return path


def _upstream_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A medfm MiM model's tensors under upstream names (the encoder at the top level, ``head`` for the classifier)."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("mim.").replace("classifier.", "head.")
        state[
            key.replace("relative_position_bias.relative_position_bias_table", "relative_position_bias_table")
        ] = value.clone()
    return state


@pytest.fixture(scope="module")
def fixture_states() -> dict[str, dict[str, torch.Tensor]]:
    folder = family_fixtures("mim")
    return {
        "pretraining": load_file(str(folder / "upstream_state_dict.safetensors")),
        "segmentation": load_file(str(folder / "upstream_seg_state_dict.safetensors")),
    }


@pytest.fixture(scope="module")
def heads() -> dict[str, dict[str, int]]:
    """What shapes cannot tell: the fixture models' heads (``--config``), from upstream_config.json."""
    upstream = json.loads((family_fixtures("mim") / "upstream_config.json").read_text())
    return {
        "pretraining": {
            "num_attention_heads": upstream["pretraining"]["num_heads"],
            "decoder_num_attention_heads": upstream["pretraining"]["decoder_num_heads"],
        },
        "segmentation": {"num_attention_heads": upstream["segmentation"]["backbone"]["num_heads"]},
    }


def _spad_state() -> dict[str, torch.Tensor]:
    from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling

    model = SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT))
    return {k.removeprefix("spad_vit."): v.clone() for k, v in model.state_dict().items()}


def _ambiguous_classifier_state() -> dict[str, torch.Tensor]:
    """A classifier on a 1 x 2 x 1 grid without relative bias: 2 tokens fit three grids."""
    config = MiMConfig(**{**TINY, "image_size": [16, 32, 16]}, use_relative_position_bias=False)
    return _upstream_names(MiMForImageClassification(config))


def _sized(state: dict[str, torch.Tensor], key: str, extra: int = 1) -> dict[str, torch.Tensor]:
    shape = list(state[key].shape)
    shape[-1] += extra
    return {**state, key: torch.zeros(shape)}


def _poisoned(state: dict[str, torch.Tensor], key: str, value: float) -> dict[str, torch.Tensor]:
    tensor = state[key].clone()
    tensor.view(-1)[0] = value
    return {**state, key: tensor}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tokens(state: dict[str, torch.Tensor]) -> int:
    return int(state["pos_embed"].shape[1])


def _half_levels(heads: dict, state: dict[str, torch.Tensor]) -> dict:
    """--config image_size of half the (cubic) fixture levels: another token count."""
    return {**heads, "image_size": [round(_tokens(state) ** (1 / 3)) * 8] * 3}


def _flat_grid(heads: dict, state: dict[str, torch.Tensor]) -> dict:
    """--config image_size of as many tokens on a 1-token-thin grid, which the sin-cos pos_embed contradicts."""
    return {**heads, "image_size": [16 * _tokens(state), 16, 16]}


def _a_file(tmp: Path, checkpoint: Path) -> Path:
    (tmp / "notes.txt").write_text("keep me")
    return tmp / "notes.txt"


def _a_foreign_folder(tmp: Path, checkpoint: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    return tmp / "mine"


# --- the converter ---------------------------------------------------------------------------------------

# (id, kind, make the state, change the file, suffix, --config (from the fixture's heads and the state), output path
# (from tmp_path and the checkpoint), error, fragment)
CONVERTER_CASES = [
    (
        "truncated safetensors",
        "pretraining",
        None,
        _truncate,
        ".safetensors",
        None,
        None,
        CorruptFileError,
        "truncated",
    ),
    (
        "safetensors with a garbled header",
        "pretraining",
        None,
        lambda p: p.write_bytes(b"\xff" * 16 + p.read_bytes()[16:]),
        ".safetensors",
        None,
        None,
        CorruptFileError,
        "not safetensors",
    ),
    ("truncated .pth", "pretraining", None, _truncate, ".pth", None, None, CorruptFileError, "cannot read"),
    (
        "a text file named .pth",
        "pretraining",
        None,
        lambda p: p.write_bytes(b"not a checkpoint"),
        ".pth",
        None,
        None,
        CorruptFileError,
        "cannot read",
    ),
    (
        "an empty .pth",
        "pretraining",
        None,
        lambda p: p.write_bytes(b""),
        ".pth",
        None,
        None,
        CorruptFileError,
        "EOF",
    ),
    (
        "a SPAD checkpoint given to mim",
        "pretraining",
        lambda s: _spad_state(),
        None,
        ".safetensors",
        None,
        None,
        UnsupportedFormatError,
        "not a MiM checkpoint",
    ),
    (
        "missing transformer tensor",
        "pretraining",
        lambda s: {k: v for k, v in s.items() if k != "blocks4.0.attn.proj.weight"},
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "missing: ['mim.blocks4.0.attn.proj.weight']",
    ),
    (
        "missing decoder_pred",
        "pretraining",
        lambda s: {k: v for k, v in s.items() if not k.startswith("decoder_pred.")},
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "decoder_pred.weight",
    ),
    (
        "missing pos_embed",
        "pretraining",
        lambda s: {k: v for k, v in s.items() if k != "pos_embed"},
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "lacks ['pos_embed']",
    ),
    (
        "segmentation without its output conv",
        "segmentation",
        lambda s: {k: v for k, v in s.items() if not k.startswith("out.")},
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "out.conv.conv.weight",
    ),
    (
        "an unexpected tensor",
        "pretraining",
        lambda s: {**s, "head.weight": torch.zeros(2, 3)},
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "unexpected: ['head.weight']",
    ),
    (
        "a tensor of the wrong shape",
        "pretraining",
        lambda s: _sized(s, "blocks4.0.attn.proj.weight"),
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "wrong shapes: ['mim.blocks4.0.attn.proj.weight",
    ),
    (
        "pos_embed of the wrong width",
        "pretraining",
        lambda s: _sized(s, "pos_embed"),
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "pos_embed has shape",
    ),
    (
        "a non-cubic patch kernel",
        "pretraining",
        lambda s: _sized(s, "patch_embed1.proj.weight"),
        None,
        ".safetensors",
        None,
        None,
        CheckpointMismatchError,
        "cubic 3D patch kernel",
    ),
    (
        "NaN weight",
        "pretraining",
        lambda s: _poisoned(s, "blocks4.0.mlp.fc2.weight", float("nan")),
        None,
        ".safetensors",
        None,
        None,
        NonFiniteWeightsError,
        "blocks4.0.mlp.fc2.weight",
    ),
    (
        "Inf weight in a .pth",
        "pretraining",
        lambda s: _poisoned(s, "decoder_pred.bias", float("-inf")),
        None,
        ".pth",
        None,
        None,
        NonFiniteWeightsError,
        "decoder_pred.bias",
    ),
    (
        "--config a list",
        "pretraining",
        None,
        None,
        ".safetensors",
        lambda h, s: [1, 2],
        None,
        InvalidConfigError,
        "JSON object",
    ),
    (
        "--config an unknown field",
        "pretraining",
        None,
        None,
        ".safetensors",
        lambda h, s: {**h, "mask_ratio": 0.5},
        None,
        InvalidConfigError,
        "['mask_ratio'] is not a field of MiMConfig",
    ),
    (
        "--config a string for an int",
        "pretraining",
        None,
        None,
        ".safetensors",
        lambda h, s: {**h, "num_attention_heads": str(h["num_attention_heads"])},
        None,
        InvalidConfigError,
        "num_attention_heads must be an integer",
    ),
    (
        "--config heads not dividing the width",
        "pretraining",
        None,
        None,
        ".safetensors",
        lambda h, s: {**h, "num_attention_heads": 5},
        None,
        InvalidConfigError,
        "num_attention_heads 5 does not divide embed_dims[3]",
    ),
    (
        "--config decoder heads not dividing the decoder width",
        "pretraining",
        None,
        None,
        ".safetensors",
        lambda h, s: {**h, "decoder_num_attention_heads": 5},
        None,
        InvalidConfigError,
        "decoder_num_attention_heads 5 does not divide decoder_hidden_size",
    ),
    (
        "no --config: the upstream default decoder heads do not divide",
        "pretraining",
        None,
        None,
        ".safetensors",
        lambda h, s: {"num_attention_heads": h["num_attention_heads"]},
        None,
        InvalidConfigError,
        "give the number of heads in --config",
    ),
    (
        "--config image_size of another token count",
        "pretraining",
        None,
        None,
        ".safetensors",
        _half_levels,
        None,
        InvalidConfigError,
        "the checkpoint was made for another image_size",
    ),
    (
        "--config image_size of as many tokens, another grid (the sin-cos table tells)",
        "pretraining",
        None,
        None,
        ".safetensors",
        _flat_grid,
        None,
        InvalidConfigError,
        "pos_embed is the sin-cos table of the grid",
    ),
    (
        "--config mask_ratio_up 1.0",
        "pretraining",
        None,
        None,
        ".safetensors",
        lambda h, s: {**h, "mask_ratio_up": 1.0},
        None,
        InvalidConfigError,
        "mask_ratio_up must be a finite number in [0, 1)",
    ),
    (
        "--config segmentation_feature_size the decoder cannot take",
        "segmentation",
        None,
        None,
        ".safetensors",
        lambda h, s: {**h, "segmentation_feature_size": 1000},
        None,
        InvalidConfigError,
        "invalid MiMConfig for segmentation (segmentation_feature_size 1000",
    ),
    (
        "a non-cubic fine-tuned grid without image_size",
        "classification",
        lambda s: _ambiguous_classifier_state(),
        None,
        ".safetensors",
        lambda h, s: {"num_attention_heads": 2},
        None,
        InvalidConfigError,
        "is ambiguous",
    ),
    (
        "output path is a file",
        "pretraining",
        None,
        None,
        ".safetensors",
        None,
        _a_file,
        OutputPathError,
        "exists and is a file",
    ),
    (
        "output path is the checkpoint itself",
        "pretraining",
        None,
        None,
        ".safetensors",
        None,
        lambda tmp, ck: ck,
        OutputPathError,
        "exists and is a file",
    ),
    (
        "output folder holds the checkpoint",
        "pretraining",
        None,
        None,
        ".safetensors",
        None,
        lambda tmp, ck: ck.parent,
        OverwriteInputError,
        "refusing to write over the input",
    ),
    (
        "output folder is not empty and no conversion",
        "pretraining",
        None,
        None,
        ".safetensors",
        None,
        _a_foreign_folder,
        OutputPathError,
        "not empty",
    ),
    (
        "no such checkpoint",
        "pretraining",
        None,
        lambda p: p.unlink(),
        ".safetensors",
        None,
        None,
        VolumeNotFoundError,
        "no such checkpoint file",
    ),
    (
        "an unknown checkpoint suffix",
        "pretraining",
        None,
        None,
        ".npz",
        None,
        None,
        UnsupportedFormatError,
        "expected a .ckpt, .pth",
    ),
]


@pytest.mark.parametrize(
    ("kind", "make", "corrupt", "suffix", "config", "output", "error", "fragment"),
    [c[1:] for c in CONVERTER_CASES],
    ids=[c[0] for c in CONVERTER_CASES],
)
def test_converter_refuses(
    fixture_states, heads, tmp_path: Path, kind, make, corrupt, suffix, config, output, error, fragment
) -> None:
    state = dict(fixture_states.get(kind, {}))
    if make is not None:
        state = make(state)
    given = heads.get(kind, {})
    overrides = config(given, state) if config is not None else given
    inputs = tmp_path / "in"
    inputs.mkdir()
    checkpoint = inputs / f"upstream{suffix}"
    if suffix == ".npz":
        checkpoint.write_bytes(b"PK not a checkpoint")
    else:
        _write_state(checkpoint, state)
    if corrupt is not None:
        corrupt(checkpoint)
    out = output(tmp_path, checkpoint) if output is not None else tmp_path / "out"
    before = _snapshot(tmp_path)
    with pytest.raises(error) as info:
        convert_mim_checkpoint(checkpoint, out, config_overrides=overrides)
    assert isinstance(info.value, MedfmError)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert _snapshot(tmp_path) == before  # no output, no temporary folder, the inputs unchanged


def test_converter_reads_a_non_cubic_pretraining_grid_off_its_sincos_table(tmp_path: Path) -> None:
    """A medfm pre-training run on 32 x 64 x 32 levels (2 x 4 x 2 tokens, no cube): the fixed sin-cos pos_embed
    tells the grid, so image_size is not needed; before, the converter asked for it."""
    model = MiMForPreTraining(MiMConfig(**{**TINY, "image_size": [32, 64, 32]}))
    checkpoint = _write_state(tmp_path / "up.safetensors", _upstream_names(model))
    out = convert_mim_checkpoint(
        checkpoint,
        tmp_path / "out",
        config_overrides={"num_attention_heads": 2, "decoder_num_attention_heads": 2},
    )
    assert json.loads((out / "config.json").read_text())["image_size"] == [32, 64, 32]


CLI_CASES = [
    ("truncated", '{"num_attention_heads": 2}', "truncated"),
    ("nan", '{"num_attention_heads": 2}', "NaN or Inf weights in blocks4.0.mlp.fc2.weight"),
    ("spad", '{"num_attention_heads": 2}', "not a MiM checkpoint"),
    ("ok", '{"num_attention_heads": 2, "decoder_num_attention_heads": 5}', "decoder_num_attention_heads 5"),
    ("ok", "[1]", "JSON object"),
    ("ok", '{"num_attention_heads": 2', "not valid JSON"),
    (
        "ok",
        '{"num_attention_heads": 2, "decoder_num_attention_heads": 2, "bogus": 1}',
        "['bogus'] is not a field",
    ),
    ("ok", "missing-config.json", "missing-config.json"),
]


@pytest.mark.parametrize(("make", "config", "phrase"), CLI_CASES, ids=[f"{c[0]} {c[1]}" for c in CLI_CASES])
def test_convert_cli_reports_one_line(tmp_path: Path, capsys, make: str, config: str, phrase: str) -> None:
    """``medfm convert mim``: exit status 2, one line naming the input, no traceback, nothing written."""
    model = MiMForPreTraining(MiMConfig(**TINY))
    state = _spad_state() if make == "spad" else _upstream_names(model)
    if make == "nan":
        state = _poisoned(state, "blocks4.0.mlp.fc2.weight", float("nan"))
    checkpoint = _write_state(tmp_path / "up.safetensors", state)
    if make == "truncated":
        _truncate(checkpoint)
    before = _snapshot(tmp_path)
    argv = [
        "convert",
        "mim",
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "out"),
        "--config",
        config,
    ]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert phrase in err and err.startswith("medfm convert: error:"), err
    assert _snapshot(tmp_path) == before


# --- MiMConfig and from_pretrained ------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1"),
    ({"num_attention_heads": -2}, "num_attention_heads must be an integer >= 1"),
    ({"num_attention_heads": "2"}, "num_attention_heads must be an integer >= 1; got '2'"),
    ({"decoder_num_attention_heads": 0}, "decoder_num_attention_heads"),
    ({"embed_dims": [4, 8, 16]}, "embed_dims must be a list of 4 integers"),
    ({"depths": [1, 1, 1, 1, 1]}, "depths must be a list of 4 integers"),
    ({"mlp_ratios": [4, 4, 4]}, "mlp_ratios must be a list of 4 numbers"),
    ({"image_size": [32, 32]}, "image_size must be a list of 3 integers"),
    ({"num_channels": 1.5}, "num_channels must be an integer >= 1; got 1.5"),
    ({"embed_dims": [4, 8.5, 16, 24]}, "embed_dims must be a list of 4 integers"),
    ({"mask_ratio_up": 1.0}, "mask_ratio_up must be a finite number in [0, 1)"),
    ({"mask_ratio_mid": -0.1}, "mask_ratio_mid"),
    ({"mask_ratio_down": float("nan")}, "mask_ratio_down"),
    ({"num_mid_volumes": 0}, "num_mid_volumes must be an integer >= 1"),
    ({"num_down_patches": 0}, "num_down_patches must be an integer >= 1"),
    ({"alignment": "Paper"}, "alignment must be one of ('released', 'paper')"),
    ({"loss_weight_mode": "c2f"}, "loss_weight_mode must be one of"),
    ({"loss_weights": [1, 1, 1, 0.1]}, "loss_weights must be 5 finite numbers"),
    ({"loss_weights": [1, 1, float("nan"), 0.1, 0.1]}, "loss_weights must be 5 finite numbers"),
    ({"loss_weights": [1, -1, 1, 0.1, 0.1]}, "loss_weights must be 5 finite numbers"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps must be a finite number in (0, inf)"),
    ({"layer_norm_eps": -1e-6}, "layer_norm_eps"),
    ({"conv_layer_norm_eps": 0}, "conv_layer_norm_eps"),
    ({"image_size": [40, 32, 32]}, "must be a multiple of the total patch stride"),
    ({"image_size": 24}, "must be a multiple of the total patch stride"),
    ({"num_attention_heads": 5}, "num_attention_heads 5 does not divide embed_dims[3] = 24"),
    ({"embed_dims": [4, 8, 16, 20]}, "must be divisible by 6 for the 3D sin-cos position table"),
    ({"drop_path_rate": 1.0}, "drop_path_rate"),
    ({"hidden_act": "bogus"}, "hidden_act 'bogus'"),
    ({"qkv_bias": "yes"}, "qkv_bias must be true or false"),
    ({"depths": [1, 1, 1, 0]}, "depths[3] (transformer blocks) must be >= 1"),
    # Fixed in configuration_mim.py: these built a model before.
    ({"mlp_ratios": [0.01, 4, 4, 4]}, "mlp_ratios[0] = 0.01 gives stage 1 (width 4) an MLP of"),
    ({"num_labels": 0}, "num_labels must be an integer >= 1; got 0"),
    ({"num_labels": 3, "id2label": {0: "a", 1: "b"}}, "num_labels=3 disagrees with id2label"),
    ({"id2label": {0: "a", 5: "b"}}, "id2label keys must be the class ids 0 .. 1"),
]


@pytest.mark.parametrize(("fields", "fragment"), BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_config_is_refused_on_construction(fields: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        MiMConfig(**{**TINY, **fields})
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


BAD_PRETRAINING = [
    ({"num_mid_volumes": 9}, "num_mid_volumes must be at most 8"),
    ({"num_down_patches": 9}, "num_down_patches must be at most the 8 patches"),
    ({"image_size": [48, 48, 48]}, "must hold a multiple of 8 tokens"),
    ({"image_size": [16, 16, 16]}, "must hold a multiple of 8 tokens"),
    ({"mask_ratio_mid": 0.95}, "mask_ratio_mid 0.95 leaves no visible token"),
    ({"decoder_hidden_size": 14}, "decoder_hidden_size = 14 must be divisible by 6"),
    (
        {"decoder_hidden_size": 18, "decoder_num_attention_heads": 4},
        "decoder_num_attention_heads 4 does not divide",
    ),
    ({"num_mid_volumes": 3, "num_down_patches": 2}, "num_mid_volumes (3) <= num_down_patches (2)"),
    ({"decoder_mlp_ratio": 0.01}, "decoder_mlp_ratio 0.01 gives the decoder"),  # fixed: built a 0-wide MLP
]


@pytest.mark.parametrize(("fields", "fragment"), BAD_PRETRAINING, ids=[str(c[0]) for c in BAD_PRETRAINING])
def test_bad_pretraining_config_is_refused_when_built(fields: dict, fragment: str) -> None:
    config = MiMConfig(**{**TINY, **fields})  # a valid encoder config ...
    with pytest.raises(InvalidConfigError) as info:  # ... that pre-training refuses
        MiMForPreTraining(config)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("image_size", "fragment"),
    [
        ([32, 32, 32], "leaves the segmentation network's fpn map a single voxel"),
        ([48, 32, 32], "multiple of 32"),
    ],
)
def test_segmentation_window_the_network_cannot_run_is_refused(image_size, fragment: str) -> None:
    """Fixed in configuration_mim.py: the pipelines run a segmenter on windows of image_size, so an image_size
    whose fpn map is one voxel (or not a multiple of 32) built a model no window could run."""
    with pytest.raises(InvalidConfigError, match=fragment):
        MiMForSemanticSegmentation(MiMConfig(**{**TINY, "image_size": image_size}, num_labels=2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Tiny MiM folders: pre-training (32^3 levels), segmentation, classifier, encoder, each with a processor."""
    root = tmp_path_factory.mktemp("mim-models")
    torch.manual_seed(0)
    processor = MedicalImageProcessor(steps=[{"name": "minmax"}])
    for name, cls, extra in [
        ("pre", MiMForPreTraining, {}),
        ("pre-seg-size", MiMForPreTraining, {"image_size": SEG_SIZE}),
        ("seg", MiMForSemanticSegmentation, {"image_size": SEG_SIZE, "num_labels": 2}),
        ("cls", MiMForImageClassification, {"num_labels": 2}),
        ("enc", MiMModel, {}),
    ]:
        cls(MiMConfig(**{**TINY, **extra})).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root


OVERRIDES = [
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1"),
    ({"num_attention_heads": 5}, "num_attention_heads 5 does not divide"),
    ({"embed_dims": [4, 8, 16]}, "embed_dims must be a list of 4 integers"),
    ({"mask_ratio_up": 1.0}, "mask_ratio_up"),
    ({"num_mid_volumes": 0}, "num_mid_volumes"),
    ({"num_mid_volumes": 9}, "num_mid_volumes must be at most 8"),
    ({"num_down_patches": 100}, "num_down_patches must be at most"),
    ({"alignment": "bogus"}, "alignment must be one of"),
    ({"loss_weight_mode": "x"}, "loss_weight_mode must be one of"),
    ({"loss_weights": [1, 1]}, "loss_weights must be 5 finite numbers"),
    ({"loss_weights": [1, 1, float("nan"), 1, 1]}, "loss_weights must be 5 finite numbers"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ({"image_size": [40, 32, 32]}, "must be a multiple of the total patch stride"),
    ({"decoder_hidden_size": 14}, "decoder_hidden_size = 14 must be divisible by 6"),
    ({"num_channels": 1.5}, "num_channels must be an integer >= 1"),
    ({"num_labels": 0}, "num_labels must be an integer >= 1"),  # fixed: accepted before
]


@pytest.mark.parametrize(("fields", "fragment"), OVERRIDES, ids=[str(c[0]) for c in OVERRIDES])
def test_bad_from_pretrained_overrides_are_refused(saved: Path, fields: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        MiMForPreTraining.from_pretrained(saved / "pre", **fields)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1"),
        ({"loss_weights": [1, 1]}, "loss_weights must be 5 finite numbers"),
        ({"image_size": [40, 32, 32]}, "must be a multiple of the total patch stride"),
        ({"id2label": {"0": "a", "5": "b"}}, "id2label keys must be the class ids"),  # fixed: accepted before
    ],
    ids=["heads 0", "loss_weights", "image_size 40", "id2label keys"],
)
def test_bad_saved_config_is_refused_by_config_from_pretrained(
    saved: Path, tmp_path: Path, fields, fragment
) -> None:
    """An edited config.json, and (fixed) ``MiMConfig.from_pretrained(folder, **overrides)``, which only the
    model classes checked before."""
    data = json.loads((saved / "pre" / "config.json").read_text())
    data.update(fields)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(InvalidConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        MiMConfig.from_pretrained(tmp_path)
    with pytest.raises(InvalidConfigError, match="num_attention_heads must be an integer >= 1"):
        MiMConfig.from_pretrained(saved / "pre", num_attention_heads=0)


def test_a_new_label_count_from_pretrained_is_a_new_head(saved: Path) -> None:
    """``num_labels`` other than the saved id2label's re-heads (the classes get new names), as transformers does;
    given together with an id2label of another length it is refused."""
    config = MiMConfig.from_pretrained(saved / "seg", num_labels=5)
    assert config.num_labels == 5 and sorted(config.id2label) == list(range(5))
    with pytest.raises(InvalidConfigError, match="num_labels=5 disagrees with id2label"):
        MiMConfig.from_pretrained(saved / "seg", num_labels=5, id2label={0: "a"})


def test_override_that_changes_tensor_shapes_is_a_typed_error(saved: Path) -> None:
    with pytest.raises(MedfmError, match="decoder_pred"):
        MiMForPreTraining.from_pretrained(saved / "pre", num_channels=2)


def test_pretraining_folder_loads_on_other_levels_with_exact_decoder_table(saved: Path) -> None:
    """Fixed in convert_mim.py: ``image_size`` other than the folder's raised transformers' RuntimeError (the
    decoder's sin-cos table had the old grid); it is now rebuilt for the new grid (the encoder's is resized)."""
    model = MiMForPreTraining.from_pretrained(saved / "pre", image_size=[64, 64, 64])
    expected = sincos_position_table([4, 4, 4], TINY["decoder_hidden_size"]).unsqueeze(0)
    assert torch.allclose(model.decoder_pos_embed, expected, atol=1e-6)
    assert not model.decoder_pos_embed.requires_grad


# --- the models ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    config = MiMConfig(**TINY, num_labels=2)
    return {
        "encoder": MiMModel(config).eval(),
        "classifier": MiMForImageClassification(config).eval(),
        "segmenter": MiMForSemanticSegmentation(
            MiMConfig(**{**TINY, "image_size": SEG_SIZE}, num_labels=2)
        ).eval(),
        "pretraining": MiMForPreTraining(config).eval(),
    }


INPUTS = [
    ("encoder", (1, 2, 32, 32, 32), "pixel_values has 2 channels; MiMModel takes num_channels=1"),
    ("classifier", (1, 3, 32, 32, 32), "pixel_values has 3 channels"),
    ("segmenter", (1, 2, 64, 32, 32), "pixel_values has 2 channels"),
    ("encoder", (1, 1, 32, 32), "must be a (B, C, D1, D2, D3) tensor"),
    ("segmenter", (1, 64, 32, 32), "must be a (B, C, D1, D2, D3) tensor"),
    ("encoder", (1, 1, 40, 32, 32), "must be a multiple of (32, 32, 32)"),
    ("classifier", (1, 1, 24, 32, 32), "must be a multiple of (16, 16, 16)"),
    ("segmenter", (1, 1, 48, 32, 32), "must be a multiple of (32, 32, 32)"),
    ("segmenter", (1, 1, 16, 16, 16), "must be a multiple of (32, 32, 32)"),
    ("segmenter", (1, 1, 32, 32, 32), "leaves the fpn map a single voxel"),
    ("encoder", (1, 1, 0, 32, 32), "below the minimum"),
    ("pretraining", (1, 1, 32, 32, 32), "takes crops of 2 * image_size = (64, 64, 64)"),
    ("pretraining", (1, 1, 96, 96, 96), "takes crops of 2 * image_size"),
    ("pretraining", (1, 1, 64, 64, 32), "takes crops of 2 * image_size"),
    ("pretraining", (1, 2, 64, 64, 64), "pixel_values has 2 channels"),
    ("pretraining", (1, 1, 64, 64), "must be a (B, C, D1, D2, D3) tensor"),
    ("encoder", "numpy", "must be a (B, C, D1, D2, D3) tensor"),
]


@pytest.mark.parametrize(("name", "shape", "fragment"), INPUTS, ids=[f"{c[0]} {c[1]}" for c in INPUTS])
def test_unusable_input_is_a_volume_shape_error(models, name: str, shape, fragment: str) -> None:
    pixel_values = np.zeros((1, 1, 32, 32, 32), np.float32) if shape == "numpy" else torch.rand(shape)
    with pytest.raises(VolumeShapeError) as info, torch.no_grad():
        models[name](pixel_values)
    assert fragment in str(info.value), str(info.value)


def test_nan_input_gives_nan_not_a_finite_wrong_answer(models) -> None:
    """The forwards do not check for NaN (as every family: the processors refuse NaN volumes, see
    test_nan_volume_to_medfm_segment); what comes out is NaN, never a finite number."""
    with torch.no_grad():
        loss = models["pretraining"](torch.full((1, 1, 64, 64, 64), float("nan"))).loss
        logits = models["classifier"](torch.full((1, 1, 32, 32, 32), float("nan"))).logits
    assert torch.isnan(loss) and torch.isnan(logits).all()


def _noise(config: MiMConfig, **changes) -> dict:
    return {**{k: torch.rand(v) for k, v in MiMNoise.shapes(1, config).items()}, **changes}


NOISE = [
    (
        "wrong shape",
        lambda c: _noise(c, mid=torch.rand(3, c.num_tokens)),
        ValueError,
        "noise 'mid' must have shape",
    ),
    (
        "unknown key",
        lambda c: _noise(c, middle=torch.rand(2, 8)),
        ValueError,
        r"unknown noise keys \['middle'\]",
    ),
    ("a tensor, not a mapping", lambda c: torch.rand(1, 8), ValueError, "noise must be a MiMNoise"),
    (
        "a numpy array",
        lambda c: _noise(c, mid=np.random.rand(2, c.num_tokens)),
        AttributeError,
        "noise 'mid'",
    ),
    (
        "NaN",
        lambda c: _noise(c, mid=torch.full((2, c.num_tokens), float("nan"))),
        pytest.fail.Exception,
        "noise",
    ),
    ("Inf", lambda c: _noise(c, up_groups=torch.full((1, 8), float("inf"))), pytest.fail.Exception, "noise"),
    ("bool", lambda c: _noise(c, mid=torch.rand(2, c.num_tokens) > 0.5), pytest.fail.Exception, "noise"),
    (
        "complex",
        lambda c: _noise(c, mid=torch.rand(2, c.num_tokens, dtype=torch.complex64)),
        pytest.fail.Exception,
        "noise",
    ),
]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        pytest.param(
            c[1],
            c[3],
            id=c[0],
        )
        for c in NOISE
    ],
)
def test_bad_noise_is_a_typed_error(models, make, fragment: str) -> None:
    model = models["pretraining"]
    with pytest.raises(MedfmError, match=fragment), torch.no_grad():
        model(torch.rand(1, 1, 64, 64, 64), noise=make(model.config))


@pytest.mark.parametrize("mode", ["coarse_to_fine", "fine_to_coarse"])
@pytest.mark.parametrize("progress", [None, 1.5, -0.1, float("nan")], ids=["missing", "1.5", "-0.1", "nan"])
def test_training_progress_outside_the_schedule_is_a_typed_error(mode: str, progress) -> None:
    model = MiMForPreTraining(MiMConfig(**TINY, loss_weight_mode=mode)).eval()
    with pytest.raises(MedfmError, match="training_progress"), torch.no_grad():
        model(torch.rand(1, 1, 64, 64, 64), training_progress=progress)


@pytest.mark.parametrize("name", ["encoder", "segmenter", "pretraining"])
def test_empty_batch_is_a_volume_shape_error(models, name: str) -> None:
    size = {"encoder": (32, 32, 32), "segmenter": tuple(SEG_SIZE), "pretraining": (64, 64, 64)}[name]
    with pytest.raises(VolumeShapeError, match="batch"), torch.no_grad():
        models[name](torch.rand(0, 1, *size))


@pytest.mark.parametrize("label", [5, -1])
def test_segmentation_label_out_of_range_is_a_typed_error(models, label: int) -> None:
    with pytest.raises(MedfmError, match="num_labels"):
        models["segmenter"](torch.rand(1, 1, *SEG_SIZE), labels=torch.full((1, *SEG_SIZE), label))


# --- examples/pretrain_mim.py --model mim -------------------------------------------------------------------

EXAMPLE_TINY = {k: v for k, v in TINY.items() if k not in ("image_size", "fpn_hidden_size")}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("volumes")
    shutil.copy(NIBABEL_DATA / "anatomical.nii", data / "anatomical.nii")
    return data


def _spad_folder(root: Path) -> Path:
    from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling

    if not (root / "spad").is_dir():
        SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT)).save_pretrained(root / "spad")
    return root / "spad"


# (id, options, --config changes, how it ends: "usage" (exit 2) or the error class, fragment)
EXAMPLE_CASES = [
    ("crop odd", ["--crop-size", "63"], {}, "usage", "--crop-size 63 must be a positive multiple of 32"),
    ("crop not a multiple of 32", ["--crop-size", "80"], {}, "usage", "multiple of 32"),
    ("crop below 32", ["--crop-size", "16"], {}, "usage", "--crop-size 16 must be a positive multiple of 32"),
    # Fixed (objectives/mim.py): a 1-token or 27-token grid failed later as an InvalidConfigError not naming it.
    (
        "crop 32: one token",
        ["--crop-size", "32"],
        {},
        PretrainingOptionError,
        "--crop-size 32 gives MiM levels",
    ),
    (
        "crop 96: 27 tokens",
        ["--crop-size", "96"],
        {},
        PretrainingOptionError,
        "use a multiple of 64 (e.g. 64 or 128)",
    ),
    (
        "image_size not half the crop",
        [],
        {"image_size": [48] * 3},
        PretrainingOptionError,
        "image_size must be [32",
    ),
    # Fixed: a bare int raised TypeError, a string compared its characters.
    ("image_size a string", [], {"image_size": "32"}, PretrainingOptionError, "must be three integers"),
    # Fixed: an unknown field was silently ignored (a typo'd mask ratio trained with the default).
    (
        "unknown --config field",
        [],
        {"mask_ratio": 0.75},
        PretrainingOptionError,
        "['mask_ratio'] is not a field",
    ),
    (
        "invalid --config value",
        [],
        {"num_attention_heads": 0},
        PretrainingOptionError,
        "--config: num_attention",
    ),
    ("slice probability", ["--slice-probability", "0.5"], {}, "usage", "3D crops only"),
    (
        "tokenizer given to mim",
        ["--tokenizer", "SPAD"],
        {},
        "usage",
        "--tokenizer does not apply to --model mim",
    ),
    # Fixed (pretraining.py, objectives/mim.py): transformers' OSError / ValueError ("Repo id must be ...",
    # "Unrecognized configuration class") came through.
    ("pretrained missing folder", ["--pretrained", "MISSING"], {}, "usage", "no such folder"),
    ("pretrained a file", ["--pretrained", "FILE"], {}, "usage", "is a file; expected a model folder"),
    ("pretrained a run folder", ["--pretrained", "RUN"], {}, "usage", "holds no config.json"),
    ("pretrained a SPAD folder", ["--pretrained", "SPAD"], {}, PretrainingOptionError, "a 'spad_vit' model"),
    (
        "pretrained weights of other shapes",
        ["--pretrained", "PRE"],
        {"num_channels": 2},
        PretrainingOptionError,
        "its weights do not fit the model --config asks for (tensors of other shapes: decoder_pred",
    ),
]


@pytest.mark.parametrize(
    ("options", "changes", "ends", "fragment"),
    [c[1:] for c in EXAMPLE_CASES],
    ids=[c[0] for c in EXAMPLE_CASES],
)
def test_bad_pretrain_mim_options(
    volumes: Path, saved: Path, tmp_path: Path, capsys, options, changes, ends, fragment: str
) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run folder without a model
    places = {
        "SPAD": str(_spad_folder(tmp_path)),
        "MISSING": str(tmp_path / "nope"),
        "FILE": str(volumes / "anatomical.nii"),
        "RUN": str(tmp_path / "run"),
        "PRE": str(saved / "pre"),
    }
    options = [places.get(o, o) for o in options]
    output = tmp_path / "out"
    argv = ["--data", str(volumes), "--output", str(output), "--model", "mim", "--crop-size", "64"]
    argv += ["--batch-size", "1", "--steps", "1", "--save-every", "0", "--warmup-steps", "0"]
    argv += ["--config", json.dumps({**EXAMPLE_TINY, **changes}), *options]
    example = load_example("pretrain_mim")
    if ends == "usage":
        with pytest.raises(SystemExit) as exit_info:
            example.main(argv)
        assert exit_info.value.code == 2
        assert fragment in capsys.readouterr().err
    else:
        with pytest.raises(ends) as info:
            example.main(argv)
        assert fragment in str(info.value), str(info.value)
    assert not output.exists()


def test_pretrain_mim_continues_a_pretraining_folder_on_other_crops(
    volumes: Path, saved: Path, tmp_path: Path
):
    """Fixed (convert_mim.py): ``--pretrained`` with another --crop-size than the folder's levels raised
    transformers' RuntimeError (decoder_pos_embed of the old grid)."""
    argv = ["--data", str(volumes), "--output", str(tmp_path / "run"), "--model", "mim", "--crop-size", "128"]
    argv += ["--batch-size", "1", "--steps", "1", "--save-every", "0", "--warmup-steps", "0"]
    argv += ["--pretrained", str(saved / "pre"), "--config", json.dumps(EXAMPLE_TINY)]
    losses = load_example("pretrain_mim").main(argv)
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["image_size"] == [64, 64, 64]


def test_pretrain_mim_script_reports_one_line(volumes: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    argv = ["pretrain_mim.py", "--data", str(volumes), "--output", str(tmp_path / "out"), "--model", "mim"]
    argv += ["--crop-size", "96", "--config", json.dumps(EXAMPLE_TINY)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / "pretrain_mim.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert "--crop-size 96" in _one_line(capsys.readouterr().err)


# --- medfm segment / classify with MiM folders --------------------------------------------------------------


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volume")
    data = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "ct.nii.gz")
    data[...] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "nan.nii.gz")
    return folder


CLI_TASK_CASES = [
    (
        "classify",
        "seg",
        "ct.nii.gz",
        "a segmentation model (MiMForSemanticSegmentation), not an image classifier",
    ),
    (
        "segment",
        "cls",
        "ct.nii.gz",
        "an image classifier (MiMForImageClassification), not a segmentation model",
    ),
    ("segment", "enc", "ct.nii.gz", "a backbone with no task head (MiMModel)"),
    ("segment", "seg", "nan.nii.gz", "every voxel is NaN"),
    pytest.param(
        "segment",
        "pre-seg-size",
        "ct.nii.gz",
        "MiMForPreTraining",
        id="segment pre-training folder (writes a random label map)",
    ),
    pytest.param(
        "classify",
        "pre",
        "ct.nii.gz",
        "MiMForPreTraining",
        id="classify pre-training folder (prints random scores)",
    ),
]


@pytest.mark.parametrize(("command", "folder", "file", "fragment"), CLI_TASK_CASES)
def test_cli_with_a_mim_folder_of_another_task(
    saved: Path, volume: Path, tmp_path: Path, capsys, command, folder, file, fragment
) -> None:
    argv = [command, str(volume / file), "--model", str(saved / folder)]
    if command == "segment":
        argv += ["--out", str(tmp_path / "labels.nii.gz")]
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured.out
    err = _one_line(captured.err)
    assert fragment in err, err
    assert list(tmp_path.iterdir()) == []


def test_classification_pipeline_refuses_a_mim_segmenter(saved: Path) -> None:
    from transformers import pipeline

    with pytest.raises(WrongTaskError, match="not an image classifier"):
        pipeline("medical-image-classification", model=str(saved / "seg"))


def test_segment_window_too_small_for_the_fpn(saved: Path, volume: Path, tmp_path: Path, capsys) -> None:
    argv = [
        "segment",
        str(volume / "ct.nii.gz"),
        "--model",
        str(saved / "seg"),
        "--out",
        str(tmp_path / "l.nii.gz"),
    ]
    assert main([*argv, "--roi-size", "32", "32", "32"]) == 2
    assert "fpn map a single voxel" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "l.nii.gz").exists()
