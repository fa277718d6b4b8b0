"""Every Python block of README.md and every usage snippet of the model cards runs, as printed.

The blocks are read from the files (no copies here) and run in order in one namespace, as a reader would
run them in one session, in a folder that holds what they name: ``ct.nii.gz``, ``mr.nii.gz``, ``xray.dcm``
and ``reference_labels.nii.gz`` made from volumes nibabel, nilearn and pydicom ship, a tiny pre-trained
SPAD-ViT converted the way the README converts the released one (``path/or/org/spad-vit-base``) and a tiny
fine-tuned segmentation model (``path/or/org/spad-vit-tissue``). The Hub is replaced by a recorder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import medfm
from medfm.models.mim.convert_mim import convert_mim_checkpoint
from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling
from medfm.models.spad.convert_spad import convert_spad_checkpoint

from .common.tiny_models import TINY_VIT, save_tiny_segmentation_model
from .conftest import fixtures_root

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "src" / "medfm" / "model_cards"


def python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of a Markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: keeps what would be uploaded."""

    uploads: list[Path] = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        return repo_id

    def upload_folder(self, repo_id, folder_path, **kwargs):
        kept = Path(folder_path).with_name(Path(folder_path).name + "-uploaded")
        shutil.copytree(folder_path, kept)
        RecordingApi.uploads.append(kept)
        return {"repo_id": repo_id}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mni_t1_path: Path, anatomical_path: Path, ct_small_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    shutil.copy(anatomical_path, folder / "anatomical.nii")
    image = nib.load(anatomical_path)
    nib.save(image, folder / "ct.nii.gz")
    mni = nib.load(mni_t1_path)
    affine = mni.affine.copy()
    affine[:3, :3] *= 4
    nib.save(
        nib.Nifti1Image(np.asarray(mni.dataobj, dtype=np.float32)[::4, ::4, ::4], affine),
        folder / "mr.nii.gz",
    )
    shutil.copy(ct_small_path, folder / "xray.dcm")
    data = np.asarray(image.dataobj)
    nib.save(
        nib.Nifti1Image((data > data.mean()).astype(np.uint8), image.affine),
        folder / "reference_labels.nii.gz",
    )
    # The released checkpoint's stand-in, converted as the README converts it.
    torch.manual_seed(0)
    state = SpadViTForMaskedImageModeling(SpadViTConfig(**TINY_VIT)).state_dict()
    save_file(
        {k.removeprefix("spad_vit."): v.contiguous() for k, v in state.items()},
        str(folder / "pumit.safetensors"),
    )
    convert_spad_checkpoint(
        folder / "pumit.safetensors",
        folder / "path/or/org/spad-vit-base",
        config_overrides={"num_attention_heads": 2},
    )
    save_tiny_segmentation_model(folder / "path/or/org/spad-vit-tissue")
    # The released MiM checkpoint's stand-in: the MiM fixture's upstream pre-training weights, converted.
    mim = fixtures_root() / "mim"
    upstream = json.loads((mim / "upstream_config.json").read_text())["pretraining"]
    convert_mim_checkpoint(
        mim / "upstream_state_dict.safetensors",
        folder / "path/or/org/mim-base",
        config_overrides={
            "num_attention_heads": upstream["num_heads"],
            "decoder_num_attention_heads": upstream["decoder_num_heads"],
        },
    )
    return folder


def _run_in(folder: Path, blocks: list[str], monkeypatch, namespace: dict | None = None) -> dict:
    import huggingface_hub.constants

    import medfm.hub

    monkeypatch.chdir(folder)
    monkeypatch.setattr(medfm.hub, "HfApi", RecordingApi)
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    namespace = {} if namespace is None else namespace
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"<block {index}>", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"block {index} failed ({type(error).__name__}: {error}):\n{block}"
            ) from error
    return namespace


def test_readme_python_blocks_run_as_printed(workspace: Path, monkeypatch) -> None:
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 6
    namespace = _run_in(workspace, blocks, monkeypatch)
    assert (workspace / "seg.nii.gz").is_file() and (workspace / "seg.png").is_file()
    assert namespace["result"]["label_map"].shape == nib.load(workspace / "ct.nii.gz").shape
    assert len(namespace["ct_tokens"]) > 1 and RecordingApi.uploads


@pytest.mark.parametrize("template", sorted(p.stem for p in CARDS.glob("*.md")))
def test_card_templates_have_a_usage_snippet(template: str) -> None:
    assert python_blocks((CARDS / f"{template}.md").read_text()), f"{template}.md has no Python usage snippet"


