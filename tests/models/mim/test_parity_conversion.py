"""Upstream parity through the real conversion path: the fixture's upstream checkpoints go through
:func:`convert_mim_checkpoint` into model folders, ``from_pretrained`` loads them, and every tensor of
``expected.safetensors`` is reproduced. Also upstream's pre-training -> fine-tuning load (``load_ckpt``,
``get_cls_model``): a converted pre-training folder loaded into the segmentation and classification models
holds exactly the weights upstream's loading gave the fixture's fine-tuning models.

Nothing here is a constant of the fixture: the converter infers every shape-determined value; only what
shapes cannot tell is passed, read from ``upstream_config.json`` under its upstream name and handed over as
``--config`` fields with :class:`MiMConfig`'s names; tolerances come from its ``tolerances``. A held-back
fixture set of the same layout runs as it is: ``MEDFM_FIXTURES=<folder> pytest ...``.
"""

from __future__ import annotations

import argparse
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import medfm  # noqa: F401  (registers the families)
from medfm.errors import InvalidConfigError
from medfm.models.mim import (
    MiMConfig,
    MiMForImageClassification,
    MiMForPreTraining,
    MiMForSemanticSegmentation,
    MiMModel,
)
from medfm.models.mim.convert_mim import (
    convert_mim_checkpoint,
    infer_mim_config,
    register_mim_weight_adaptation,
)

from ...conftest import family_fixtures

LEVELS = ("up", "mid", "down")
# upstream_config.json names of what shapes cannot tell, and MiMConfig's names for them.
PRETRAINING_ARGUMENTS = {"decoder_num_heads": "decoder_num_attention_heads", "norm_pix_loss": "norm_pix_loss"}
PRETRAINING_ARGS = {
    "mask_ratio_up": "mask_ratio_up",
    "mask_ratio_mid": "mask_ratio_mid",
    "mask_ratio_down": "mask_ratio_down",
    "sample_usual": "num_mid_volumes",
    "sample_down": "num_down_patches",
}
FINETUNING_ARGUMENTS = {"drop_path_rate": "drop_path_rate", "init_values": "layer_scale_init_value"}
# Upstream's alignment criterion (args.attn_loss_name) and the MiMConfig.alignment reproducing it.
ALIGNMENTS = {"byol": "released"}


def _layer_norm_eps(norm_layer: str | None) -> dict[str, float]:
    """``layer_norm_eps`` from upstream's ``norm_layer`` expression (``partial(nn.LayerNorm, eps=1e-6)``)."""
    match = re.search(r"eps\s*=\s*([0-9.eE+-]+)", norm_layer or "")
    return {"layer_norm_eps": float(match.group(1))} if match else {}


def _level_size(img_size: list) -> list[int]:
    """The input size of an upstream ``img_size`` (a per-stage list of sizes, or one size)."""
    return list(img_size[0]) if isinstance(img_size[0], list) else list(img_size)


