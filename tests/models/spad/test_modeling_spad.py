"""SPAD-ViT and SPAD-VT: common model tests on other tiny configs, the SPAD rule, base key names,
load-time adaptation equivalences, and the conversion command line."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForSemanticSegmentation,
)

import medfm  # noqa: F401
from medfm.models.spad import (
    SpadViTConfig,
    SpadViTForImageClassification,
    SpadViTForMaskedImageModeling,
    SpadViTForSemanticSegmentation,
    SpadViTModel,
    SpadVTConfig,
    SpadVTModel,
    aniso_d_from_spacing,
)

from ...common.model_tests import CommonModelTests

# A tiny config unlike the fixture's: other width, head size, depth, table, partial mask layers.
OTHER_VIT = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=85,
    pos_embed_shape=(2, 3, 3),
    codebook_size=24,
    mask_layer_ids=[2],
    out_indices=[0, 1, 2, 2],
)


def _volume(batch: int, channels: int = 3, shape=(8, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(seed))


class TestSpadViTModelCommon(CommonModelTests):
    model_class = SpadViTModel
    auto_class = AutoModel
    supports_2d = True

    def make_config(self):
        return SpadViTConfig(**OTHER_VIT)

    def make_inputs(self, batch_size=2, two_d=False):
        if two_d:
            return {"pixel_values": torch.randn(batch_size, 3, 32, 48)}
        return {"pixel_values": _volume(batch_size), "spacing": torch.tensor([2.0, 0.5, 0.5])}


class TestSpadViTForMaskedImageModelingCommon(CommonModelTests):
    model_class = SpadViTForMaskedImageModeling
    auto_class = AutoModelForMaskedImageModeling
    supports_2d = True

    def make_config(self):
        return SpadViTConfig(**OTHER_VIT)

    def make_inputs(self, batch_size=2, two_d=False):
        pixel_values = torch.randn(batch_size, 3, 32, 48) if two_d else _volume(batch_size)
        length = 6 if two_d else 8  # token grids (1, 2, 3) and (2, 2, 2)
        generator = torch.Generator().manual_seed(1)
        masked = torch.stack(
            [torch.randperm(length, generator=generator) < length // 2 for _ in range(batch_size)]
        )
        inputs = {
            "pixel_values": pixel_values,
            "bool_masked_pos": masked,
            "target_logits": torch.randn(batch_size, length, OTHER_VIT["codebook_size"], generator=generator),
        }
        if not two_d:
            inputs["spacing"] = torch.tensor([2.0, 0.5, 0.5])
        return inputs


class TestSpadViTForImageClassificationCommon(CommonModelTests):
    model_class = SpadViTForImageClassification
    auto_class = AutoModelForImageClassification
    supports_2d = True

    def make_config(self):
        return SpadViTConfig(**OTHER_VIT, num_labels=4)

    def make_inputs(self, batch_size=2, two_d=False):
        inputs = TestSpadViTModelCommon.make_inputs(self, batch_size, two_d)
        inputs["labels"] = torch.arange(batch_size) % 4
        return inputs


class TestSpadViTForSemanticSegmentationCommon(CommonModelTests):
    model_class = SpadViTForSemanticSegmentation
    auto_class = AutoModelForSemanticSegmentation

    def make_config(self):
        return SpadViTConfig(
            **{**OTHER_VIT, "pos_embed_shape": (2, 2, 2)},
            patch_size=(4, 16, 16),
            adaptive_patch_embed=False,
            in_channels=1,
            num_labels=3,
            decoder_lateral_channels=(8, 8, 16, 16),
            decoder_full_res_channels=(4, 8),
        )

    def make_inputs(self, batch_size=2, two_d=False):
        labels = torch.randint(0, 3, (batch_size, 8, 32, 64), generator=torch.Generator().manual_seed(2))
        return {"pixel_values": _volume(batch_size, channels=1, shape=(8, 32, 64)), "labels": labels}


class TestSpadVTModelCommon(CommonModelTests):
    model_class = SpadVTModel
    auto_class = AutoModel
    supports_2d = True
    supports_checkpointing = False

    def make_config(self):
        return SpadVTConfig(
            downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], codebook_size=12, embedding_dim=16
        )

    def make_inputs(self, batch_size=2, two_d=False):
        if two_d:
            return {"pixel_values": torch.rand(batch_size, 3, 32, 16) * 2 - 1}
        return {
            "pixel_values": torch.rand(batch_size, 3, 4, 32, 16) * 2 - 1,
            "spacing": torch.tensor([4.0, 1.0, 1.0]),
        }


# --- the SPAD rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spacing", "level"),
    [
        ((1.0, 1.0, 1.0), 0),
        ((1.99, 1.0, 1.0), 0),
        ((2.0, 1.0, 1.0), 1),
        ((3.99, 1.0, 1.0), 1),
        ((3.0, 0.75, 0.75), 2),  # BTCV
        ((9.0, 1.62109, 1.62109), 2),  # CHAOS
        ((8.0, 1.0, 1.0), 3),
        ((16.0, 1.0, 1.0), 4),
        ((31.99, 1.0, 1.0), 4),
        ((32.0, 1.0, 1.0), 5),
        ((1e8, 1.0, 1.0), 5),  # 2D
        ((0.5, 1.0, 1.0), 0),  # ratio clipped at 1
        ((5.0, 0.5, 1.0), 3),  # the smaller in-plane spacing counts: 5 / 0.5 = 10
    ],
)
def test_aniso_d_rule(spacing, level) -> None:
    assert aniso_d_from_spacing(torch.tensor(spacing)) == level


def test_aniso_d_errors() -> None:
    with pytest.raises(ValueError, match="different anisotropy levels"):
        aniso_d_from_spacing(torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.75, 0.75]]))
    with pytest.raises(ValueError, match="finite and positive"):
        aniso_d_from_spacing(torch.tensor([0.0, 1.0, 1.0]))


def test_model_input_errors() -> None:
    model = SpadViTModel(SpadViTConfig(**OTHER_VIT)).eval()
    with pytest.raises(ValueError, match="needs the voxel spacing"):
        model(_volume(1))
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        model(_volume(1, shape=(6, 32, 32)), spacing=(2.0, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\) or \(B, C, H, W\)"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="no mask_token"):
        model(_volume(1), spacing=(2.0, 0.5, 0.5), bool_masked_pos=torch.zeros(1, 8, dtype=torch.bool))


def test_invalid_configs() -> None:
    with pytest.raises(Exception, match="multiple of 4"):
        SpadViTConfig(hidden_size=24, num_attention_heads=4)  # head size 6
    with pytest.raises(Exception, match="isotropic power-of-2"):
        SpadViTConfig(patch_size=(4, 16, 16))  # adaptive needs a cube
    with pytest.raises(Exception, match="out_indices"):
        SpadViTConfig(num_hidden_layers=4, out_indices=[0, 1, 2, 9])


# The base sizes' upstream key names and shapes: tests/models/test_upstream_keys.py.


# --- the maths of the adaptation, as equivalences ------------------------------------------------------


def test_adapted_fixed_patch_model_equals_adaptive_model(tmp_path: Path) -> None:
    """Summing depth taps at load time is the same as the adaptive embedding at that anisotropy level."""
    torch.manual_seed(0)
    adaptive = SpadViTModel(SpadViTConfig(**OTHER_VIT)).eval()
    adaptive.save_pretrained(tmp_path)
    fixed = SpadViTModel.from_pretrained(tmp_path, patch_size=(4, 16, 16), adaptive_patch_embed=False).eval()
    assert list(fixed.patch_embed.proj.weight.shape) == [32, 3, 4, 16, 16]
    x = _volume(2)
    with torch.no_grad():
        expected = adaptive(x, aniso_d=2).last_hidden_state
        torch.testing.assert_close(fixed(x).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_adapted_grey_model_equals_rgb_model_on_repeated_channels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = SpadViTModel(SpadViTConfig(**OTHER_VIT)).eval()
    rgb.save_pretrained(tmp_path)
    grey = SpadViTModel.from_pretrained(tmp_path, in_channels=1, pos_embed_shape=(4, 4, 4)).eval()
    assert list(grey.pos_embed.shape) == [1, 32, 4, 4, 4]
    x = _volume(1, channels=1, shape=(16, 64, 64))
    with torch.no_grad():
        # With the table resampled to the token grid either way, the two agree.
        expected = rgb(x.repeat(1, 3, 1, 1, 1), aniso_d=2).last_hidden_state
        torch.testing.assert_close(grey(x, aniso_d=2).last_hidden_state, expected, atol=1e-4, rtol=1e-4)
    # A model saved after adaptation reloads as is (no second adaptation).
    grey.save_pretrained(tmp_path / "grey")
    again = SpadViTModel.from_pretrained(tmp_path / "grey").eval()
    torch.testing.assert_close(again.patch_embed.proj.weight, grey.patch_embed.proj.weight, atol=0, rtol=0)


def test_partial_mask_layers_match_full_sequence_when_nothing_is_masked() -> None:
    """With no masked token, MAE-style visible-only blocks see exactly the full sequence."""
    model = SpadViTModel(SpadViTConfig(**OTHER_VIT), use_mask_token=True).eval()
    x = _volume(2)
    with torch.no_grad():
        plain = model(x, spacing=(2.0, 0.5, 0.5)).last_hidden_state
        visible_all = model(x, spacing=(2.0, 0.5, 0.5), bool_masked_pos=torch.zeros(2, 8, dtype=torch.bool))
    torch.testing.assert_close(visible_all.last_hidden_state, plain, atol=1e-5, rtol=1e-5)


def test_mim_random_mask_ratio_and_tokenizer_targets() -> None:
    config = SpadViTConfig(**OTHER_VIT)
    tokenizer = SpadVTModel(
        SpadVTConfig(
            downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], codebook_size=24, embedding_dim=16
        )
    ).eval()
    model = SpadViTForMaskedImageModeling(config, tokenizer=tokenizer).train()
    x = _volume(2, shape=(16, 32, 32))
    out = model(x, spacing=(2.0, 0.5, 0.5), tokenizer_pixel_values=x.clamp(-1, 1))
    length = 4 * 2 * 2
    assert out.bool_masked_pos.shape == (2, length)
    assert (out.bool_masked_pos.sum(1) == length - int(length * 0.45)).all()
    assert out.logits.shape == (int(out.bool_masked_pos.sum()), 24)
    out.loss.backward()
    assert all(p.grad is None for p in tokenizer.parameters()) and not tokenizer.training
    assert model.spad_vit.mask_token.grad is not None
    with pytest.raises(ValueError, match="codes"):
        model.set_tokenizer(
            SpadVTModel(
                SpadVTConfig(
                    downsample_channels=[8, 8, 16],
                    upsample_channels=[8, 8, 16],
                    codebook_size=12,
                    embedding_dim=16,
                )
            )
        )


def test_mim_tokenizer_is_not_saved(tmp_path: Path) -> None:
    tokenizer = SpadVTModel(
        SpadVTConfig(
            downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], codebook_size=24, embedding_dim=16
        )
    )
    SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT), tokenizer=tokenizer).save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if k.startswith("tokenizer.")]  # noqa: SIM118 (not a dict)
    assert SpadViTForMaskedImageModeling.from_pretrained(tmp_path).tokenizer is None


def test_segmentation_input_too_small_for_the_decoder() -> None:
    model = SpadViTForSemanticSegmentation(TestSpadViTForSemanticSegmentationCommon().make_config()).eval()
    with pytest.raises(ValueError, match="single voxel"):
        model(_volume(1, channels=1, shape=(8, 32, 32)))


def test_segmentation_loss_and_deep_supervision() -> None:
    config = TestSpadViTForSemanticSegmentationCommon().make_config()
    model = SpadViTForSemanticSegmentation(config).train()
    inputs = TestSpadViTForSemanticSegmentationCommon().make_inputs()
    out = model(**inputs)
    assert out.logits.shape == (2, 3, 8, 32, 64)
    assert [tuple(t.shape[2:]) for t in out.auxiliary_logits] == [(8, 16, 32), (8, 8, 16), (4, 4, 8)]
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.eval()(**inputs).auxiliary_logits is None


# --- the conversion command line -----------------------------------------------------------------------


def _upstream_state(model: SpadViTForMaskedImageModeling) -> dict[str, torch.Tensor]:
    return {k.removeprefix("spad_vit."): v.clone() for k, v in model.state_dict().items()}


def test_conversion_script_from_lightning_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT)).eval()
    checkpoint = tmp_path / "pumit.ckpt"
    torch.save(
        {
            "state_dict": _upstream_state(model),
            "epoch": 3,
            "hyper_parameters": {"root": pathlib.PosixPath("/d")},
        },
        checkpoint,
    )
    script = Path(__file__).resolve().parents[3] / "conversion" / "convert_spad_original_to_hf.py"
    config = json.dumps({"num_attention_heads": 2, "mask_layer_ids": [2], "out_indices": [0, 1, 2, 2]})
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(tmp_path / "out"),
            "--config",
            config,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (tmp_path / "out" / name).is_file()
    backbone = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(backbone) is SpadViTModel
    x = _volume(1)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(x, spacing=(2.0, 0.5, 0.5)).last_hidden_state,
            model.spad_vit(x, spacing=(2.0, 0.5, 0.5)).last_hidden_state,
            atol=0,
            rtol=0,
        )
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "medfm" and "spad" in card.data.tags
    assert "Not for clinical use" in card.text and "pumit.ckpt" in card.text


def test_conversion_refuses_unknown_pickled_types_unless_trusted(tmp_path: Path) -> None:
    from medfm.errors import CorruptFileError
    from medfm.models.spad.convert_spad import load_original_state_dict

    model = SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT))
    checkpoint = tmp_path / "odd.ckpt"
    torch.save({"state_dict": _upstream_state(model), "callbacks": {"x": _Opaque()}}, checkpoint)
    with pytest.raises(CorruptFileError, match="trust"):
        load_original_state_dict(checkpoint)
    assert "cls_token" in load_original_state_dict(checkpoint, trust_checkpoint=True)


def test_conversion_needs_heads_for_unusual_widths(tmp_path: Path) -> None:
    from medfm.models.spad.convert_spad import infer_vit_config

    state = _upstream_state(SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT)))
    with pytest.raises(ValueError, match="num_attention_heads"):
        infer_vit_config(state)


class _Opaque:
    """A type no allow-list knows."""


# --- behaviour the review found untested ----------------------------------------------------------------


def test_mim_per_sample_masks_match_single_runs() -> None:
    """Each sample has its own mask and RoPE angles: batched logits rows equal the single-sample runs."""
    model = SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT)).eval()
    x = _volume(2)
    visible = torch.tensor([[0, 3, 5, 6], [1, 2, 4, 7]])
    targets = torch.randn(2, 8, 24)
    with torch.no_grad():
        batch = model(
            x,
            spacing=(2.0, 0.5, 0.5),
            visible_indices=visible,
            target_logits=targets,
            output_hidden_states=True,
        )
        rows = []
        for i in range(2):
            single = model(
                x[i : i + 1],
                spacing=(2.0, 0.5, 0.5),
                visible_indices=visible[i : i + 1],
                target_logits=targets[i : i + 1],
                output_hidden_states=True,
            )
            rows.append(single.logits)
            for whole, one in zip(batch.hidden_states, single.hidden_states):
                torch.testing.assert_close(whole[i : i + 1], one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.logits, torch.cat(rows), atol=1e-5, rtol=1e-5)


def test_random_masks_differ_between_samples() -> None:
    model = SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT)).train()
    torch.manual_seed(0)
    out = model(_volume(8, shape=(16, 64, 64)), spacing=(2.0, 0.5, 0.5), target_logits=torch.randn(8, 64, 24))
    masks = {tuple(row.tolist()) for row in out.bool_masked_pos}
    assert len(masks) == 8 and (out.bool_masked_pos.sum(1) == 64 - int(64 * 0.45)).all()


@pytest.mark.parametrize("mask_layer_ids", [None, [2]])
def test_which_blocks_see_mask_tokens(mask_layer_ids) -> None:
    """Mask layers see the mask tokens (BEiT-style, all of them when None); the others only the visible ones."""
    model = SpadViTModel(
        SpadViTConfig(**{**OTHER_VIT, "mask_layer_ids": mask_layer_ids}), use_mask_token=True
    ).eval()
    x, visible = _volume(1), torch.tensor([[0, 2, 5, 7]])
    runs = []
    with torch.no_grad():
        for seed in (1, 2):  # change the mask token (not by a constant: LayerNorm would undo that)
            model.mask_token.data = torch.randn(
                model.mask_token.shape, generator=torch.Generator().manual_seed(seed)
            )
            runs.append(model(x, spacing=(2.0, 0.5, 0.5), visible_indices=visible, output_hidden_states=True))
    seen_by = [
        not torch.allclose(a[:, 1:][:, visible[0]], b[:, 1:][:, visible[0]])
        for a, b in zip(runs[0].hidden_states[1:], runs[1].hidden_states[1:])
    ]
    # Visible tokens of a block change once any block up to it has seen the mask tokens.
    assert seen_by == ([True, True, True] if mask_layer_ids is None else [False, False, True])


@pytest.mark.parametrize(
    ("patch_depth", "depth_factors"),
    [(16, (2, 2, 2)), (8, (2, 2, 2)), (4, (2, 2, 2)), (2, (1, 2, 2))],  # (f3, f4, f5) = 1 if a >= l else 2
)
def test_pyramid_depth_factors_follow_the_spec(patch_depth: int, depth_factors) -> None:
    config = TestSpadViTForSemanticSegmentationCommon().make_config()
    config.patch_size = (patch_depth, 16, 16)
    model = SpadViTForSemanticSegmentation(config).eval()
    f3, f4, f5 = depth_factors
    strides = model.pyramid.level_strides
    assert strides[0][0] * f3 * f4 == patch_depth and strides[1][0] * f4 == patch_depth
    assert strides[3][0] == patch_depth * f5
    depth = strides[3][0] * 2
    with torch.no_grad():
        out = model(_volume(1, channels=1, shape=(depth, 64, 64)))
    assert out.logits.shape == (1, 3, depth, 64, 64)


def test_rope_rescaled_positions() -> None:
    from medfm.layers import Rope3D

    rope = Rope3D(16, (2333.0, 10000.0, 10000.0), rescale_shape=(4, -1, 8))
    plain = Rope3D(16, (2333.0, 10000.0, 10000.0))
    grid = (2, 3, 4)
    freq_depth, freq_height, freq_width = plain.frequencies()
    d, h, w = torch.meshgrid(
        torch.arange(2) * 4 / 2, torch.arange(3.0), torch.arange(4) * 8 / 4, indexing="ij"
    )
    expected = d.reshape(-1, 1) * freq_depth + torch.cat(
        [h.reshape(-1, 1) * freq_height, w.reshape(-1, 1) * freq_width], dim=-1
    )
    torch.testing.assert_close(rope.angles(grid), expected)
    torch.testing.assert_close(
        plain.angles(grid)[:, :4],
        (torch.arange(24) // 12).view(-1, 1) * freq_depth[:4]
        + (torch.arange(24) // 4 % 3).view(-1, 1) * freq_height,
    )


def test_deep_supervision_loss_weights() -> None:
    from monai.losses import DiceCELoss

    config = TestSpadViTForSemanticSegmentationCommon().make_config()
    model = SpadViTForSemanticSegmentation(config).train()
    inputs = TestSpadViTForSemanticSegmentationCommon().make_inputs()
    out = model(**inputs)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
    target = inputs["labels"].unsqueeze(1)
    heads = [out.logits, *out.auxiliary_logits]
    per_head = [
        criterion(
            torch.nn.functional.interpolate(h, size=target.shape[2:], mode="trilinear")
            if h.shape[2:] != target.shape[2:]
            else h,
            target,
        )
        for h in heads
    ]
    expected = sum(w * term for w, term in zip([8 / 15, 4 / 15, 2 / 15, 1 / 15], per_head))
    torch.testing.assert_close(out.loss, expected)
    model.config.deep_supervision = False
    torch.testing.assert_close(model(**inputs).loss, criterion(model(**inputs).logits, target))


def test_tokenizer_given_to_from_pretrained_is_left_alone(tmp_path: Path) -> None:
    SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT)).save_pretrained(tmp_path)
    tokenizer = SpadVTModel(
        SpadVTConfig(
            downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], codebook_size=24, embedding_dim=16
        )
    )
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    model = SpadViTForMaskedImageModeling.from_pretrained(tmp_path, tokenizer=tokenizer)
    assert model.tokenizer is tokenizer and "tokenizer" not in dict(model.named_children())
    assert all(torch.equal(before[k], v) for k, v in tokenizer.state_dict().items())
    assert not any(p.requires_grad for p in tokenizer.parameters()) and not tokenizer.training


def test_from_pretrained_overrides_given_as_ints(tmp_path: Path) -> None:
    """The MedMNIST-3D recipe: a fixed 16^3 patch and a 10^3 table, given as plain ints."""
    SpadViTForMaskedImageModeling(SpadViTConfig(**OTHER_VIT)).save_pretrained(tmp_path)
    model = SpadViTForImageClassification.from_pretrained(
        tmp_path, patch_size=16, adaptive_patch_embed=False, pos_embed_shape=10, num_labels=3
    )
    assert model.config.patch_size == [16, 16, 16] and model.config.pos_embed_shape == [10, 10, 10]
    assert list(model.spad_vit.pos_embed.shape) == [1, 32, 10, 10, 10]
    assert SpadViTConfig(
        patch_size=(16, 16, 16)
    ).adaptive_patch_embed  # a tuple cube is a valid adaptive patch


def test_segmentation_refuses_adaptive_configs_and_odd_sizes() -> None:
    with pytest.raises(ValueError, match="needs a fixed patch"):
        SpadViTForSemanticSegmentation(SpadViTConfig(**OTHER_VIT))
    model = SpadViTForSemanticSegmentation(TestSpadViTForSemanticSegmentationCommon().make_config()).eval()
    with pytest.raises(ValueError, match="not a multiple of the coarsest pyramid stride"):
        model(_volume(1, channels=1, shape=(8, 48, 80)))


def test_classification_loss_settles_the_problem_per_call() -> None:
    """Integer multi-hot targets train a multi-label head; the first batch does not fix the problem type in
    the config (transformers' loss would write it there), so soft targets work after integer ones."""
    x = _volume(2)
    multi = SpadViTForImageClassification(
        SpadViTConfig(**OTHER_VIT, num_labels=3, problem_type="multi_label_classification")
    )
    logits = multi(x, spacing=(2.0, 0.5, 0.5)).logits
    loss = multi(x, spacing=(2.0, 0.5, 0.5), labels=torch.tensor([[0, 1, 1], [1, 0, 0]])).loss
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([[0.0, 1, 1], [1, 0, 0]])
    )
    torch.testing.assert_close(loss, expected)
    model = SpadViTForImageClassification(SpadViTConfig(**OTHER_VIT, num_labels=3))
    hard = model(x, spacing=(2.0, 0.5, 0.5), labels=torch.tensor([0, 2])).loss
    torch.testing.assert_close(
        hard,
        torch.nn.functional.cross_entropy(model(x, spacing=(2.0, 0.5, 0.5)).logits, torch.tensor([0, 2])),
    )
    assert model.config.problem_type is None
    soft = model(x, spacing=(2.0, 0.5, 0.5), labels=torch.full((2, 3), 0.5)).loss
    assert torch.isfinite(soft)


