"""MiM conversion on tiny configs other than the fixture's: every kind of upstream checkpoint converts back to
the model it came from (config and weights), the grid of a fine-tuned checkpoint is told from its tensors,
bad inputs give one typed error and leave no output, and ``medfm convert mim`` speaks the CLI's error
contract. The load-time adaptation ops are checked here on their own (their upstream parity is in
``test_parity_conversion.py``)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import medfm  # noqa: F401  (registers the families)
from medfm.cli import main
from medfm.errors import (
    CheckpointMismatchError,
    CorruptFileError,
    InvalidConfigError,
    NonFiniteWeightsError,
    OutputPathError,
    UnsupportedFormatError,
)
from medfm.layers.relative_position import relative_position_index
from medfm.models.mim import (
    MiMConfig,
    MiMForImageClassification,
    MiMForPreTraining,
    MiMForSemanticSegmentation,
    MiMModel,
)
from medfm.models.mim.convert_mim import (
    ResizePositionEmbedding,
    TileInputChannels,
    convert_mim_checkpoint,
    detect_checkpoint_kind,
    infer_mim_config,
    infer_token_grid,
    register_mim_weight_adaptation,
    tile_input_channels,
)
from medfm.models.mim.modeling_mim import resize_position_embeddings

ROOT = Path(__file__).resolve().parents[3]

# Tiny sizes of this file. Pre-training: a 2^3 token grid of 32^3 levels, 18 wide (the default 12 heads do not
# divide it). Segmentation: a non-cubic 4 x 2 x 2 grid, a layer scale of 0.5. Classifier: two channels and
# strides 2/1/2/2 (total 8) on a 2 x 1 x 3 grid.
PRETRAINING = dict(
    image_size=[32, 32, 32],
    embed_dims=[4, 8, 12, 18],
    depths=[1, 1, 1, 3],
    num_attention_heads=3,
    mlp_ratios=[2, 3, 2, 2],
    fpn_hidden_size=36,  # no fpn in the checkpoint: the converter writes upstream's 2 * embed_dims[3]
    decoder_hidden_size=12,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_mlp_ratio=2,
    num_mid_volumes=2,
    num_down_patches=2,
)
SEGMENTATION = dict(
    image_size=[64, 32, 32],
    embed_dims=[4, 8, 12, 24],
    depths=[1, 1, 1, 2],
    num_attention_heads=3,
    mlp_ratios=[2, 2, 2, 4],
    fpn_hidden_size=16,
    layer_scale_init_value=0.5,
    num_labels=3,
)
CLASSIFICATION = dict(
    image_size=[16, 8, 24],
    num_channels=2,
    embed_dims=[4, 6, 8, 12],
    depths=[1, 0, 1, 1],
    patch_sizes=[2, 1, 2, 2],
    num_attention_heads=2,
    fpn_hidden_size=24,  # as for pre-training
    num_labels=4,
)
# What shapes cannot tell, per kind: the --config of these tiny models.
GIVEN = {
    "pretraining": {
        "num_attention_heads": 3,
        "decoder_num_attention_heads": 2,
        "num_mid_volumes": 2,
        "num_down_patches": 2,
    },
    "segmentation": {"num_attention_heads": 3, "layer_scale_init_value": 0.5},
    "classification": {"num_attention_heads": 2, "image_size": [16, 8, 24]},
    "backbone": {"num_attention_heads": 3, "layer_scale_init_value": 0.5},
}
MODELS = {
    "pretraining": (MiMForPreTraining, PRETRAINING),
    "segmentation": (MiMForSemanticSegmentation, SEGMENTATION),
    "classification": (MiMForImageClassification, CLASSIFICATION),
    "backbone": (MiMModel, {k: v for k, v in SEGMENTATION.items() if k != "num_labels"}),
}


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random, so a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.1
                tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return model.eval()


def _upstream_encoder_key(key: str) -> str:
    return key.replace(
        "attn.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"
    )


def upstream_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict upstream's class of ``model`` would hold: upstream names, stored index buffers."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.clone().contiguous()
        if isinstance(model, MiMForPreTraining):
            state[key.removeprefix("mim.")] = value
        elif isinstance(model, MiMForSemanticSegmentation):
            if key.startswith("mim."):
                state["backbone." + _upstream_encoder_key(key.removeprefix("mim."))] = value
            else:
                state[key.removeprefix("decoder.")] = value
        elif isinstance(model, MiMForImageClassification):
            key = key.replace("classifier.", "head.", 1) if key.startswith("classifier.") else key
            state[_upstream_encoder_key(key.removeprefix("mim."))] = value
        else:
            state[_upstream_encoder_key(key)] = value
    if not isinstance(model, MiMForPreTraining) and model.config.use_relative_position_bias:
        prefix = "backbone." if isinstance(model, MiMForSemanticSegmentation) else ""
        index = relative_position_index(model.config.token_grid)
        for block in range(model.config.depths[3]):
            state[f"{prefix}blocks4.{block}.attn.relative_position_index"] = index.clone()
    return state


def _model(kind: str, **changes) -> torch.nn.Module:
    model_class, fields = MODELS[kind]
    return _randomised(model_class(MiMConfig(**(fields | changes))))


def _write(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "up.safetensors") -> Path:
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _no_leftovers(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    return {kind: upstream_state(_model(kind)) for kind in MODELS}


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_upstream_checkpoint_converts_back_to_its_model(kind: str, tmp_path: Path) -> None:
    """Upstream names in, the same config (from shapes + --config) and tensors out, loaded strictly."""
    model = _model(kind)
    checkpoint = tmp_path / "checkpoint-final.pth"
    # Upstream's container: the weights under "model", the run's argparse.Namespace beside them.
    torch.save({"model": upstream_state(model), "epoch": 9, "args": argparse.Namespace(lr=1e-4)}, checkpoint)
    out = convert_mim_checkpoint(checkpoint, tmp_path / "out", config_overrides=GIVEN[kind])
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "conversion.json",
    } <= {p.name for p in out.iterdir()}
    loaded = type(model).from_pretrained(out).eval()
    for field in MiMConfig.__dataclass_fields__:
        if field not in (
            "architectures",
            "transformers_version",
            "dtype",
            "output_hidden_states",
            "return_dict",
        ):
            assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert loaded.config.num_labels == model.config.num_labels
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert loaded.config.architectures == [type(model).__name__]


def test_grid_is_told_by_the_relative_position_tensors(states) -> None:
    """A non-cubic fine-tuned grid (4 x 2 x 2 of 16 tokens) needs no image_size: the relative bias tables and
    the stored index tell it, axis order included."""
    config = infer_mim_config(states["segmentation"], {"num_attention_heads": 3})
    assert config.image_size == SEGMENTATION["image_size"] and config.use_relative_position_bias
    for grid in ([4, 2, 2], [2, 4, 2], [2, 2, 4]):
        index = relative_position_index(grid)
        assert infer_token_grid(16, table_rows=7 * 3 * 3, index=index) == grid
    assert infer_token_grid(27) == [3, 3, 3]  # a cube when nothing else tells
    assert infer_token_grid(None, index=relative_position_index([2, 3, 4])) == [2, 3, 4]


def test_ambiguous_grid_asks_for_image_size(tmp_path: Path) -> None:
    """Without relative bias, 16 tokens fit many grids: --config must give image_size."""
    model = _model("segmentation", use_relative_position_bias=False)
    path = _write(tmp_path, upstream_state(model))
    with pytest.raises(InvalidConfigError, match="image_size"):
        convert_mim_checkpoint(path, tmp_path / "out", config_overrides=GIVEN["segmentation"])
    _no_leftovers(tmp_path, tmp_path / "out")
    given = GIVEN["segmentation"] | {"image_size": SEGMENTATION["image_size"]}
    out = convert_mim_checkpoint(path, tmp_path / "out", config_overrides=given)
    assert MiMConfig.from_pretrained(out).use_relative_position_bias is False


def test_image_size_the_checkpoint_contradicts(states, tmp_path: Path) -> None:
    path = _write(tmp_path, states["segmentation"])
    for wrong in ([32, 64, 32], [64, 64, 32]):  # another axis order; another token count
        with pytest.raises(InvalidConfigError, match="image_size"):
            convert_mim_checkpoint(
                path, tmp_path / "out", config_overrides=GIVEN["segmentation"] | {"image_size": wrong}
            )
    _no_leftovers(tmp_path, tmp_path / "out")


def test_stored_relative_position_index_must_be_the_grids(states, tmp_path: Path) -> None:
    """An index that differs between blocks, or is no grid's, is refused, not silently recomputed."""
    state = dict(states["segmentation"])  # block 0's index flipped: it differs from block 1's
    state["backbone.blocks4.0.attn.relative_position_index"] = state[
        "backbone.blocks4.0.attn.relative_position_index"
    ].flip(0)
    with pytest.raises(CheckpointMismatchError, match="relative_position_index"):
        convert_mim_checkpoint(
            _write(tmp_path, state), tmp_path / "out", config_overrides=GIVEN["segmentation"]
        )
    # Both blocks the same index, but of no grid.
    state["backbone.blocks4.1.attn.relative_position_index"] = state[
        "backbone.blocks4.0.attn.relative_position_index"
    ].clone()
    with pytest.raises(CheckpointMismatchError, match="relative_position_index"):
        convert_mim_checkpoint(
            _write(tmp_path, state), tmp_path / "out", config_overrides=GIVEN["segmentation"]
        )
    _no_leftovers(tmp_path, tmp_path / "out")


