"""Pushing to the Hub, offline: capture what would be committed, lay it out as a Hub cache, load it back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSemanticSegmentation, pipeline

import medfm
from medfm.hub import CardInfo, push_to_hub
from medfm.models.spad import SpadViTForSemanticSegmentation
from medfm.processing import MedicalImageProcessor

from .common.hub_cache import add_to_hub_cache
from .common.tiny_models import tiny_segmentation_config, tiny_segmentation_processor


class RecordingApi:
    """Stands in for HfApi: keeps a copy of the folder each commit would upload."""

    def __init__(self, into: Path):
        self.into = into
        self.created: list[tuple[str, bool]] = []

    def create_repo(self, repo_id, private=False, exist_ok=False, token=None):
        self.created.append((repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message=None, token=None):
        shutil.copytree(folder_path, self.into / repo_id.replace("/", "--"))
        return {"repo_id": repo_id, "message": commit_message}


def test_push_and_reload_by_repo_id(tmp_path: Path, anatomical_path: Path) -> None:
    torch.manual_seed(0)
    model = SpadViTForSemanticSegmentation(tiny_segmentation_config()).eval()
    processor = tiny_segmentation_processor()
    api = RecordingApi(tmp_path / "commits")
    info = CardInfo(
        base_model="medfm/spad-vit-base",
        datasets=["nilearn/mni152"],
        dataset_name="MNI152 tissues",
        metrics={"dice_grey_matter": 0.71, "dice_white_matter": 0.83},
        training={"epochs": 3, "learning_rate": 1e-3},
    )
    result = push_to_hub(
        model, "medfm-test/spad-tissue", processor=processor, card=info, private=True, api=api
    )
    assert result["repo_id"] == "medfm-test/spad-tissue" and api.created == [("medfm-test/spad-tissue", True)]
    committed = tmp_path / "commits" / "medfm-test--spad-tissue"
    assert {p.name for p in committed.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
    }
    card = ModelCard.load(committed / "README.md")
    assert card.data.base_model == "medfm/spad-vit-base" and card.data.library_name == "medfm"
    # Standard metric types, the label in the metric's name (Hub model-index conventions).
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == info.metrics
    assert {r.metric_type for r in card.data.eval_results} == {"dice"}
    assert "learning_rate" in card.text and "Not for clinical use" in card.text

    cache = tmp_path / "hub-cache"
    add_to_hub_cache(committed, "medfm-test/spad-tissue", cache)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(
        "medfm-test/spad-tissue", cache_dir=cache
    ).eval()
    assert isinstance(reloaded, SpadViTForSemanticSegmentation)
    reloaded_processor = MedicalImageProcessor.from_pretrained("medfm-test/spad-tissue", cache_dir=cache)
    assert reloaded_processor.steps == processor.steps
    segmenter = pipeline("medical-segmentation", model=reloaded, image_processor=reloaded_processor)
    direct = pipeline("medical-segmentation", model=model, image_processor=processor)
    a = segmenter(str(anatomical_path), roi_size=(8, 32, 64))["label_map"]
    b = direct(str(anatomical_path), roi_size=(8, 32, 64))["label_map"]
    assert np.array_equal(a, b)

    # pipeline(model="org/name") itself, offline, in a process whose Hub cache is the laid-out one.
    script = (
        "import medfm, numpy as np; from transformers import pipeline; "
        "seg = pipeline('medical-segmentation', model='medfm-test/spad-tissue'); "
        f"r = seg({str(anatomical_path)!r}, roi_size=(8, 32, 64)); np.save({str(tmp_path / 'labels.npy')!r}, r['label_map'])"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "labels.npy"), b)


def test_unknown_card_template(tmp_path: Path) -> None:
    from medfm.hub import write_model_card

    with pytest.raises(ValueError, match="no model card template"):
        write_model_card("nope", tmp_path)


class _FailingApi(RecordingApi):
    """A Hub that is unreachable at ``stage`` ("create" or "upload")."""

    def __init__(self, into: Path, stage: str):
        super().__init__(into)
        self.stage = stage

    def create_repo(self, repo_id, private=False, exist_ok=False, token=None):
        if self.stage == "create":
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        super().create_repo(repo_id, private, exist_ok, token)

    def upload_folder(self, repo_id, folder_path, commit_message=None, token=None):
        raise ConnectionError("Connection reset by peer")


def test_push_without_a_network_fails_before_writing(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from medfm.hub import HubUploadError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = SpadViTForSemanticSegmentation(tiny_segmentation_config())
    # HF_HUB_OFFLINE is set for the whole test session, as on a machine without a network.
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE"):
        push_to_hub(model, "org/tiny")
    with pytest.raises(HubUploadError, match="cannot create or reach org/tiny"):
        push_to_hub(model, "org/tiny", api=_FailingApi(tmp_path, "create"))
    assert not list(tmp_path.glob("medfm-push-*"))  # nothing was prepared


def test_a_failed_upload_keeps_the_prepared_folder(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from medfm.hub import HubUploadError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = SpadViTForSemanticSegmentation(tiny_segmentation_config())
    with pytest.raises(HubUploadError, match="kept at") as raised:
        push_to_hub(
            model, "org/tiny", processor=tiny_segmentation_processor(), api=_FailingApi(tmp_path, "upload")
        )
    (kept,) = tmp_path.glob("medfm-push-*")
    assert str(kept) in str(raised.value)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in kept.iterdir()
    }


def test_pushing_an_adapter_uploads_a_self_contained_folder(tmp_path: Path) -> None:
    """A PEFT model pushed as the README's Quickstart does: the fine-tuned config naming its base, PEFT pointed
    at the repository, and a card that says what the folder is (an adapter, its own task, its real size)."""
    import json

    from peft import get_peft_model

    import medfm.peft

    SpadViTForSemanticSegmentation(tiny_segmentation_config()).save_pretrained(tmp_path / "base")
    base = SpadViTForSemanticSegmentation.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, medfm.peft.lora_config(base, r=2))
    api = RecordingApi(tmp_path / "commits")
    push_to_hub(model, "org/tissue-lora", processor=tiny_segmentation_processor(), api=api)
    folder = tmp_path / "commits" / "org--tissue-lora"
    names = {p.name for p in folder.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "preprocessor_config.json",
    } <= names
    assert "model.safetensors" not in names
    assert (
        json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "org/tissue-lora"
    )
    assert json.loads((folder / "config.json").read_text())["medfm_base_model"] == str(
        (tmp_path / "base").resolve()
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.license_name
    assert "**adapter**" in card.text and 'pipeline("medical-segmentation"' in card.text


class SpaceRecordingApi(RecordingApi):
    """A recording Hub that also takes Space repositories (``repo_type="space"``, ``space_sdk``)."""

    def __init__(self, into: Path, fail_space: str | None = None):
        super().__init__(into)
        self.repos: list[tuple[str, str | None, str | None]] = []
        self.uploads: list[tuple[str, str | None]] = []
        self.fail_space = fail_space

    def create_repo(self, repo_id, private=False, exist_ok=False, token=None, repo_type=None, space_sdk=None):
        if repo_type == "space" and self.fail_space == "create":
            raise ConnectionError("403 Forbidden: no rights to create Spaces")
        self.repos.append((repo_id, repo_type, space_sdk))
        super().create_repo(repo_id, private, exist_ok, token)

    def upload_folder(self, repo_id, folder_path, commit_message=None, token=None, repo_type=None):
        if repo_type == "space" and self.fail_space == "upload":
            raise ConnectionError("Connection reset by peer")
        self.uploads.append((repo_id, repo_type))
        return super().upload_folder(repo_id, folder_path, commit_message, token)


def _space_files(folder: Path) -> tuple[str, str, object]:
    from huggingface_hub import SpaceCard

    return (
        (folder / "app.py").read_text(),
        (folder / "requirements.txt").read_text(),
        SpaceCard.load(folder / "README.md").data,
    )


def test_write_space_makes_a_gradio_space_for_the_model(tmp_path: Path) -> None:
    import ast
    from importlib.metadata import PackageNotFoundError, version

    from medfm.hub import TESTED_GRADIO_VERSION, write_space

    folder = write_space(tmp_path / "space", "org/tissue-seg", license="apache-2.0")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    app, requirements, data = _space_files(folder)
    assert 'build_app(model="org/tissue-seg", lock_model=True).launch()' in app
    ast.parse(app)
    assert requirements.splitlines()[-1] == f"medfm[app]>={medfm.__version__}"
    try:
        gradio_version = version("gradio")
    except PackageNotFoundError:
        gradio_version = TESTED_GRADIO_VERSION
    assert (data.sdk, data.sdk_version, data.app_file) == ("gradio", gradio_version, "app.py")
    assert data.models == ["org/tissue-seg"] and data.license == "apache-2.0" and data.title
    with pytest.raises(ValueError, match="model_id"):
        write_space(tmp_path / "local", "/models/my-folder")


def test_the_space_app_builds_the_viewer(tmp_path: Path, monkeypatch) -> None:
    """The Space's app.py, run as the Space runs it, builds the locked viewer page and launches it."""
    import runpy

    gr = pytest.importorskip("gradio", reason="the app extra (Gradio) is not installed")
    from medfm.hub import write_space

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, *a, **k: launched.append(self))
    folder = write_space(tmp_path / "space", "org/tissue-seg")
    runpy.run_path(str(folder / "app.py"), run_name="__main__")
    (app,) = launched
    (box,) = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "medfm-model"]
    assert box.value == "org/tissue-seg" and box.interactive is False


