"""PEFT presets: LoRA and DoRA adapt the right layers, save and load, merge to the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import medfm.peft
from medfm.models.spad import (
    SpadViTConfig,
    SpadViTForImageClassification,
    SpadViTForSemanticSegmentation,
    SpadVTConfig,
    SpadVTModel,
)

from .common.tiny_models import TINY_VIT


def _classifier() -> SpadViTForImageClassification:
    torch.manual_seed(0)
    return SpadViTForImageClassification(SpadViTConfig(**TINY_VIT, num_labels=3)).eval()


def _inputs() -> dict:
    return {
        "pixel_values": torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0)),
        "spacing": torch.tensor([2.0, 0.5, 0.5]),
    }


def _perturb_adapters(model) -> None:
    """LoRA B starts at zero (a no-op adapter); give the adapters and head real values, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_round_trip_and_merge(use_dora: bool, tmp_path: Path) -> None:
    config = medfm.peft.lora_config(_classifier(), r=4, use_dora=use_dora)
    adapted = get_peft_model(_classifier(), config)
    adapted_names = {n.split(".lora_")[0] for n, _ in adapted.named_parameters() if ".lora_" in n}
    # Exactly the attention and MLP projections of every block.
    expected = {
        f"base_model.model.spad_vit.blocks.{b}.{m}"
        for b in range(2)
        for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.w1", "mlp.w2", "mlp.w3")
    }
    assert adapted_names == expected
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    _perturb_adapters(adapted)
    adapted.eval()
    inputs = _inputs()
    with torch.no_grad():
        reference = adapted(**inputs).logits
        assert not torch.allclose(reference, _classifier()(**inputs).logits)  # the adapter does something

    adapted.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_classifier(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference, atol=1e-6, rtol=1e-5)
        merged = loaded.merge_and_unload().eval()
        assert type(merged) is SpadViTForImageClassification
        torch.testing.assert_close(merged(**inputs).logits, reference, atol=1e-5, rtol=1e-4)


def test_segmentation_heads_train_in_full() -> None:
    model = SpadViTForSemanticSegmentation(
        SpadViTConfig(**TINY_VIT, patch_size=(4, 16, 16), adaptive_patch_embed=False, num_labels=2)
    )
    config = medfm.peft.lora_config(model, r=2)
    assert set(config.modules_to_save) == {"pyramid", "decoder"}
    adapted = get_peft_model(model, config)
    assert any("decoder" in n and p.requires_grad for n, p in adapted.named_parameters())
    assert not any("patch_embed" in n and p.requires_grad for n, p in adapted.named_parameters())


def test_presets_refuse_what_they_cannot_adapt() -> None:
    with pytest.raises(ValueError, match="no adapter preset"):
        medfm.peft.lora_config(
            SpadVTModel(
                SpadVTConfig(
                    downsample_channels=[8, 8, 16],
                    upsample_channels=[8, 8, 16],
                    codebook_size=8,
                    embedding_dim=16,
                )
            )
        )
    with pytest.raises(ValueError, match="not a medfm model"):
        medfm.peft.lora_config(torch.nn.Linear(2, 2))
