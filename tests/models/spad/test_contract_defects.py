"""Regression tests for contract defects found by the transformers conformance run (tests/conformance/).

Each test's docstring is the reproduction. Tiny configs, CPU, a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch

from medfm.models.spad import (
    SpadViTConfig,
    SpadViTForImageClassification,
    SpadViTForMaskedImageModeling,
    SpadViTForSemanticSegmentation,
    SpadViTModel,
    SpadVTConfig,
    SpadVTModel,
)

BATCH, LAYERS, HEADS = 2, 2, 2
SPACING = (2.0, 1.0, 1.0)  # anisotropy level 1: the adaptive 16^3 patch is 8 x 16 x 16
VIT_CLASSES = [
    SpadViTModel,
    SpadViTForMaskedImageModeling,
    SpadViTForImageClassification,
    SpadViTForSemanticSegmentation,
]


def _config(model_class: type, **overrides) -> SpadViTConfig:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        pos_embed_shape=(2, 2, 2),
        codebook_size=16,
        num_labels=3,
    )
    if model_class is SpadViTForSemanticSegmentation:
        kwargs.update(
            patch_size=(4, 16, 16),
            adaptive_patch_embed=False,
            decoder_lateral_channels=(8, 8, 16, 16),
            decoder_full_res_channels=(4, 8),
        )
    kwargs.update(overrides)
    return SpadViTConfig(**kwargs)


def _tokens(model_class: type) -> int:
    """Patch tokens of a (16, 32, 32) volume: grid (2, 2, 2) at level 1, or (4, 2, 2) for the fixed patch."""
    return 16 if model_class is SpadViTForSemanticSegmentation else 8


def _inputs(model_class: type, with_targets: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(BATCH, 3, 16, 32, 32, generator=generator),
        "spacing": torch.tensor([SPACING] * BATCH),
    }
    tokens = _tokens(model_class)
    if model_class is SpadViTForMaskedImageModeling:
        masked = torch.zeros(BATCH, tokens, dtype=torch.bool)
        masked[:, ::2] = True
        inputs["bool_masked_pos"] = masked
        if with_targets:
            inputs["target_logits"] = torch.randn(BATCH, tokens, 16, generator=generator)
    elif with_targets and model_class is SpadViTForImageClassification:
        inputs["labels"] = torch.tensor([0, 2])
    elif with_targets and model_class is SpadViTForSemanticSegmentation:
        inputs["labels"] = torch.randint(0, 3, (BATCH, 16, 32, 32), generator=generator)
    return inputs


def _build(model_class: type, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_class(_config(model_class, **overrides))


@pytest.mark.parametrize("model_class", VIT_CLASSES, ids=lambda c: c.__name__)
def test_output_attentions_is_returned(model_class) -> None:
    """``output_attentions=True`` must return the attention weights, not be silently ignored.

    Reproduction::

        model = SpadViTModel(config).eval()  # any SPAD-ViT class; eager attention
        out = model(pixel_values, spacing=spacing, output_attentions=True)
        out.attentions  # was None (MIM and segmentation outputs had no such field at all)

    Expected: a tuple of ``num_hidden_layers`` tensors ``(B, heads, L, L)``, ``L`` = patch tokens + cls.
    """
    model = _build(model_class).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        outputs = model(**_inputs(model_class), output_attentions=True)
    attentions = getattr(outputs, "attentions", None)
    assert isinstance(attentions, tuple), f"{model_class.__name__} returned attentions={attentions!r}"
    length = _tokens(model_class) + 1
    assert len(attentions) == LAYERS
    for weights in attentions:
        assert tuple(weights.shape) == (BATCH, HEADS, length, length)


def test_segmentation_honours_config_output_hidden_states() -> None:
    """``config.output_hidden_states=True`` must make SpadViTForSemanticSegmentation return hidden states.

    Reproduction::

        config.output_hidden_states = True
        SpadViTForSemanticSegmentation(config)(pixel_values).hidden_states  # was None

    (Passing ``output_hidden_states=True`` to forward worked; the config default was ignored.)
    """
    model = _build(SpadViTForSemanticSegmentation).eval()
    model.config.output_hidden_states = True
    with torch.no_grad():
        outputs = model(**_inputs(SpadViTForSemanticSegmentation))
    assert outputs.hidden_states is not None
    assert len(outputs.hidden_states) == LAYERS + 1


def _vt_model_and_loss():
    torch.manual_seed(0)
    config = SpadVTConfig(
        downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], codebook_size=12, embedding_dim=16
    )
    model = SpadVTModel(config).train()
    pixel_values = torch.rand(BATCH, 3, 4, 32, 32) * 2 - 1
    outputs = model(pixel_values, spacing=torch.tensor([4.0, 1.0, 1.0]))
    loss = (outputs.reconstruction - pixel_values).pow(2).mean() + outputs.quant_loss + outputs.entropy
    return model, loss


@pytest.mark.parametrize("model_class", [*VIT_CLASSES, SpadVTModel], ids=lambda c: c.__name__)
def test_every_trainable_parameter_gets_a_gradient(model_class) -> None:
    """After ``loss.backward()`` every parameter with ``requires_grad`` must have a gradient.

    A parameter that never enters the forward breaks DDP with ``find_unused_parameters=False`` at step 2.
    Reproduction::

        model = SpadViTForSemanticSegmentation(config).train()
        model(pixel_values, labels=labels).loss.backward()
        model.spad_vit.norm.weight.grad  # was None: the head never used the backbone's final LayerNorm

    Heads use their loss (labels / target logits); the backbone a loss on its last hidden state; the
    tokenizer its reconstruction error plus its codebook regularisers.
    """
    if model_class is SpadVTModel:
        model, loss = _vt_model_and_loss()
    else:
        model = _build(model_class).train()
        outputs = model(**_inputs(model_class, with_targets=True))
        loss = outputs.loss if outputs.get("loss") is not None else outputs.last_hidden_state.pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{model_class.__name__}: no gradient for {missing}"


@pytest.mark.parametrize("model_class", VIT_CLASSES, ids=lambda c: c.__name__)
def test_input_embeddings_and_enable_input_require_grads(model_class) -> None:
    """``get_input_embeddings()`` must return the patch embedding, so ``enable_input_require_grads()`` works.

    Reproduction::

        model.get_input_embeddings()  # raised NotImplementedError
        model.enable_input_require_grads()  # so installed no hook
        model.requires_grad_(False); model.activation_checkpointing_enable(); model.train()
        model(pixel_values, spacing=spacing)[0].requires_grad  # False: nothing to backpropagate through

    That is the PEFT set-up (frozen base, checkpointed blocks); its adapters would get no gradient.
    """
    model = _build(model_class)
    assert model.get_input_embeddings() is model.base_model.patch_embed
    model.requires_grad_(False)
    model.enable_input_require_grads()
    model.activation_checkpointing_enable()
    model.train()
    outputs = model(**_inputs(model_class))
    first = outputs.last_hidden_state if model_class is SpadViTModel else outputs.logits
    assert first.requires_grad


@pytest.mark.parametrize(
    "model_class", [SpadViTModel, SpadViTForImageClassification], ids=lambda c: c.__name__
)
def test_torch_export_with_integer_aniso_d(model_class) -> None:
    """``torch.export`` must trace a SPAD-ViT when the anisotropy level is given as an int.

    Reproduction::

        torch.export.export(model, args=(pixel_values,), kwargs={"aniso_d": 2})

    ``aniso_d`` is a Python int, so no data-dependent branch on ``spacing`` is involved; the exported
    program must give the eager model's output.
    """
    model = _build(model_class).eval()
    pixel_values = torch.randn(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, args=(pixel_values,), kwargs={"aniso_d": 2})
    with torch.no_grad():
        expected = model(pixel_values, aniso_d=2)
    exported = program.module()(pixel_values, aniso_d=2)
    key = "last_hidden_state" if model_class is SpadViTModel else "logits"
    torch.testing.assert_close(exported[key], expected[key], atol=1e-5, rtol=1e-5)