class Upstream:
    """The fixture folder: upstream tensors and the ``--config`` fields its upstream_config.json gives."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config: dict[str, Any] = json.loads((folder / "upstream_config.json").read_text())
        self.pretraining_state = load_file(str(folder / "upstream_state_dict.safetensors"))
        self.segmentation_state = load_file(str(folder / "upstream_seg_state_dict.safetensors"))
        self.classification_state = load_file(str(folder / "upstream_cls_state_dict.safetensors"))
        self.inputs = load_file(str(folder / "inputs.safetensors"))
        self.expected = load_file(str(folder / "expected.safetensors"))
        self.checked: set[str] = set()
        self.diffs: dict[str, float] = {}

    @cached_property
    def pretraining_overrides(self) -> dict[str, Any]:
        section = self.config["pretraining"]
        args = section.get("args", {})
        loss = args.get("attn_loss_name", "byol")
        assert loss in ALIGNMENTS, (
            f"upstream alignment {loss!r} is not reproducible (only {list(ALIGNMENTS)})"
        )
        overrides = {"num_attention_heads": section["num_heads"], "alignment": ALIGNMENTS[loss]}
        overrides |= {
            ours: section[theirs] for theirs, ours in PRETRAINING_ARGUMENTS.items() if theirs in section
        }
        overrides |= {ours: args[theirs] for theirs, ours in PRETRAINING_ARGS.items() if theirs in args}
        if "loss_weights" in section:
            overrides["loss_weights"] = list(section["loss_weights"])
        return overrides | _layer_norm_eps(section.get("norm_layer"))

    def _finetuning(self, arguments: dict[str, Any], img_size: list) -> dict[str, Any]:
        overrides = {"num_attention_heads": arguments["num_heads"], "image_size": _level_size(img_size)}
        overrides |= {
            ours: arguments[theirs] for theirs, ours in FINETUNING_ARGUMENTS.items() if theirs in arguments
        }
        return overrides | _layer_norm_eps(arguments.get("norm_layer"))

    @cached_property
    def segmentation_overrides(self) -> dict[str, Any]:
        section = self.config["segmentation"]
        overrides = self._finetuning(
            section["backbone"], section.get("img_size", section["backbone"]["img_size"])
        )
        return overrides | {"normalize_features": bool(section.get("normalize", True))}

    @cached_property
    def classification_overrides(self) -> dict[str, Any]:
        section = self.config["classification"]
        assert section.get("global_pool", True), "only upstream's global_pool=True classifier exists in medfm"
        return self._finetuning(section, section["img_size"])

    def tolerance(self, key: str) -> dict[str, float] | None:
        """``assert_close`` tolerances of ``key`` (``None``: not compared)."""
        table = self.config["tolerances"]
        entry = table.get(key, table["default"])
        if entry.get("compare", True) is False:
            return None
        return {"atol": float(entry.get("atol", 0.0)), "rtol": float(entry.get("rtol", 0.0))}

    def check(self, actual: torch.Tensor, key: str) -> None:
        """Compare with ``expected[key]`` at its tolerance (exactly for integers and zero tolerances)."""
        expected = self.expected[key]
        self.checked.add(key)
        actual = actual.detach().to(expected.dtype).reshape(expected.shape)
        if expected.is_floating_point():
            self.diffs[key] = float((actual.double() - expected.double()).abs().max())
        tolerance = self.tolerance(key)
        if tolerance is None:
            return
        if not expected.is_floating_point() or tolerance == {"atol": 0.0, "rtol": 0.0}:
            assert torch.equal(actual, expected), f"{key}: {(actual != expected).sum()} elements differ"
        else:
            torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    return Upstream(family_fixtures("mim"))


@pytest.fixture(scope="module")
def converted(upstream: Upstream, tmp_path_factory) -> dict[str, Path]:
    """The three upstream checkpoints, in the containers upstream writes, converted by the real entry point.

    Pre-training: ``checkpoint-final.pth`` (``model``, ``args`` as an ``argparse.Namespace``...); segmentation:
    a DDP state dict (``module.`` prefix) as ``.pt``; classification: ``.safetensors``.
    """
    root = tmp_path_factory.mktemp("mim-converted")
    pretraining = root / "checkpoint-final.pth"
    args = argparse.Namespace(**upstream.config["pretraining"].get("args", {}))
    torch.save(
        {"model": upstream.pretraining_state, "optimizer": {}, "epoch": 799, "scaler": {}, "args": args},
        pretraining,
    )
    segmentation = root / "seg.pt"
    torch.save({f"module.{k}": v for k, v in upstream.segmentation_state.items()}, segmentation)
    classification = root / "cls.safetensors"
    save_file(upstream.classification_state, str(classification))
    return {
        "pretraining": convert_mim_checkpoint(
            pretraining, root / "pretraining", config_overrides=upstream.pretraining_overrides
        ),
        "segmentation": convert_mim_checkpoint(
            segmentation, root / "segmentation", config_overrides=upstream.segmentation_overrides
        ),
        "classification": convert_mim_checkpoint(
            classification, root / "classification", config_overrides=upstream.classification_overrides
        ),
    }


# --- configs -------------------------------------------------------------------------------------------


def _stated(section: dict[str, Any]) -> dict[str, Any]:
    """Shape-determined upstream arguments as MiMConfig fields (to check the inference against)."""
    names = {
        "in_chans": "num_channels",
        "depth": "depths",
        "patch_size": "patch_sizes",
        "mlp_ratio": "mlp_ratios",
    }
    stated = {ours: section[theirs] for theirs, ours in names.items() if theirs in section}
    if "embed_dim" in section:
        stated["embed_dims"] = list(section["embed_dim"][:4])
        if len(section["embed_dim"]) > 4:
            stated["fpn_hidden_size"] = section["embed_dim"][4]
    if "qkv_bias" in section:
        stated["qkv_bias"] = section["qkv_bias"]
    return stated


def test_converted_configs_are_upstreams(upstream: Upstream, converted: dict[str, Path]) -> None:
    """Inferred from the tensors: what upstream_config.json states; given: what --config passed."""
    sections = upstream.config
    cases = {
        "pretraining": (MiMForPreTraining, sections["pretraining"], upstream.pretraining_overrides),
        "segmentation": (
            MiMForSemanticSegmentation,
            sections["segmentation"]["backbone"],
            upstream.segmentation_overrides,
        ),
        "classification": (
            MiMForImageClassification,
            sections["classification"],
            upstream.classification_overrides,
        ),
    }
    for kind, (model_class, section, overrides) in cases.items():
        config = MiMConfig.from_pretrained(converted[kind])
        assert config.architectures == [model_class.__name__]
        for field, value in (_stated(section) | overrides).items():
            assert getattr(config, field) == value, (
                f"{kind}: {field} = {getattr(config, field)!r}, upstream {value!r}"
            )
        record = json.loads((converted[kind] / "conversion.json").read_text())
        assert record["kind"] == kind and record["model_class"] == model_class.__name__
    pretraining = MiMConfig.from_pretrained(converted["pretraining"])
    assert pretraining.image_size == _level_size(sections["pretraining"]["img_size"])
    decoder = sections["pretraining"]
    assert (pretraining.decoder_hidden_size, pretraining.decoder_num_hidden_layers) == (
        decoder["decoder_embed_dim"],
        decoder["decoder_depth"],
    )
    segmentation = MiMConfig.from_pretrained(converted["segmentation"])
    assert segmentation.num_labels == sections["segmentation"]["out_channels"]
    assert segmentation.feature_size == sections["segmentation"]["feature_size"]
    assert (
        MiMConfig.from_pretrained(converted["classification"]).num_labels
        == sections["classification"]["num_classes"]
    )


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_fine_tuned_grid_inferred_without_image_size(upstream: Upstream, kind: str) -> None:
    """Without ``image_size`` the grid comes from pos_embed, the relative bias tables and the stored index, or,
    when these leave it ambiguous (a size-1 axis may sit on any axis), the converter asks for it; it never
    guesses a wrong one."""
    state = upstream.segmentation_state if kind == "segmentation" else upstream.classification_state
    overrides = getattr(upstream, f"{kind}_overrides")
    without = {k: v for k, v in overrides.items() if k != "image_size"}
    try:
        inferred = infer_mim_config(state, without).image_size
    except InvalidConfigError as error:
        assert "image_size" in str(error) and "ambiguous" in str(error)
        return
    assert inferred == overrides["image_size"]


# --- outputs -------------------------------------------------------------------------------------------


def _scatter(latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Visible-token latents back on the token grid (removed rows 0), as the fixture stores them."""
    rows, visible, width = latent.shape
    keep = torch.argsort(ids_restore, dim=1)[:, :visible]
    full = latent.new_zeros(rows, ids_restore.shape[1], width)
    return full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), latent)


