"""MiM against tensors made by the upstream code (tests/fixtures/mim, or ``MEDFM_FIXTURES``).

Configs come from upstream_config.json and the tensors' shapes (conftest); weights are renamed by the
test-local renaming of conftest. Every tensor of expected.safetensors is compared at the tolerance
upstream_config.json gives it (``test_every_expected_tensor_has_a_check`` keeps it so).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from medfm.layers.relative_position import relative_position_index
from medfm.models.mim import (
    MiMConfig,
    MiMForImageClassification,
    MiMForPreTraining,
    MiMForSemanticSegmentation,
    resize_position_embeddings,
)
from medfm.models.mim.modeling_mim_pretraining import mim_loss_weights

from .conftest import MiMFixtures, rename_classification, rename_pretraining, rename_segmentation

LEVELS = ("up", "mid", "down")

#: The expected keys each check below covers.
CHECKED = [
    r"pretrain\.pixel_values_checksum",
    r"pretrain\.losses",
    r"pretrain\.total_loss",
    r"pretrain\.(mask|ids_restore)_(up|mid|down)",
    r"pretrain\.labels_(mid|down)",
    r"pretrain\.latent_(up|mid|down)_full",
    r"pretrain\.decoder_hidden_(up|mid|down)",
    r"pretrain\.pred_(up|mid|down)_every\d+",
    r"pretrain\.pred_(up|mid|down)_sum",
    r"pretrain\.level_input_(up|mid|down)_checksum",
    r"backbone\.hidden_states\.\d+",
    r"seg\.logits",
    r"cls\.logits",
]


def _checksum(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return torch.stack([x.sum(), x.square().sum()])


def _scatter_visible(latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Visible-token latents ``(rows, V, C)`` back at their token positions, zeros elsewhere."""
    rows, kept, width = latent.shape
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :kept]
    full = latent.new_zeros(rows, ids_restore.shape[1], width)
    return full.scatter(1, ids_keep[..., None].expand(-1, -1, width), latent)


@pytest.fixture(scope="module")
def pretraining_run(mim_fixtures: MiMFixtures):
    """The pre-training model with the upstream weights, run on the fixture crop with the replayed noise."""
    config = mim_fixtures.pretraining_config
    model = MiMForPreTraining(config).eval()
    model.load_state_dict(rename_pretraining(mim_fixtures.pretraining_state), strict=True)
    lowres = mim_fixtures.inputs["pretrain.pixel_values_lowres"]
    crops = F.interpolate(lowres, size=config.crop_size, mode="trilinear", align_corners=False)
    noise = {
        k.removeprefix("pretrain.noise_"): v
        for k, v in mim_fixtures.inputs.items()
        if k.startswith("pretrain.noise_")
    }
    with torch.no_grad():
        outputs = model(crops, noise=noise, output_hidden_states=True)
    return model, crops, noise, outputs


@pytest.fixture(scope="module")
def diffs() -> dict[str, float]:
    """Max abs differences of the float tensors compared (printed with ``-s`` by the last test)."""
    return {}


def test_every_expected_tensor_has_a_check(mim_fixtures: MiMFixtures) -> None:
    unchecked = [k for k in mim_fixtures.expected if not any(re.fullmatch(p, k) for p in CHECKED)]
    assert not unchecked, f"expected tensors without a check: {unchecked}"


def test_pretraining_input_and_scalars(mim_fixtures, pretraining_run, diffs) -> None:
    _, crops, _, outputs = pretraining_run
    mim_fixtures.assert_close(_checksum(crops), "pretrain.pixel_values_checksum", diffs)
    mim_fixtures.assert_close(outputs.losses, "pretrain.losses", diffs)
    mim_fixtures.assert_close(outputs.loss, "pretrain.total_loss", diffs)
    weights = mim_fixtures.upstream["pretraining"].get("loss_weights")
    if weights is not None:
        assert outputs.loss_weights.tolist() == pytest.approx(weights)


def test_pretraining_masks_labels_and_shuffles(mim_fixtures, pretraining_run) -> None:
    _, _, _, outputs = pretraining_run
    for level in LEVELS:
        mim_fixtures.assert_close(getattr(outputs, f"mask_{level}"), f"pretrain.mask_{level}")
        mim_fixtures.assert_close(getattr(outputs, f"ids_restore_{level}"), f"pretrain.ids_restore_{level}")
    mim_fixtures.assert_close(outputs.labels_mid, "pretrain.labels_mid")
    mim_fixtures.assert_close(outputs.labels_down, "pretrain.labels_down")
    # ids_restore_up depends on argsort's tie order (the group noise repeats); it must still restore our mask.
    restore = outputs.ids_restore_up
    assert torch.equal(torch.sort(restore, dim=1).values, torch.arange(restore.shape[1]).expand_as(restore))
    kept = int((outputs.mask_up[0] == 0).sum())
    assert torch.equal((restore >= kept).float(), outputs.mask_up)


