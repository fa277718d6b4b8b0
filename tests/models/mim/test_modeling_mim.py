"""MiM on tiny configs unlike the fixture's (non-cubic grids, other depths, heads, MLP ratios, strides,
channels, mask ratios and sample counts): the common model tests, pre-training behaviour, the encoder's
variants, input and config errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from medfm.errors import InvalidConfigError, VolumeShapeError
from medfm.layers.relative_position import relative_position_index
from medfm.models.mim import (
    MiMConfig,
    MiMForImageClassification,
    MiMForPreTraining,
    MiMForSemanticSegmentation,
    MiMModel,
    MiMNoise,
)
from medfm.models.mim.modeling_mim import MiMRelativePositionBias

from ...common.model_tests import CommonModelTests
from .conftest import TINY_A, TINY_B

pytestmark = pytest.mark.usefixtures("register_mim_auto_classes")


def _volume(batch: int, channels: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, *shape, generator=torch.Generator().manual_seed(seed))


# --- the common model tests -------------------------------------------------------------------------------


class TestMiMModelCommon(CommonModelTests):
    """Non-cubic 32 x 64 x 32 input with the fpn, relative bias and layer scale."""

    model_class = MiMModel
    auto_class = AutoModel

    def make_config(self):
        return MiMConfig(**TINY_A)

    def make_inputs(self, batch_size=2, two_d=False):
        return {"pixel_values": _volume(batch_size, 1, (32, 64, 32))}


class TestMiMForImageClassificationCommon(CommonModelTests):
    """Stride-8 stages (one of stride 1, one stage without blocks), two channels, no layer scale."""

    model_class = MiMForImageClassification
    auto_class = AutoModelForImageClassification

    def make_config(self):
        return MiMConfig(**{**TINY_B, "layer_scale_init_value": None}, num_labels=3)

    def make_inputs(self, batch_size=2, two_d=False):
        return {"pixel_values": _volume(batch_size, 2, (16, 24, 16)), "labels": torch.arange(batch_size) % 3}


class TestMiMForSemanticSegmentationCommon(CommonModelTests):
    model_class = MiMForSemanticSegmentation
    auto_class = AutoModelForSemanticSegmentation

    def make_config(self):
        return MiMConfig(**TINY_A, num_labels=3)

    def make_inputs(self, batch_size=2, two_d=False):
        labels = torch.randint(0, 3, (batch_size, 32, 64, 32), generator=torch.Generator().manual_seed(3))
        return {"pixel_values": _volume(batch_size, 1, (32, 64, 32)), "labels": labels}


# --- pre-training ---------------------------------------------------------------------------------------


def _pretraining(config_fields: dict, **overrides) -> MiMForPreTraining:
    torch.manual_seed(0)
    return MiMForPreTraining(MiMConfig(**{**config_fields, **overrides})).eval()


def _crops(config: MiMConfig, batch: int, seed: int = 0) -> torch.Tensor:
    return _volume(batch, config.num_channels, config.crop_size, seed)


@pytest.mark.parametrize("fields", [TINY_A, TINY_B], ids=["A", "B"])
def test_pretraining_output_shapes_and_selection_rules(fields) -> None:
    model = _pretraining(fields)
    config = model.config
    batch, su, sd, tokens = 2, config.num_mid_volumes, config.num_down_patches, config.num_tokens
    patch = config.total_stride**3 * config.num_channels
    with torch.no_grad():
        out = model(_crops(config, batch), output_hidden_states=True)
    rows = {"up": batch, "mid": batch * su, "down": batch * su * sd}
    ratios = {"up": config.mask_ratio_up, "mid": config.mask_ratio_mid, "down": config.mask_ratio_down}
    for level, n in rows.items():
        keep = int(tokens * (1 - ratios[level]))
        assert getattr(out, f"logits_{level}").shape == (n, tokens, patch)
        assert getattr(out, f"mask_{level}").shape == (n, tokens)
        assert (getattr(out, f"mask_{level}").sum(1) == tokens - keep).all()
        assert getattr(out, f"latent_{level}").shape == (n, keep, config.hidden_size)
        assert getattr(out, f"decoder_hidden_{level}").shape == (n, tokens, config.decoder_hidden_size)
    assert [tuple(v.shape) for v in out.level_inputs] == [
        (n, config.num_channels, *config.image_size) for n in rows.values()
    ]
    assert out.losses.shape == (5,) and torch.isfinite(out.losses).all() and torch.isfinite(out.loss)
    # Up masking: whole groups of N/8 consecutive tokens (quirk Q1).
    groups = out.mask_up.view(batch, 8, -1)
    assert torch.equal(groups.amin(2), groups.amax(2))
    # Mid volumes are octants of masked groups; down patches are masked mid tokens.
    labels_mid = out.labels_mid.view(batch, su)
    assert bool(groups.amax(2).gather(1, labels_mid).all())
    assert bool(out.mask_mid.gather(1, out.labels_down.view(batch * su, sd)).all())
    # Each mid input is its octant of the crop (index 4h + 2w + d).
    crops = _crops(config, batch)
    size = config.image_size
    for row, octant in enumerate(out.labels_mid.tolist()):
        h, w, d = octant // 4, (octant // 2) % 2, octant % 2
        region = crops[row // su, :, h * size[0] : (h + 1) * size[0], w * size[1] : (w + 1) * size[1]]
        assert torch.equal(out.level_inputs[1][row], region[..., d * size[2] : (d + 1) * size[2]])


def test_pretraining_noise_none_draws_in_upstream_order() -> None:
    model = _pretraining(TINY_A)
    config = model.config
    crops = _crops(config, 1)
    torch.manual_seed(7)
    with torch.no_grad():
        drawn = model(crops)
    torch.manual_seed(7)
    noise = {name: torch.rand(shape) for name, shape in MiMNoise.shapes(1, config).items()}
    with torch.no_grad():
        replayed = model(crops, noise=MiMNoise(**noise))
        partial = model(
            crops, noise={"noise_up_groups": noise["up_groups"], **{k: noise[k] for k in ("mid", "down")}}
        )
    for name in ("losses", "logits_down", "mask_up", "labels_mid", "labels_down"):
        assert torch.equal(getattr(drawn, name), getattr(replayed, name)), name
    assert torch.equal(partial.mask_up, replayed.mask_up) and torch.equal(partial.mask_mid, replayed.mask_mid)
    with pytest.raises(ValueError, match=r"noise 'mid' must have shape \(2, 16\)"):
        model(crops, noise={"mid": torch.rand(3, 16)})
    with pytest.raises(ValueError, match="unknown noise keys"):
        model(crops, noise={"shuffle": torch.rand(1, 8)})


def _split_noise(noise: dict[str, torch.Tensor], config: MiMConfig, sample: int) -> dict[str, torch.Tensor]:
    su, sd = config.num_mid_volumes, config.num_down_patches
    per = {"up_groups": 1, "select_mid": 1, "mid": su, "select_down": su, "down": su * sd}
    return {k: v[sample * per[k] : (sample + 1) * per[k]] for k, v in noise.items()}


def test_pretraining_batch_equals_single_samples() -> None:
    model = _pretraining(TINY_B)
    config = model.config
    crops = _crops(config, 2)
    noise = {name: torch.rand(shape) for name, shape in MiMNoise.shapes(2, config).items()}
    with torch.no_grad():
        whole = model(crops, noise=noise)
        singles = [model(crops[i : i + 1], noise=_split_noise(noise, config, i)) for i in range(2)]
    for level in ("up", "mid", "down"):
        for name in ("logits", "mask", "latent", "decoder_hidden"):
            joined = torch.cat([getattr(s, f"{name}_{level}") for s in singles])
            torch.testing.assert_close(getattr(whole, f"{name}_{level}"), joined, atol=1e-5, rtol=1e-4)
    assert torch.equal(whole.labels_down, torch.cat([s.labels_down for s in singles]))
    # Every sample masks as many tokens, so the batch reconstruction loss is the mean of the samples'.
    torch.testing.assert_close(whole.losses[:3], torch.stack([s.losses[:3] for s in singles]).mean(0))


def test_pretraining_eager_and_sdpa_agree(tmp_path) -> None:
    _pretraining(TINY_A).save_pretrained(tmp_path)
    noise = {name: torch.rand(shape) for name, shape in MiMNoise.shapes(1, MiMConfig(**TINY_A)).items()}
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = MiMForPreTraining.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs.append(model(_crops(model.config, 1), noise=noise))
    for name in ("losses", "logits_up", "decoder_hidden_down", "latent_mid"):
        torch.testing.assert_close(getattr(outputs[0], name), getattr(outputs[1], name), atol=1e-5, rtol=1e-4)


def test_pretraining_save_load_round_trip_keeps_frozen_tables(tmp_path) -> None:
    model = _pretraining(TINY_B)
    model.save_pretrained(tmp_path)
    reloaded = MiMForPreTraining.from_pretrained(tmp_path).eval()
    assert not reloaded.mim.pos_embed.requires_grad and not reloaded.decoder_pos_embed.requires_grad
    noise = {name: torch.rand(shape) for name, shape in MiMNoise.shapes(1, model.config).items()}
    crops = _crops(model.config, 1)
    with torch.no_grad():
        a, b = model(crops, noise=noise), reloaded(crops, noise=noise)
    for name in ("loss", "logits_down", "decoder_hidden_up"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_pretraining_checkpointing_gives_the_same_gradients() -> None:
    config = MiMConfig(**TINY_A)
    crops = _crops(config, 1)
    noise = {name: torch.rand(shape) for name, shape in MiMNoise.shapes(1, config).items()}
    gradients = []
    for checkpointing in (False, True):
        model = _pretraining(TINY_A).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_activation_checkpointing
        model(crops, noise=noise).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("alignment", ["released", "paper"])
def test_pretraining_every_trainable_parameter_gets_a_gradient(alignment) -> None:
    """DDP with ``find_unused_parameters=False`` needs a gradient on every trainable parameter; in the released
    mode ``aggregate_pred_up_feature`` takes part with weight 0 (quirk Q2), in the paper mode for real."""
    model = _pretraining(TINY_A, alignment=alignment).train()
    model(_crops(model.config, 1)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert not any(p.requires_grad for p in (model.mim.pos_embed, model.decoder_pos_embed))
    up_grad = sum(float(p.grad.abs().sum()) for p in model.aggregate_pred_up_feature.parameters())
    assert (up_grad == 0) == (alignment == "released")


def test_pretraining_loss_falls_on_a_smooth_volume() -> None:
    model = _pretraining(TINY_A).train()
    config = model.config
    axes = [torch.linspace(0, 1, n) for n in config.crop_size]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    crop = (0.5 + 0.25 * torch.sin(6 * z) * torch.cos(4 * y) + 0.2 * x)[None, None]
    noise = {name: torch.rand(shape) for name, shape in MiMNoise.shapes(1, config).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, reconstruction = [], []
    for _ in range(12):
        outputs = model(crop, noise=noise)
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        losses.append(outputs.loss.item())
        reconstruction.append(outputs.losses[:3].sum().item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert reconstruction[-1] < 0.9 * reconstruction[0], reconstruction


def test_pretraining_input_errors() -> None:
    model = _pretraining(TINY_B)
    with pytest.raises(VolumeShapeError, match=r"crops of 2 \* image_size = \(32, 32, 32\)"):
        model(torch.rand(1, 2, 32, 32, 16))
    with pytest.raises(VolumeShapeError, match="has 1 channels"):
        model(torch.rand(1, 1, 32, 32, 32))
    with pytest.raises(VolumeShapeError, match=r"\(B, C, D1, D2, D3\)"):
        model(torch.rand(2, 32, 32, 32))
    assert model.required_input_multiple() == (32, 32, 32)


# --- the encoder ----------------------------------------------------------------------------------------


def test_fine_tuning_encoder_with_identity_scale_and_zero_bias_is_the_pretraining_encoder() -> None:
    """Spec §1.2: with gamma = 1 and an all-zero relative table the fine-tuning blocks equal the pre-training
    ones, so a pre-trained encoder loads (strict=False: the new parameters keep their init) unchanged."""
    config = MiMConfig(**TINY_A)
    pretraining = MiMModel(config, pretraining=True).eval()
    fine_tuning = MiMModel(config, add_fpn=False).eval()
    assert pretraining.fpn is None and pretraining.blocks4[0].gamma_1 is None
    assert pretraining.blocks4[0].attn.relative_position_bias is None
    result = fine_tuning.load_state_dict(pretraining.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(
        k.endswith(("gamma_1", "gamma_2", "relative_position_bias_table")) for k in result.missing_keys
    )
    pixel_values = _volume(2, 1, (32, 64, 32))
    with torch.no_grad():
        a = pretraining(pixel_values, normalize=False)
        b = fine_tuning(pixel_values, normalize=False)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-6, rtol=1e-5)


def test_relative_bias_for_other_grids() -> None:
    torch.manual_seed(0)
    bias = MiMRelativePositionBias((3, 4, 2), 2)
    with torch.no_grad():
        bias.relative_position_bias_table.normal_()
    full = bias()
    assert torch.equal(bias((3, 4, 2)), full)
    # A smaller grid: exactly the bias between the same coordinates of the configured grid.
    small = (2, 3, 1)
    coords = list(itertools.product(*[range(g) for g in small]))
    rows = [c[0] * 8 + c[1] * 2 + c[2] for c in coords]
    assert torch.equal(bias(small), full[:, rows][:, :, rows])
    # A larger grid: stretched offsets; offset zero (the diagonal) keeps its value.
    large = bias((4, 6, 3))
    assert large.shape == (2, 72, 72) and torch.isfinite(large).all()
    torch.testing.assert_close(large.diagonal(dim1=1, dim2=2), full[:, :1, 0].expand(2, 72))


def test_encoder_runs_on_other_sizes_and_normalises_its_maps() -> None:
    torch.manual_seed(0)
    model = MiMModel(MiMConfig(**TINY_A)).eval()
    with torch.no_grad():
        raw = model(_volume(1, 1, (64, 64, 32)), normalize=False)  # grid 4 x 4 x 2 vs configured 2 x 4 x 2
        normed = model(_volume(1, 1, (64, 64, 32)), output_hidden_states=True)
    assert raw.last_hidden_state.shape == (1, 32, 24)
    assert [tuple(m.shape[1:]) for m in raw.feature_maps] == [
        (4, 32, 32, 16),
        (8, 16, 16, 8),
        (12, 8, 8, 4),
        (24, 4, 4, 2),
        (16, 2, 2, 1),
    ]
    torch.testing.assert_close(normed.last_hidden_state, raw.last_hidden_state)
    torch.testing.assert_close(normed.pooler_output, raw.last_hidden_state.mean(1))
    assert normed.hidden_states is normed.feature_maps
    for plain, scaled in zip(raw.feature_maps, normed.feature_maps):
        torch.testing.assert_close(scaled.mean(1), torch.zeros_like(scaled[:, 0]), atol=1e-5, rtol=0)
        expected = torch.nn.functional.layer_norm(plain.movedim(1, -1), (plain.shape[1],), eps=1e-5).movedim(
            -1, 1
        )
        torch.testing.assert_close(scaled, expected)


def test_attentions_and_input_require_grads() -> None:
    torch.manual_seed(0)
    model = MiMModel(MiMConfig(**TINY_A))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.eval()(_volume(2, 1, (32, 64, 32)), output_attentions=True)
    assert len(out.attentions) == 2 and all(a.shape == (2, 3, 16, 16) for a in out.attentions)
    assert model.get_input_embeddings() is model.patch_embed1
    model.requires_grad_(False)
    model.enable_input_require_grads()
    model.activation_checkpointing_enable()
    model.train()
    assert model(_volume(2, 1, (32, 64, 32))).last_hidden_state.requires_grad


def test_contract_and_input_errors() -> None:
    config = MiMConfig(**TINY_A, num_labels=2)
    backbone, segmenter = MiMModel(config), MiMForSemanticSegmentation(config)
    classifier = MiMForImageClassification(config)
    assert backbone.required_input_multiple() == (32, 32, 32) and classifier.required_input_multiple() == (
        16,
        16,
        16,
    )
    assert backbone.pooling == "mean" and backbone.num_prefix_tokens == 0 and not backbone.accepts_spacing
    with pytest.raises(VolumeShapeError, match="multiple of"):
        backbone(_volume(1, 1, (32, 48, 32)))
    with pytest.raises(VolumeShapeError, match="has 2 channels"):
        classifier(_volume(1, 2, (32, 48, 32)))
    with pytest.raises(VolumeShapeError, match="single voxel"):
        segmenter(_volume(1, 1, (32, 32, 32)))
    with pytest.raises(VolumeShapeError, match="labels must be"):
        segmenter(_volume(1, 1, (32, 64, 32)), labels=torch.zeros(1, 32, 32, 32, dtype=torch.long))
    classifier.eval()(_volume(1, 1, (32, 48, 32)))  # the classifier needs only the patch stride


def test_segmentation_loss_is_upstreams_dice_ce() -> None:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = MiMForSemanticSegmentation(MiMConfig(**TINY_A, num_labels=3)).eval()
    labels = torch.randint(0, 3, (1, 32, 64, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(_volume(1, 1, (32, 64, 32)), labels=labels)
    reference = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    torch.testing.assert_close(out.loss, reference(out.logits, labels[:, None]))


def test_from_pretrained_refuses_dropping_blocks(tmp_path) -> None:
    MiMModel(MiMConfig(**TINY_A)).save_pretrained(tmp_path)
    with pytest.raises(InvalidConfigError, match="would drop 1"):
        MiMModel.from_pretrained(tmp_path, depths=[1, 1, 1, 1])


# --- config ---------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip() -> None:
    config = MiMConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_tokens) == (384, 11, 216)
    assert (
        config.token_grid == [6, 6, 6] and config.crop_size == [192, 192, 192] and config.feature_size == 48
    )
    config = MiMConfig(image_size=64, embed_dims=(6, 12, 18, 48), num_attention_heads=4)
    assert config.image_size == [64, 64, 64] and config.embed_dims == [6, 12, 18, 48]
    again = MiMConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.image_size = (32, 48, 64)
    assert config.image_size == [32, 48, 64]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"embed_dims": [4, 8, 24]}, "embed_dims must be a list of 4"),
        ({"depths": [1, 1, 1, 0]}, r"depths\[3\]"),
        ({"patch_sizes": [2, 2, 0, 2]}, "patch_sizes must be a list of 4 integers >= 1"),
        ({"image_size": [96, 96]}, "image_size must be a list of 3"),
        ({"image_size": [96, 96, 40]}, "multiple of the total patch stride"),
        ({"num_attention_heads": 5}, "does not divide embed_dims"),
        ({"embed_dims": [4, 8, 16, 32], "num_attention_heads": 4}, "divisible by 6"),
        ({"mask_ratio_mid": 1.0}, r"mask_ratio_mid must be a finite number in \[0, 1\)"),
        ({"mask_ratio_up": -0.1}, "mask_ratio_up"),
        ({"alignment": "intended"}, "alignment must be one of"),
        ({"loss_weight_mode": "cosine"}, "loss_weight_mode must be one of"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"conv_layer_norm_eps": -1e-5}, "conv_layer_norm_eps"),
        ({"loss_weights": [1, 1, 1, 0.1]}, "loss_weights must be 5"),
        ({"mlp_ratios": [4, 4, 0, 4]}, "mlp_ratios"),
        ({"num_channels": 0}, "num_channels must be an integer >= 1"),
        ({"qkv_bias": 1}, "qkv_bias must be true or false"),
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
    ],
)
def test_invalid_configs(overrides, match) -> None:
    with pytest.raises(InvalidConfigError, match=match):
        MiMConfig(**overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": [16, 32, 48]}, "multiple of 8 tokens"),
        ({"mask_ratio_up": 0.6}, "not a whole number of groups"),
        ({"mask_ratio_up": 0.999}, "leaves no visible token"),
        ({"num_mid_volumes": 9}, "at most 8"),
        ({"num_down_patches": 217}, "at most the 216 patches"),
        ({"num_mid_volumes": 4, "num_down_patches": 2}, "num_mid_volumes .4. <= num_down_patches .2."),
        ({"decoder_num_attention_heads": 7}, "does not divide decoder_hidden_size"),
        ({"decoder_hidden_size": 64, "decoder_num_attention_heads": 4}, "divisible by 6"),
    ],
)
def test_pretraining_config_rules(overrides, match) -> None:
    config = MiMConfig(**overrides)  # a valid fine-tuning config ...
    with pytest.raises(InvalidConfigError, match=match):  # ... that pre-training refuses
        config.check_pretraining()
    if "num_down_patches" in overrides and overrides.get("num_mid_volumes") == 4:
        MiMConfig(
            **overrides, alignment="paper"
        ).check_pretraining()  # the paper mode reshapes per mid volume


def test_segmentation_config_rule() -> None:
    config = MiMConfig(embed_dims=[6, 12, 18, 30], num_attention_heads=5)
    MiMForImageClassification(config)  # fine without the decoder
    with pytest.raises(InvalidConfigError, match="embed_dims\\[3\\] / 8"):
        MiMForSemanticSegmentation(config)


def test_round_trip_rebuilds_the_relative_index_and_keeps_trained_tables(tmp_path) -> None:
    """The index buffer is not saved: after from_pretrained (built on the meta device) it is rebuilt, so a
    trained (non-zero) table gives the same outputs."""
    torch.manual_seed(0)
    model = MiMModel(MiMConfig(**TINY_A)).eval()
    with torch.no_grad():
        for block in model.blocks4:
            block.attn.relative_position_bias.relative_position_bias_table.normal_()
            block.gamma_1.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    reloaded = MiMModel.from_pretrained(tmp_path).eval()
    index = relative_position_index(reloaded.config.token_grid)
    for block in reloaded.blocks4:
        assert torch.equal(block.attn.relative_position_bias.relative_position_index, index)
    pixel_values = _volume(1, 1, (32, 64, 32))
    with torch.no_grad():
        assert torch.equal(model(pixel_values).last_hidden_state, reloaded(pixel_values).last_hidden_state)


def test_pretraining_checkpoint_loads_into_the_fine_tuning_models(tmp_path) -> None:
    """Upstream's fine-tuning start (spec §5.3) at the pre-training size: the encoder's weights carry over, the
    new parameters start at gamma = layer_scale_init_value, a zero relative table and a fresh fpn."""
    pretraining = _pretraining(TINY_A)
    pretraining.save_pretrained(tmp_path)
    segmenter = MiMForSemanticSegmentation.from_pretrained(tmp_path, num_labels=4)
    classifier = MiMForImageClassification.from_pretrained(tmp_path, num_labels=2)
    backbone = MiMModel.from_pretrained(tmp_path)
    source = pretraining.mim.state_dict()
    for model in (segmenter.mim, classifier.mim, backbone):
        state = model.state_dict()
        for key, value in source.items():
            assert torch.equal(state[key], value), key
        assert model.pos_embed.requires_grad  # trainable when fine-tuning
        for block in model.blocks4:
            assert torch.equal(block.gamma_1, torch.ones_like(block.gamma_1))
            assert not block.attn.relative_position_bias.relative_position_bias_table.any()
    assert torch.equal(classifier.norm.weight, pretraining.norm.weight)  # upstream keeps the final norm
    bn = segmenter.mim.fpn[1]
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)) and not bn.running_mean.any()
    assert torch.isfinite(segmenter.mim.fpn[0].weight).all() and segmenter.mim.fpn[0].weight.std() > 0