def test_kinds_are_told_from_keys(states) -> None:
    for kind, state in states.items():
        assert detect_checkpoint_kind(state) == kind
    with pytest.raises(UnsupportedFormatError, match="not a MiM checkpoint"):
        detect_checkpoint_kind({"encoder.layer.0.weight": torch.zeros(1)})


def test_released_base_layout_converts(tmp_path: Path) -> None:
    """The released pre-training checkpoint's 363 keys and shapes (spec's key list) give the base config."""
    import json

    listed = json.loads((ROOT / "tests" / "fixtures" / "mim" / "mim_upstream_keys.json").read_text())
    state = {key: torch.empty(shape, device="meta") for key, shape in listed["keys"].items()}  # shapes only
    config = infer_mim_config(state)  # heads: the upstream base defaults
    base = MiMConfig()
    for field in ("image_size", "embed_dims", "depths", "mlp_ratios", "patch_sizes", "num_attention_heads"):
        assert getattr(config, field) == getattr(base, field), field
    assert (
        config.decoder_hidden_size,
        config.decoder_num_hidden_layers,
        config.decoder_num_attention_heads,
    ) == (
        576,
        8,
        16,
    )
    assert config.fpn_hidden_size == base.fpn_hidden_size


# --- bad inputs: one typed error, nothing written ------------------------------------------------------