def test_pretraining_latents_decoder_and_predictions(mim_fixtures, pretraining_run, diffs) -> None:
    _, _, _, outputs = pretraining_run
    for level in LEVELS:
        full = _scatter_visible(getattr(outputs, f"latent_{level}"), getattr(outputs, f"ids_restore_{level}"))
        key = f"pretrain.latent_{level}_full"
        mim_fixtures.assert_close(full[: mim_fixtures.expected[key].shape[0]], key, diffs)
        key = f"pretrain.decoder_hidden_{level}"
        hidden = getattr(outputs, f"decoder_hidden_{level}")
        mim_fixtures.assert_close(hidden[: mim_fixtures.expected[key].shape[0]], key, diffs)
        logits = getattr(outputs, f"logits_{level}")
        mim_fixtures.assert_close(
            torch.stack([logits.double().sum(), logits.double().abs().sum()]),
            f"pretrain.pred_{level}_sum",
            diffs,
        )
        every = [k for k in mim_fixtures.expected if re.fullmatch(rf"pretrain\.pred_{level}_every\d+", k)]
        assert every, f"no pretrain.pred_{level}_every<step> in the fixture"
        for key in every:
            step = int(key.rsplit("every", 1)[1])
            rows = mim_fixtures.expected[key].shape[0]
            mim_fixtures.assert_close(logits[:rows, :, ::step], key, diffs)


def test_pretraining_level_inputs(mim_fixtures, pretraining_run, diffs) -> None:
    _, _, _, outputs = pretraining_run
    for level, volumes in zip(LEVELS, outputs.level_inputs):
        mim_fixtures.assert_close(_checksum(volumes), f"pretrain.level_input_{level}_checksum", diffs)


def test_pretraining_sincos_tables_match_upstream(mim_fixtures) -> None:
    """A freshly built model's fixed tables are upstream's stored sin-cos tables, bit for bit."""
    model = MiMForPreTraining(mim_fixtures.pretraining_config)
    assert torch.equal(model.mim.pos_embed.detach(), mim_fixtures.pretraining_state["pos_embed"])
    assert torch.equal(model.decoder_pos_embed.detach(), mim_fixtures.pretraining_state["decoder_pos_embed"])
    assert not model.mim.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_pretraining_paper_alignment_and_schedules(mim_fixtures, pretraining_run) -> None:
    """``alignment="paper"`` changes the up-mid term only (the fixture has su == sd), and trains
    ``aggregate_pred_up_feature``; the scheduled weight modes rescale w_up and w_down as upstream's engine."""
    model, crops, noise, released = pretraining_run
    config = mim_fixtures.pretraining_config
    paper_config = type(config).from_dict({**config.to_dict(), "alignment": "paper"})
    paper = MiMForPreTraining(paper_config).eval()
    paper.load_state_dict(model.state_dict(), strict=True)
    outputs = paper(crops, noise=noise)
    assert torch.isfinite(outputs.losses).all()
    if config.num_mid_volumes == config.num_down_patches:
        torch.testing.assert_close(outputs.losses[[0, 1, 2, 4]], released.losses[[0, 1, 2, 4]])
    assert not torch.allclose(outputs.losses[3], released.losses[3])
    outputs.loss.backward()
    for name, parameter in paper.aggregate_pred_up_feature.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    base = config.loss_weights
    for progress in (0.0, 0.25, 1.0):
        angle = torch.pi * torch.tensor(progress) / 2
        lower, higher = float(torch.cos(angle) + 1), float(torch.sin(angle))
        fine = mim_loss_weights(base, "coarse_to_fine", progress)
        assert fine == pytest.approx([base[0] * lower, base[1], base[2] * higher, base[3], base[4]])
        coarse = mim_loss_weights(base, "fine_to_coarse", progress)
        assert coarse == pytest.approx([base[0] * higher, base[1], base[2] * lower, base[3], base[4]])
    scheduled = type(config).from_dict({**config.to_dict(), "loss_weight_mode": "coarse_to_fine"})
    model.config = scheduled
    try:
        with torch.no_grad():
            outputs = model(crops, noise=noise, training_progress=0.5)
        expected = mim_loss_weights(base, "coarse_to_fine", 0.5)
        assert outputs.loss_weights.tolist() == pytest.approx(expected)
        torch.testing.assert_close(outputs.losses, released.losses)
        torch.testing.assert_close(outputs.loss, (outputs.losses * torch.tensor(expected)).sum())
        with pytest.raises(ValueError, match="training_progress"):
            model(crops, noise=noise)
    finally:
        model.config = config


def _segmentation_model(mim_fixtures: MiMFixtures) -> MiMForSemanticSegmentation:
    model = MiMForSemanticSegmentation(mim_fixtures.segmentation_config).eval()
    model.load_state_dict(rename_segmentation(mim_fixtures.segmentation_state), strict=True)
    return model


