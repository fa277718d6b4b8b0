"""A model's own processor accepts ordinary volumes: the spacing-adaptive padding step, processors fitted to a
model's input multiple, and a converted pre-trained model's processor through the pipelines on the MNI152 at
2 mm and a 2D DICOM."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import pipeline

import medfm  # noqa: F401
from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling, SpadViTForSemanticSegmentation
from medfm.models.spad.convert_spad import convert_spad_checkpoint
from medfm.processing import MedicalImageProcessor
from medfm.processing.steps import PadToMultiple

from ..common.tiny_models import TINY_VIT, tiny_segmentation_config


@pytest.mark.parametrize(
    ("shape", "spacing", "expected"),
    [
        ((20, 30, 40), (1.0, 1.0, 1.0), [16, 16, 16]),  # isotropic: aniso_d 0, the full patch in depth
        ((20, 30, 40), (3.0, 0.75, 0.75), [4, 16, 16]),  # aniso_d 2
        ((20, 30, 40), (5.0, 0.5, 0.5), [2, 16, 16]),  # aniso_d 3
        ((1, 30, 40), (5.0, 0.66, 0.66), [1, 16, 16]),  # a single slice is 2D whatever its thickness
    ],
)
def test_spacing_adaptive_padding(shape, spacing, expected) -> None:
    step = PadToMultiple(multiple=16, anisotropy_stride=16)
    assert step.multiple_for(shape, spacing) == expected
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    processor = MedicalImageProcessor(steps=[step])
    out = processor(array, spacing=spacing)["pixel_values"][0, 0]
    assert all(n % m == 0 and n - s < m for n, s, m in zip(out.shape, shape, expected))


def test_padded_for_appends_only_what_is_missing() -> None:
    adaptive = SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT))
    fixed = SpadViTForSemanticSegmentation(tiny_segmentation_config())
    bare = MedicalImageProcessor(steps=[{"name": "minmax"}])
    fitted = bare.padded_for(adaptive.input_padding_step())
    assert fitted.steps[-1]["name"] == "pad_to_multiple" and fitted.steps[-1]["anisotropy_stride"] == 16
    assert bare.steps == [bare.steps[0]]  # the original is untouched
    assert fitted.padded_for(adaptive.input_padding_step()) is fitted  # already fitted: kept as it is
    assert fitted.padded_for(fixed.input_padding_step()).steps[-1]["multiple"] == [8, 32, 32]
    resized = MedicalImageProcessor(steps=[{"name": "resize", "size": [64, 64, 64]}])
    assert resized.padded_for(fixed.input_padding_step()) is resized  # a resize to a multiple is enough
    padded = MedicalImageProcessor(steps=[{"name": "pad_to_multiple", "multiple": [16, 64, 64]}])
    assert padded.padded_for(fixed.input_padding_step()) is padded


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny pre-trained SPAD-ViT converted as a user converts the released checkpoint."""
    folder = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    state = SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT)).state_dict()
    upstream = {k.removeprefix("spad_vit."): v.contiguous() for k, v in state.items()}
    save_file(upstream, str(folder / "pumit.safetensors"))
    return convert_spad_checkpoint(
        folder / "pumit.safetensors", folder / "spad-tiny", config_overrides={"num_attention_heads": 2}
    )


@pytest.fixture(scope="module")
def mni_2mm(tmp_path_factory, mni_t1_path: Path) -> Path:
    """The MNI152 T1 at 2 mm: (95, 117, 99) voxels, no axis a multiple of the patch."""
    image = nib.load(mni_t1_path)
    data = np.asarray(image.dataobj, dtype=np.float32)[::2, ::2, ::2]
    affine = image.affine.copy()
    affine[:3, :3] *= 2
    path = tmp_path_factory.mktemp("mni") / "mni_2mm.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_converted_processor_runs_ordinary_volumes(
    converted: Path, mni_2mm: Path, ct_small_path: Path
) -> None:
    features = pipeline("medical-feature-extraction", model=str(converted))
    volume = features(str(mni_2mm), return_tokens=True)
    assert volume["embedding"].shape == (32,) and torch.isfinite(volume["tokens"]).all()
    # (95, 117, 99) at 2 mm isotropic is padded to (96, 128, 112): 6 x 8 x 7 tokens of 16^3.
    assert volume["tokens"].shape[0] == 6 * 8 * 7
    image = features(str(ct_small_path))  # a 2D DICOM: one slice, 16-pixel patches in-plane
    assert image["embedding"].shape == (32,) and torch.isfinite(image["embedding"]).all()
    from medfm.models.spad import SpadViTForImageClassification

    SpadViTForImageClassification.from_pretrained(converted, num_labels=2).save_pretrained(
        converted.parent / "cls"
    )
    MedicalImageProcessor.from_pretrained(converted).save_pretrained(converted.parent / "cls")
    scores = pipeline("medical-image-classification", model=str(converted.parent / "cls"))(str(mni_2mm))
    assert len(scores) == 2 and abs(sum(s["score"] for s in scores) - 1) < 1e-5