def test_push_with_a_space(tmp_path: Path) -> None:
    model = SpadViTForSemanticSegmentation(tiny_segmentation_config())
    api = SpaceRecordingApi(tmp_path / "commits")
    push_to_hub(model, "org/tissue", processor=tiny_segmentation_processor(), api=api, space=True)
    assert api.repos == [("org/tissue", None, None), ("org/tissue-demo", "space", "gradio")]
    assert api.uploads == [("org/tissue", None), ("org/tissue-demo", "space")]
    app, _, data = _space_files(tmp_path / "commits" / "org--tissue-demo")
    model_card = ModelCard.load(tmp_path / "commits" / "org--tissue" / "README.md").data
    assert 'build_app(model="org/tissue", lock_model=True)' in app and data.models == ["org/tissue"]
    assert data.license == model_card.license  # the Space shows the model's outputs: the model's license

    api = SpaceRecordingApi(tmp_path / "commits2")
    push_to_hub(model, "org/tissue", api=api, space=True, space_id="someone/viewer")
    assert [repo for repo, kind, _ in api.repos if kind == "space"] == ["someone/viewer"]
    with pytest.raises(ValueError, match="space_id"):
        push_to_hub(model, "org/tissue", api=SpaceRecordingApi(tmp_path / "c3"), space=True, space_id="a b/c")


def test_a_space_that_cannot_be_made_or_uploaded(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from medfm.hub import HubUploadError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = SpadViTForSemanticSegmentation(tiny_segmentation_config())
    api = SpaceRecordingApi(tmp_path / "commits", fail_space="create")
    with pytest.raises(HubUploadError, match="cannot create or reach the Space org/tiny-demo"):
        push_to_hub(model, "org/tiny", api=api, space=True)
    assert api.uploads == [] and not list(tmp_path.glob("medfm-*"))  # nothing uploaded or prepared
    api = SpaceRecordingApi(tmp_path / "commits2", fail_space="upload")
    with pytest.raises(HubUploadError, match="the model is on the Hub as org/tiny") as raised:
        push_to_hub(model, "org/tiny", api=api, space=True)
    (kept,) = tmp_path.glob("medfm-space-*")
    assert str(kept) in str(raised.value) and (kept / "app.py").is_file()
    assert api.uploads == [("org/tiny", None)]