def test_backbone_hidden_states_and_segmentation_logits(mim_fixtures, diffs) -> None:
    model = _segmentation_model(mim_fixtures)
    pixel_values = mim_fixtures.inputs["seg.pixel_values"]
    with torch.no_grad():
        maps = model.mim(pixel_values, normalize=False).feature_maps
        logits = model(pixel_values).logits
    keys = sorted(
        (k for k in mim_fixtures.expected if k.startswith("backbone.hidden_states.")),
        key=lambda k: int(k.rsplit(".", 1)[1]),
    )
    assert len(keys) == len(maps)
    for key, value in zip(keys, maps):
        mim_fixtures.assert_close(value, key, diffs)
    assert logits.shape[2:] == pixel_values.shape[2:]
    mim_fixtures.assert_close(logits, "seg.logits", diffs)


def test_classification_logits(mim_fixtures, diffs) -> None:
    model = MiMForImageClassification(mim_fixtures.classification_config).eval()
    model.load_state_dict(rename_classification(mim_fixtures.classification_state), strict=True)
    with torch.no_grad():
        logits = model(mim_fixtures.inputs["cls.pixel_values"]).logits
    mim_fixtures.assert_close(logits, "cls.logits", diffs)


def test_relative_position_index_matches_every_upstream_buffer(mim_fixtures) -> None:
    models = {
        "backbone.": (_segmentation_model(mim_fixtures), mim_fixtures.segmentation_state),
        "": (
            MiMForImageClassification(mim_fixtures.classification_config),
            mim_fixtures.classification_state,
        ),
    }
    compared = 0
    for prefix, (model, state) in models.items():
        buffers = dict(model.named_buffers())
        for key, stored in state.items():
            if not key.endswith("relative_position_index"):
                continue
            ours = "mim." + key.removeprefix(prefix).replace(
                "attn.relative_position_index", "attn.relative_position_bias.relative_position_index"
            )
            assert torch.equal(buffers[ours], stored), key
            assert torch.equal(relative_position_index(model.config.token_grid), stored), key
            compared += 1
    assert compared == sum(
        k.endswith("relative_position_index")
        for s in (mim_fixtures.segmentation_state, mim_fixtures.classification_state)
        for k in s
    )
    assert compared > 0


def test_position_table_resize_is_upstreams(mim_fixtures) -> None:
    """The fine-tuning tables are the pre-trained one resized by :func:`resize_position_embeddings`."""
    pretrained = mim_fixtures.pretraining_state["pos_embed"]
    grid = mim_fixtures.pretraining_config.token_grid
    for state, config, key in (
        (mim_fixtures.segmentation_state, mim_fixtures.segmentation_config, "backbone.pos_embed"),
        (mim_fixtures.classification_state, mim_fixtures.classification_config, "pos_embed"),
    ):
        resized = resize_position_embeddings(pretrained, grid, config.token_grid)
        torch.testing.assert_close(resized, state[key], atol=1e-6, rtol=1e-6)


def test_report_max_abs_diffs(diffs) -> None:
    """Print the max abs difference of every float tensor compared above (visible with ``pytest -s``)."""
    for key, value in sorted(diffs.items()):
        print(f"{key}: max abs diff {value:.3g}")


def test_released_base_sizes_hold_the_upstream_keys(mim_fixtures) -> None:
    """The default (base) config, built on the meta device, has exactly the upstream checkpoints' keys and
    shapes after the renaming (``mim_upstream_keys.json``; ``mim_upstream_seg_keys.json`` for the heads)."""
    pretraining = json.loads((mim_fixtures.folder / "mim_upstream_keys.json").read_text())
    finetuning = json.loads((mim_fixtures.folder / "mim_upstream_seg_keys.json").read_text())
    seg, cls = finetuning["seg_config"], finetuning["cls_config"]
    with torch.device("meta"):
        cases = [
            (MiMForPreTraining(MiMConfig()), pretraining["keys"], rename_pretraining),
            (
                MiMForSemanticSegmentation(
                    MiMConfig(image_size=seg["img_size"], num_labels=seg["out_channels"])
                ),
                finetuning["seg_keys"],
                rename_segmentation,
            ),
            (
                MiMForImageClassification(
                    MiMConfig(image_size=cls["img_size"][0], num_labels=cls["num_classes"])
                ),
                finetuning["cls_keys"],
                rename_classification,
            ),
        ]
        for model, keys, rename in cases:
            upstream = rename({k: torch.empty(shape) for k, shape in keys.items()})
            expected = {k: tuple(v.shape) for k, v in upstream.items()}
            ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            ours = {k: v for k, v in ours.items() if not k.endswith("relative_position_index")}
            assert ours == expected, type(model).__name__