def test_truncated_safetensors(states, tmp_path: Path) -> None:
    path = _write(tmp_path, states["pretraining"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=r"up\.safetensors"):
        convert_mim_checkpoint(path, tmp_path / "out", config_overrides=GIVEN["pretraining"])
    _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(states, tmp_path: Path, value: float) -> None:
    state = {k: v.clone() for k, v in states["pretraining"].items()}
    state["blocks4.1.mlp.fc1.weight"][0, 0] = value
    with pytest.raises(NonFiniteWeightsError, match=r"blocks4\.1\.mlp\.fc1\.weight"):
        convert_mim_checkpoint(
            _write(tmp_path, state), tmp_path / "out", config_overrides=GIVEN["pretraining"]
        )
    _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("pretraining", "blocks4.0.attn.proj.weight"),
        ("pretraining", "patch_embed2.proj.weight"),
        ("pretraining", "decoder_embed.weight"),
        ("segmentation", "decoder3.transp_conv.conv.weight"),
        ("classification", "norm.weight"),
        ("backbone", "fpn.0.weight"),
    ],
)
def test_missing_key(states, tmp_path: Path, kind: str, key: str) -> None:
    state = dict(states[kind])
    del state[key]
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        convert_mim_checkpoint(_write(tmp_path, state), tmp_path / "out", config_overrides=GIVEN[kind])
    _no_leftovers(tmp_path, tmp_path / "out")


def test_missing_block(states, tmp_path: Path) -> None:
    state = {k: v for k, v in states["pretraining"].items() if not k.startswith("blocks4.1.")}
    with pytest.raises(CheckpointMismatchError, match=r"blocks4 blocks \[1\] are missing"):
        convert_mim_checkpoint(
            _write(tmp_path, state), tmp_path / "out", config_overrides=GIVEN["pretraining"]
        )
    _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("key", "shape"),
    [("blocks4.1.attn.proj.weight", (18, 12)), ("decoder_pred.weight", (100, 12)), ("pos_embed", (1, 8, 12))],
)
def test_wrong_shape(states, tmp_path: Path, key: str, shape: tuple[int, ...]) -> None:
    state = dict(states["pretraining"])
    state[key] = torch.zeros(shape)
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        convert_mim_checkpoint(
            _write(tmp_path, state), tmp_path / "out", config_overrides=GIVEN["pretraining"]
        )
    _no_leftovers(tmp_path, tmp_path / "out")


