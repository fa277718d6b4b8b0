"""A fine-tuned adapter folder is self-contained: it loads through the Auto class, pipeline() and PEFT's
AutoPeftModel with no import allow-list and no architecture overrides, and reproduces the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import AutoPeftModel, get_peft_model
from transformers import AutoModelForSemanticSegmentation, pipeline

import medfm
import medfm.peft
from medfm.models.modeling_utils import adapter_base_model
from medfm.training.arguments import load_for_task

from .common.tiny_models import TISSUES, save_tiny_pretrained_vit, tiny_segmentation_processor

# The fine-tuned head differs from the pre-trained model in every way the README lists.
OVERRIDES = dict(
    num_labels=3,
    id2label=TISSUES,
    decoder_lateral_channels=[8, 8, 16, 16],
    decoder_full_res_channels=[4, 8],
)


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(1, 1, 16, 64, 64, generator=generator),
        "spacing": torch.tensor([4.0] * 3),
    }


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """A tiny pre-trained model, a LoRA fine-tune of it (with perturbed, "trained" weights) saved as an
    adapter folder with its processor, and the trained model's logits."""
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_pretrained_vit(root / "base")
    torch.manual_seed(0)
    model = load_for_task(AutoModelForSemanticSegmentation, str(base), num_channels=1, **OVERRIDES)
    model = get_peft_model(model, medfm.peft.lora_config(model, r=2))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    with torch.no_grad():
        reference = model(**_inputs()).logits
    folder = medfm.peft.save_adapter(
        model, root / "adapter", base_model=str(base), auto_class=AutoModelForSemanticSegmentation
    )
    tiny_segmentation_processor().save_pretrained(folder)
    return base, folder, reference


def test_folder_holds_the_config_and_only_trainable_weights(adapter_run) -> None:
    base, folder, _ = adapter_run
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["patch_size"] == [4, 16, 16] and config["adaptive_patch_embed"] is False
    assert config["in_channels"] == 1 and config["decoder_full_res_channels"] == [4, 8]
    assert adapter_base_model(folder) == str(base.resolve())
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora_" in k or "pyramid" in k or "decoder" in k for k in keys)


def test_auto_class_loads_the_adapter_folder(adapter_run) -> None:
    _, folder, reference = adapter_run
    model = AutoModelForSemanticSegmentation.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).logits, reference, atol=1e-5, rtol=1e-4)


def test_auto_peft_model_loads_the_adapter_folder(adapter_run) -> None:
    _, folder, reference = adapter_run
    model = AutoPeftModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).logits, reference, atol=1e-5, rtol=1e-4)


def test_pipeline_loads_the_adapter_folder(adapter_run, anatomical_path: Path) -> None:
    _, folder, _ = adapter_run
    segmenter = pipeline("medical-segmentation", model=str(folder))
    assert segmenter.model.config.num_labels == 3
    result = segmenter(str(anatomical_path), roi_size=(8, 64, 64))
    assert {stats["name"] for stats in result["labels"].values()} <= set(TISSUES.values())
    assert np.asarray(result["label_map"]).ndim == 3


def test_cli_segments_with_the_adapter_folder(
    adapter_run, anatomical_path: Path, tmp_path: Path, capsys
) -> None:
    from medfm.cli import main

    _, folder, _ = adapter_run
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(anatomical_path), "--model", str(folder), "--out", str(out)]) == 0
    assert out.is_file()
    assert "wrote" in capsys.readouterr().out