def _card_namespace_run(folder: Path, card: Path, monkeypatch) -> None:
    blocks = python_blocks(card.read_text())
    assert blocks, f"{card} has no usage snippet"
    _run_in(folder, blocks, monkeypatch)


def test_written_cards_run_and_tell_the_truth(workspace: Path, monkeypatch, tmp_path: Path) -> None:
    """The converted model's card (and its tokenizer's) and a fine-tuned model's card: the snippets run from
    the folder's parent, sizes come from the config, metadata is valid, parity is claimed only if verified."""
    import yaml

    from medfm.hub import CardInfo, write_model_card
    from medfm.models.spad import SpadVTConfig, SpadVTModel

    converted = workspace / "path/or/org/spad-vit-base"
    card = (converted / "README.md").read_text()
    assert "not verified" in card and "reduced (32-wide)" in card and "base size" not in card
    assert "@article" in card  # the paper's BibTeX
    # A converted model with its tokenizer, verified against reference outputs of the "original" code.
    torch.manual_seed(1)
    vt = SpadVTModel(SpadVTConfig(downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], embedding_dim=16,
        codebook_size=64))  # fmt: skip
    # Saved under medfm's names, which the tokenizer converter keeps (it only renames upstream's nested norms).
    save_file({k: v.contiguous() for k, v in vt.state_dict().items()}, str(tmp_path / "vt.safetensors"))
    backbone = medfm.SpadViTModel.from_pretrained(converted).eval()
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        expected = backbone(x, spacing=(2.0, 0.5, 0.5)).last_hidden_state
    save_file({"pixel_values": x, "spacing": torch.tensor([2.0, 0.5, 0.5]), "last_hidden_state": expected},
        str(tmp_path / "reference.safetensors"))  # fmt: skip
    verified = convert_spad_checkpoint(
        workspace / "pumit.safetensors",
        tmp_path / "spad-verified",
        tokenizer=tmp_path / "vt.safetensors",
        config_overrides={"num_attention_heads": 2},
        reference=tmp_path / "reference.safetensors",
    )
    card = (verified / "README.md").read_text()
    assert "was verified against the original code's outputs" in card and "not verified" not in card
    tokenizer_card = (verified / "tokenizer" / "README.md").read_text()
    assert "64-code codebook" in tokenizer_card and "1024" not in tokenizer_card
    shutil.copy(workspace / "ct.nii.gz", tmp_path / "ct.nii.gz")
    _card_namespace_run(tmp_path, verified / "README.md", monkeypatch)
    _card_namespace_run(tmp_path, verified / "tokenizer" / "README.md", monkeypatch)
    # A wrong reference is refused.
    save_file({"pixel_values": x, "spacing": torch.tensor([2.0, 0.5, 0.5]), "last_hidden_state": expected + 1},
        str(tmp_path / "wrong.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="does not reproduce"):
        convert_spad_checkpoint(workspace / "pumit.safetensors", tmp_path / "x", reference=tmp_path / "wrong.safetensors",
            config_overrides={"num_attention_heads": 2})  # fmt: skip

    # A fine-tuned segmentation model's card: its own task's snippet, labels, valid metadata, no NaN.
    tissue = tmp_path / "tissue"
    shutil.copytree(workspace / "path/or/org/spad-vit-tissue", tissue)
    info = CardInfo(
        base_model=str(converted),  # a local path: not Hub metadata
        datasets=["org/brain-tissue", "/data/local/set"],
        dataset_name="MNI152",
        metrics={"dice_grey_matter": 0.8, "hd95_grey_matter": float("nan")},
        modality="MR",
        validation_size=3,
    )
    write_model_card("fine-tuned", tissue, repo_id="tissue", info=info)
    text = (tissue / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["license"] == "other" and metadata["license_name"] == "upstream-unspecified"
    assert metadata["license_link"] and metadata["pipeline_tag"] == "image-segmentation"
    assert "base_model" not in metadata and metadata["datasets"] == ["org/brain-tissue"]
    results = metadata["model-index"][0]["results"]
    assert [m["type"] for r in results for m in r["metrics"]] == ["dice"]  # the NaN HD95 is left out
    assert "nan" not in text.lower().replace("not computable", "")
    assert "grey matter" in text and "3 held-out cases" in text and "Modality: MR" in text
    assert 'pipeline("medical-segmentation"' in text
    _card_namespace_run(tmp_path, tissue / "README.md", monkeypatch)

    # The converted MiM card: its snippet runs beside the folder, it states the family's license and paper.
    mim = workspace / "path/or/org/mim-base"
    text = (mim / "README.md").read_text()
    assert "medfm convert mim" in text and "zhuang2025mim" in text and "no LICENSE file" in text
    _card_namespace_run(mim.parent, mim / "README.md", monkeypatch)