def test_unexpected_tensor(states, tmp_path: Path) -> None:
    state = dict(states["pretraining"]) | {"blocks4.0.gamma_1": torch.ones(18)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*blocks4\.0\.gamma_1"):
        convert_mim_checkpoint(
            _write(tmp_path, state), tmp_path / "out", config_overrides=GIVEN["pretraining"]
        )
    _no_leftovers(tmp_path, tmp_path / "out")


def test_unknown_kind(tmp_path: Path) -> None:
    path = _write(tmp_path, {"encoder.layer.0.weight": torch.zeros(2, 2)})
    with pytest.raises(UnsupportedFormatError, match="not a MiM checkpoint"):
        convert_mim_checkpoint(path, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ([1, 2], "JSON object"),
        ("heads", "JSON object"),
        (
            {"num_attention_heads": 4, "decoder_num_attention_heads": 2},
            "num_attention_heads 4 does not divide",
        ),
        ({"num_attention_heads": 3, "decoder_num_attention_heads": 5}, "decoder_num_attention_heads 5"),
        ({"decoder_num_attention_heads": 2}, r"default num_attention_heads=12 .*--config"),
        ({"num_attention_heads": 3}, r"default decoder_num_attention_heads=16 .*--config"),
        ({"bogus": 1}, "bogus"),
        (GIVEN["pretraining"] | {"mask_ratio_up": 1.5}, "mask_ratio_up"),
        (GIVEN["pretraining"] | {"image_size": [32, 32, 64]}, "image_size"),
        (GIVEN["pretraining"] | {"image_size": [30, 30, 30]}, "image_size"),
    ],
)
def test_bad_config_overrides(states, tmp_path: Path, overrides, phrase: str) -> None:
    with pytest.raises(InvalidConfigError, match=phrase):
        convert_mim_checkpoint(
            _write(tmp_path, states["pretraining"]), tmp_path / "out", config_overrides=overrides
        )
    _no_leftovers(tmp_path, tmp_path / "out")


def test_output_that_is_a_file_or_foreign_folder_is_refused(states, tmp_path: Path) -> None:
    path = _write(tmp_path, states["pretraining"])
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    with pytest.raises(OutputPathError, match="file"):
        convert_mim_checkpoint(path, target, config_overrides=GIVEN["pretraining"])
    assert target.read_text() == "keep me"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="not empty"):
        convert_mim_checkpoint(path, folder, config_overrides=GIVEN["pretraining"])
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_previous_conversion_is_replaced(states, tmp_path: Path) -> None:
    path = _write(tmp_path, states["pretraining"])
    out = tmp_path / "a" / "out"
    convert_mim_checkpoint(path, out, config_overrides=GIVEN["pretraining"])
    (out / "stale.txt").write_text("old")
    convert_mim_checkpoint(path, out, config_overrides=GIVEN["pretraining"])
    assert (out / "conversion.json").is_file() and not (out / "stale.txt").exists()


def test_module_prefix_and_dropped_buffers_recorded(states, tmp_path: Path) -> None:
    """A DDP ``module.`` prefix is removed; the record names the index buffers that were recomputed."""
    import json

    state = {f"module.{k}": v for k, v in states["classification"].items()}
    out = convert_mim_checkpoint(
        _write(tmp_path, state, "cls.pth"), tmp_path / "out", config_overrides=GIVEN["classification"]
    )
    record = json.loads((out / "conversion.json").read_text())
    assert record["kind"] == "classification" and record["model_class"] == "MiMForImageClassification"
    assert record["dropped"] == ["blocks4.0.attn.relative_position_index"]
    assert "head.weight" not in load_file(str(out / "model.safetensors"))


# --- load-time adaptation ops --------------------------------------------------------------------------