def test_a_single_slice_is_two_d_whatever_its_thickness() -> None:
    """A 2D image's spacing may carry a slice thickness (5 mm here); it still runs at aniso_d 5 (spec: 2D
    images get z-spacing 1e8), instead of failing on a depth patch of 2."""
    model = SpadViTModel(SpadViTConfig(**OTHER_VIT)).eval()
    image = torch.randn(1, 3, 1, 32, 48)
    assert model.resolve_aniso_d(image, torch.tensor([5.0, 0.53, 0.53]), None) == 5
    with torch.no_grad():
        thick = model(image, spacing=(5.0, 0.53, 0.53)).last_hidden_state
        plain = model(image[:, :, 0]).last_hidden_state
    torch.testing.assert_close(thick, plain)


def test_segmentation_states_its_smallest_window() -> None:
    from medfm.inference import check_roi_size, default_roi_size

    model = SpadViTForSemanticSegmentation(TestSpadViTForSemanticSegmentationCommon().make_config()).eval()
    assert model.required_input_multiple() == (8, 32, 32)
    with pytest.raises(ValueError, match="single voxel"):
        check_roi_size(model, (8, 32, 32))  # one coarse voxel: instance norm would fail inside the forward
    assert check_roi_size(model, (8, 32, 64)) == (8, 32, 64)
    with pytest.raises(ValueError, match="multiple of"):
        check_roi_size(model, (8, 30, 64))
    assert default_roi_size(model, (8, 32, 32)) == (8, 32, 64)