def _checksum(x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    x = x.double()
    return torch.stack([x.sum(), x.abs().sum()] if absolute else [x.sum(), (x * x).sum()])


def test_pretraining_outputs(upstream: Upstream, converted: dict[str, Path]) -> None:
    """Losses, masks, labels, latents, decoder features, predictions and level inputs of the five replayed
    noises, from the converted ``checkpoint-final.pth``."""
    model = MiMForPreTraining.from_pretrained(converted["pretraining"]).eval()
    inputs = {k.removeprefix("pretrain."): v for k, v in upstream.inputs.items() if k.startswith("pretrain.")}
    crops = F.interpolate(
        inputs["pixel_values_lowres"], size=model.config.crop_size, mode="trilinear", align_corners=False
    )
    upstream.check(_checksum(crops), "pretrain.pixel_values_checksum")
    noise = {k: v for k, v in inputs.items() if k.startswith("noise_")}
    with torch.no_grad():
        out = model(crops, noise=noise, output_hidden_states=True)
    upstream.check(out.losses, "pretrain.losses")
    upstream.check(out.loss.reshape(1), "pretrain.total_loss")
    upstream.check(out.labels_mid, "pretrain.labels_mid")
    upstream.check(out.labels_down, "pretrain.labels_down")
    for level, level_input in zip(LEVELS, out.level_inputs):
        upstream.check(_checksum(level_input), f"pretrain.level_input_{level}_checksum")
        for name in ("mask", "ids_restore"):
            upstream.check(getattr(out, f"{name}_{level}"), f"pretrain.{name}_{level}")
        logits = getattr(out, f"logits_{level}")
        upstream.check(_checksum(logits, absolute=True), f"pretrain.pred_{level}_sum")
        # Stored for the first rows only (the down level: the first of its volumes).
        every = upstream.expected[f"pretrain.pred_{level}_every512"]
        step = logits.shape[-1] // every.shape[-1]
        upstream.check(logits[: every.shape[0], :, ::step], f"pretrain.pred_{level}_every512")
        rows = upstream.expected[f"pretrain.latent_{level}_full"].shape[0]
        latent = _scatter(getattr(out, f"latent_{level}"), getattr(out, f"ids_restore_{level}"))
        upstream.check(latent[:rows], f"pretrain.latent_{level}_full")
        hidden = getattr(out, f"decoder_hidden_{level}")
        upstream.check(
            hidden[: upstream.expected[f"pretrain.decoder_hidden_{level}"].shape[0]],
            f"pretrain.decoder_hidden_{level}",
        )


def test_segmentation_and_backbone_outputs(upstream: Upstream, converted: dict[str, Path]) -> None:
    """Seg logits of the converted ``ConvViT3dUNETR``; its encoder's five maps with ``normalize=False``, from
    the segmentation folder and through ``MiMModel.from_pretrained`` of it."""
    pixel_values = upstream.inputs["seg.pixel_values"]
    model = MiMForSemanticSegmentation.from_pretrained(converted["segmentation"]).eval()
    encoder = MiMModel.from_pretrained(converted["segmentation"]).eval()
    with torch.no_grad():
        upstream.check(model(pixel_values).logits, "seg.logits")
        maps = model.mim(pixel_values, normalize=False, output_hidden_states=True).hidden_states
        alone = encoder(pixel_values, normalize=False, output_hidden_states=True).hidden_states
    count = sum(1 for k in upstream.expected if k.startswith("backbone.hidden_states."))
    assert len(maps) == count
    for i, (feature_map, same) in enumerate(zip(maps, alone)):
        upstream.check(feature_map, f"backbone.hidden_states.{i}")
        torch.testing.assert_close(same, feature_map, atol=0, rtol=0)


def test_classification_outputs(upstream: Upstream, converted: dict[str, Path]) -> None:
    model = MiMForImageClassification.from_pretrained(converted["classification"]).eval()
    with torch.no_grad():
        upstream.check(model(upstream.inputs["cls.pixel_values"]).logits, "cls.logits")


def test_relative_position_index_is_upstreams(upstream: Upstream, converted: dict[str, Path]) -> None:
    """The recomputed (non-persistent) index buffers equal the ones upstream stored."""
    for kind, state, prefix in (
        ("segmentation", upstream.segmentation_state, "backbone."),
        ("classification", upstream.classification_state, ""),
    ):
        model_class = MiMForSemanticSegmentation if kind == "segmentation" else MiMForImageClassification
        buffers = dict(model_class.from_pretrained(converted[kind]).named_buffers())
        stored = {k: v for k, v in state.items() if k.endswith("relative_position_index")}
        for key, value in stored.items():
            ours = "mim." + key.removeprefix(prefix).replace(
                "attn.relative_position_index", "attn.relative_position_bias.relative_position_index"
            )
            assert torch.equal(buffers[ours], value), key


def test_every_expected_tensor_is_checked(upstream: Upstream) -> None:
    """The output tests above check exactly the tensors of ``expected.safetensors``."""
    checked = {"pretrain.pixel_values_checksum", "pretrain.losses", "pretrain.total_loss"}
    checked |= {"pretrain.labels_mid", "pretrain.labels_down", "seg.logits", "cls.logits"}
    for level in LEVELS:
        checked |= {
            f"pretrain.level_input_{level}_checksum",
            f"pretrain.mask_{level}",
            f"pretrain.ids_restore_{level}",
            f"pretrain.pred_{level}_sum",
            f"pretrain.pred_{level}_every512",
            f"pretrain.latent_{level}_full",
            f"pretrain.decoder_hidden_{level}",
        }
    maps = 4 + ("backbone.fpn.0.weight" in upstream.segmentation_state)  # stages 1-4 and the fpn
    checked |= {f"backbone.hidden_states.{i}" for i in range(maps)}
    assert checked == set(upstream.expected), sorted(checked ^ set(upstream.expected))


# --- upstream's pre-training -> fine-tuning load (spec §5.3) -----------------------------------------------


def _pretrained_keys(upstream: Upstream, state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Keys of a fine-tuning state dict whose tensors upstream's loading took from the pre-training checkpoint."""
    return [k for k in state if k.startswith(prefix) and k.removeprefix(prefix) in upstream.pretraining_state]


def _medfm_key(key: str) -> str:
    return key if key.startswith("norm.") else "mim." + key


def test_pretraining_checkpoint_loads_into_segmentation_as_upstream(
    upstream: Upstream, converted: dict[str, Path]
) -> None:
    """``from_pretrained(converted pre-training, image_size=ROI, num_labels=...)`` is upstream ``load_ckpt``: the
    encoder weights (pos_embed trilinearly resized) equal the fixture's seg model's ``backbone.*``; the new
    tensors are initialised (layer scale, a zero relative bias, the fpn and the decoder)."""
    register_mim_weight_adaptation()
    section = upstream.config["segmentation"]
    model = MiMForSemanticSegmentation.from_pretrained(
        converted["pretraining"],
        image_size=_level_size(section["img_size"]),
        num_labels=section["out_channels"],
        num_channels=section["in_channels"],
    )
    ours = model.state_dict()
    keys = _pretrained_keys(upstream, upstream.segmentation_state, "backbone.")
    assert "backbone.pos_embed" in keys and "backbone.patch_embed1.proj.weight" in keys
    for key in keys:
        torch.testing.assert_close(
            ours[_medfm_key(key.removeprefix("backbone."))], upstream.segmentation_state[key], msg=key
        )
    scale = model.config.layer_scale_init_value
    for name, value in ours.items():
        if name.endswith(("gamma_1", "gamma_2")):
            assert torch.all(value == scale), name
        if name.endswith("relative_position_bias_table"):
            assert not value.any(), name


def test_pretraining_checkpoint_loads_into_classifier_as_upstream(
    upstream: Upstream, converted: dict[str, Path]
) -> None:
    """Upstream ``get_cls_model``: the encoder and the pre-training final ``norm`` (the classifier's norm)."""
    register_mim_weight_adaptation()
    section = upstream.config["classification"]
    model = MiMForImageClassification.from_pretrained(
        converted["pretraining"],
        image_size=_level_size(section["img_size"]),
        num_labels=section["num_classes"],
        num_channels=section["in_chans"],
    )
    ours = model.state_dict()
    keys = _pretrained_keys(upstream, upstream.classification_state, "")
    assert {"pos_embed", "norm.weight", "norm.bias"} <= set(keys)
    for key in keys:
        torch.testing.assert_close(ours[_medfm_key(key)], upstream.classification_state[key], msg=key)


def test_pretraining_checkpoint_loads_into_the_encoder(
    upstream: Upstream, converted: dict[str, Path]
) -> None:
    """``MiMModel.from_pretrained`` of the pre-training folder: its encoder, the table resized the same way."""
    register_mim_weight_adaptation()
    section = upstream.config["segmentation"]
    model = MiMModel.from_pretrained(converted["pretraining"], image_size=_level_size(section["img_size"]))
    ours = model.state_dict()
    for key in _pretrained_keys(upstream, upstream.segmentation_state, "backbone."):
        torch.testing.assert_close(
            ours[key.removeprefix("backbone.")], upstream.segmentation_state[key], msg=key
        )
    same = MiMModel.from_pretrained(converted["pretraining"]).state_dict()  # its own size: nothing resized
    for key, value in upstream.pretraining_state.items():
        if key in same:
            assert torch.equal(same[key], value), key


def test_channels_are_tiled_as_upstream(upstream: Upstream, converted: dict[str, Path]) -> None:
    """More input channels: the first patch kernel repeated along them (upstream ``load_ckpt``)."""
    register_mim_weight_adaptation()
    section = upstream.config["segmentation"]
    channels = 3 * upstream.pretraining_state["patch_embed1.proj.weight"].shape[1]
    model = MiMForSemanticSegmentation.from_pretrained(
        converted["pretraining"],
        image_size=_level_size(section["img_size"]),
        num_labels=section["out_channels"],
        num_channels=channels,
    )
    expected = upstream.pretraining_state["patch_embed1.proj.weight"].repeat(1, 3, 1, 1, 1)
    assert torch.equal(model.mim.patch_embed1.proj.weight.detach(), expected)
    with torch.no_grad():
        assert (
            model(torch.rand(1, channels, *model.config.image_size)).logits.shape[1]
            == section["out_channels"]
        )


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_adapted_model_saves_and_reloads_without_adapting_again(
    upstream: Upstream, converted: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    """The adapted tensors are saved as they are, and reloading (twice) changes nothing."""
    register_mim_weight_adaptation()
    section = upstream.config[kind]
    if kind == "segmentation":
        model_class, labels = MiMForSemanticSegmentation, section["out_channels"]
    else:
        model_class, labels = MiMForImageClassification, section["num_classes"]
    channels = 2 * upstream.pretraining_state["patch_embed1.proj.weight"].shape[1]
    model = model_class.from_pretrained(
        converted["pretraining"],
        image_size=_level_size(section["img_size"]),
        num_labels=labels,
        num_channels=channels,
    )
    state = model.state_dict()
    model.save_pretrained(tmp_path / "first")
    saved = load_file(str(tmp_path / "first" / "model.safetensors"))
    assert saved["mim.pos_embed"].shape == state["mim.pos_embed"].shape
    assert torch.equal(saved["mim.patch_embed1.proj.weight"], state["mim.patch_embed1.proj.weight"])
    again = model_class.from_pretrained(tmp_path / "first")
    again.save_pretrained(tmp_path / "second")
    third = model_class.from_pretrained(tmp_path / "second").state_dict()
    assert set(third) == set(state)
    for key, value in state.items():
        assert torch.equal(third[key], value), key