def test_adaptation_ops() -> None:
    """Tiling and resizing on their own: a no-op when the tensor fits, typed errors when it cannot be adapted."""
    weight = torch.randn(4, 1, 2, 2, 2)
    assert torch.equal(tile_input_channels(weight, 3), weight.repeat(1, 3, 1, 1, 1))
    assert tile_input_channels(weight, 1) is weight
    with pytest.raises(InvalidConfigError, match="num_channels=3"):
        tile_input_channels(torch.randn(4, 2, 2, 2, 2), 3)
    config = MiMConfig(**SEGMENTATION)  # grid 4 x 2 x 2
    table = torch.randn(1, 8, 24)  # a 2^3 pre-training table
    resized = ResizePositionEmbedding().adapt(table, config)
    assert resized.shape == (1, 16, 24)
    assert ResizePositionEmbedding().adapt(resized, config) is resized  # already on the grid: kept
    with pytest.raises(InvalidConfigError, match="its own grid is unknown"):
        ResizePositionEmbedding().adapt(torch.randn(1, 12, 24), config)
    assert TileInputChannels().adapt(weight, MiMConfig(**SEGMENTATION, num_channels=2)).shape[1] == 2


def test_non_cubic_pretraining_folder_is_resized_from_its_saved_grid(tmp_path: Path) -> None:
    """A medfm pre-training run on non-cubic levels (grid 2 x 4 x 2): the saved config tells the table's grid."""
    register_mim_weight_adaptation()
    model = _model(
        "pretraining", image_size=[32, 64, 32], embed_dims=[4, 8, 12, 24]
    )  # 24 = 8 x 3: segmentable
    model.save_pretrained(tmp_path / "pt")
    segmenter = MiMForSemanticSegmentation.from_pretrained(
        tmp_path / "pt", image_size=[64, 64, 32], num_labels=2
    )
    expected = resize_position_embeddings(model.mim.pos_embed.detach(), [2, 4, 2], [4, 4, 2])
    assert torch.equal(segmenter.mim.pos_embed.detach(), expected)


def test_adaptation_leaves_the_decoder_table_alone(tmp_path: Path) -> None:
    """Loading a pre-training folder into the pre-training model adapts nothing (decoder_pos_embed included)."""
    register_mim_weight_adaptation()
    model = _model("pretraining")
    model.save_pretrained(tmp_path / "pt")
    again = MiMForPreTraining.from_pretrained(tmp_path / "pt")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


# --- the command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "config", "phrase"),
    [
        ("truncated", "{}", "truncated"),
        ("nan", '{"decoder_num_attention_heads": 2, "num_attention_heads": 3}', "NaN"),
        ("ok", '{"num_attention_heads": 4, "decoder_num_attention_heads": 2}', "num_attention_heads"),
        ("ok", '{"decoder_num_attention_heads": 2}', "--config"),
        ("ok", "[1]", "JSON object"),
        ("unknown", "{}", "not a MiM checkpoint"),
    ],
)
def test_cli_reports_one_line(states, tmp_path: Path, capsys, make: str, config: str, phrase: str) -> None:
    state = {k: v.clone() for k, v in states["pretraining"].items()}
    if make == "nan":
        state["pos_embed"][..., 0] = float("nan")
    if make == "unknown":
        state = {"encoder.layer.0.weight": torch.zeros(2, 2)}
    path = _write(tmp_path, state)
    if make == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "out"
    assert main(["convert", "mim", "--checkpoint", str(path), "--output", str(out), "--config", config]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    _no_leftovers(tmp_path, out)


def test_cli_converts(states, tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, states["pretraining"])
    config = '{"num_attention_heads": 3, "decoder_num_attention_heads": 2, "num_mid_volumes": 2, "num_down_patches": 2}'
    assert (
        main(
            [
                "convert",
                "mim",
                "--checkpoint",
                str(path),
                "--output",
                str(tmp_path / "out"),
                "--config",
                config,
            ]
        )
        == 0
    )
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    assert MiMForPreTraining.from_pretrained(tmp_path / "out").config.num_mid_volumes == 2


def test_conversion_script_speaks_under_its_own_name(tmp_path: Path) -> None:
    script = ROOT / "conversion" / "convert_mim_original_to_hf.py"
    done = subprocess.run(
        [sys.executable, str(script), "--checkpoint", str(tmp_path / "x.pth")], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("convert_mim_original_to_hf.py"), done.stderr
