"""The web viewer's logic without a browser (or Gradio): reading uploads safely, listing and loading models,
running them with progress, drawing slices in the radiological convention, and one-line errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medfm  # noqa: F401  (registers the models and pipelines)
from medfm.app import viewer
from medfm.errors import CorruptFileError, EmptySeriesError, UnsupportedFormatError, WrongTaskError
from medfm.io import load_volume
from medfm.visualization import label_colour

from ..common.hub_cache import add_to_hub_cache


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


# ----------------------------------------------------------------------------------------------- uploads


def test_a_zipped_dicom_series_loads_like_its_folder(ct_series, tmp_path: Path) -> None:
    folder, pixels, _ = ct_series
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(folder.iterdir()):
            bundle.write(file, f"study/series/{file.name}")
        bundle.writestr("__MACOSX/study/._IM0000.dcm", b"resource fork")
    volume = viewer.load_upload(archive, tmp_path / "work")
    direct = load_volume(folder)
    assert volume.spatial_shape == direct.spatial_shape and volume.spatial_shape[0] == len(pixels)
    assert np.array_equal(volume.array, direct.array) and np.allclose(volume.affine, direct.affine)
    assert not (tmp_path / "work" / "series" / "__MACOSX").exists()


@pytest.mark.parametrize("member", ["../evil.dcm", "/etc/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm"])
def test_zip_members_that_escape_the_folder_are_refused(member: str, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "slip.zip", {"ok.txt": b"fine", member: b"payload"})
    with pytest.raises(UnsupportedFormatError, match="points outside the archive"):
        viewer.extract_zip(archive, tmp_path / "inside" / "out")
    assert not (tmp_path / "inside" / "evil.dcm").exists() and not (tmp_path / "evil.dcm").exists()


def test_zip_symlinks_are_skipped_and_sizes_capped(tmp_path: Path) -> None:
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        link = zipfile.ZipInfo("link")
        link.external_attr = (0o120777 << 16) | 0
        bundle.writestr(link, "/etc/passwd")
        bundle.writestr("data.bin", b"\0" * 4096)
    out = viewer.extract_zip(archive, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["data.bin"]
    with pytest.raises(UnsupportedFormatError, match="at most"):
        viewer.extract_zip(archive, tmp_path / "small", max_bytes=1000)
    with pytest.raises(UnsupportedFormatError, match="at most 1"):
        viewer.extract_zip(_zip(tmp_path / "two.zip", {"a": b"a", "b": b"b"}), tmp_path / "few", max_files=1)


def test_not_a_zip_and_a_zip_without_dicom(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(CorruptFileError, match=r"bad\.zip: not a readable zip archive"):
        viewer.load_upload(bad, tmp_path / "w1")
    empty = _zip(tmp_path / "notes.zip", {"readme.txt": b"no images here"})
    with pytest.raises(EmptySeriesError, match=r"notes\.zip: the zip holds no DICOM image"):
        viewer.load_upload(empty, tmp_path / "w2")


def test_2d_pictures_are_refused_with_what_is_read(tmp_path: Path) -> None:
    picture = tmp_path / "xray.png"
    Image.new("L", (8, 8)).save(picture)
    with pytest.raises(UnsupportedFormatError, match=r"not read by medfm yet.*NIfTI"):
        viewer.load_upload(picture, tmp_path)


# ------------------------------------------------------------------------------------------------ models


def test_the_hub_cache_lists_medfm_models_of_the_viewers_tasks(
    tmp_path: Path, segmentation_model: Path, classification_model: Path, backbone_model: Path
) -> None:
    cache = tmp_path / "hub"
    add_to_hub_cache(segmentation_model, "org/tissue-seg", cache)
    add_to_hub_cache(classification_model, "org/tumour-cls", cache)
    add_to_hub_cache(backbone_model, "org/backbone", cache)  # no task head: not offered
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    add_to_hub_cache(other, "org/not-medfm", cache)
    found = viewer.list_cached_models(cache)
    assert [(m.repo_id, m.task) for m in found] == [
        ("org/tissue-seg", "medical-segmentation"),
        ("org/tumour-cls", "medical-image-classification"),
    ]
    assert found[0].model_type == "spad_vit"
    choices = viewer.model_choices(["./mine", "org/tissue-seg"], cache)
    assert [value for _, value in choices] == ["./mine", "org/tissue-seg", "org/tumour-cls"]
    assert viewer.list_cached_models(tmp_path / "no-cache") == []


def test_tasks_are_told_and_pipelines_cached(
    segmentation_model: Path, classification_model: Path, backbone_model: Path
) -> None:
    assert viewer.resolve_task(str(segmentation_model)) == "medical-segmentation"
    assert viewer.resolve_task(str(classification_model)) == "medical-image-classification"
    with pytest.raises(WrongTaskError, match="runs segmentation models and image classifiers"):
        viewer.resolve_task(str(backbone_model))
    cache = viewer.PipelineCache(size=1)
    task, first = cache.get(str(segmentation_model))
    assert task == "medical-segmentation" and cache.get(f" {segmentation_model} ")[1] is first
    assert cache.get(str(classification_model))[0] == "medical-image-classification"
    assert cache.get(str(segmentation_model))[1] is not first  # evicted, then loaded again


# ------------------------------------------------------------------------------------------------ running


def test_a_segmentation_run_reports_progress_and_writes_on_the_input_grid(
    segmentation_model: Path, anatomical_path: Path, tmp_path: Path
) -> None:
    seen: list[tuple[float, str]] = []
    pipelines = viewer.PipelineCache()
    outcome = viewer.analyse(
        anatomical_path,
        str(segmentation_model),
        pipelines,
        tmp_path,
        progress=lambda f, t: seen.append((f, t)),
    )
    assert not outcome.error and outcome.case is not None, outcome.status
    assert outcome.status.startswith("**Done:** anatomical.nii segmented by")
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] < 1
    assert any(text.startswith("window 1 of ") for _, text in seen)
    case = outcome.case
    source = nib.load(anatomical_path)
    written = nib.load(case.label_map)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    values = set(np.unique(np.asarray(written.dataobj)).tolist())
    assert values <= {0, 1, 2}
    # The table holds every label of the model but the background, with the pipeline's volumes.
    assert [row[:2] for row in viewer.volume_table(case)] == [[1, "grey matter"], [2, "white matter"]]
    for value, voxels, ml in ((row[0], row[2], row[3]) for row in viewer.volume_table(case)):
        assert voxels == int((np.asarray(written.dataobj) == value).sum())
        assert ml == pytest.approx(voxels * 8 / 1000, abs=1e-3)  # 2 mm voxels
    assert case.folder is not None and case.label_map.parent == case.folder


def test_a_zipped_series_segments_onto_its_own_grid(
    ct_series, segmentation_model: Path, tmp_path: Path
) -> None:
    folder, pixels, _ = ct_series
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(folder.iterdir()):
            bundle.write(file, f"ct/{file.name}")
    outcome = viewer.analyse(archive, str(segmentation_model), viewer.PipelineCache(), tmp_path / "work")
    assert not outcome.error, outcome.status
    written = nib.load(outcome.case.label_map)
    volume = load_volume(folder)
    assert written.shape[:3] == volume.to_source_array().shape[-3:]
    assert np.allclose(written.affine, volume.source.affine, atol=1e-4)
    assert outcome.case.label_map.name == "ct_labels.nii.gz" and len(pixels) in outcome.case.shape


def test_a_classifier_run_gives_scores(
    classification_model: Path, anatomical_path: Path, tmp_path: Path
) -> None:
    outcome = viewer.analyse(
        anatomical_path, str(classification_model), viewer.PipelineCache(), tmp_path, top_k=2
    )
    assert not outcome.error and outcome.case is None
    assert len(outcome.scores) == 2 and set(outcome.scores) <= {"normal", "benign", "malignant"}
    assert [row[0] for row in outcome.table] == [1, 2]
    assert outcome.table[0][2] >= outcome.table[1][2]
    assert not list(tmp_path.iterdir())  # a classifier's run folder is removed


BAD_UPLOADS = {
    "notes.txt": (b"just some text", "notes.txt: format not recognised"),
    "broken.nii.gz": (b"\x1f\x8b\x08\x00garbage", "broken.nii.gz: the gzip stream cannot be trusted"),
    "xray.png": (None, "xray.png: 2D pictures (PNG, JPEG, TIFF...) are not read by medfm yet"),
    "notes.zip": ({"readme.txt": b"no images"}, "notes.zip: the zip holds no DICOM image"),
    "slip.zip": ({"../../evil.dcm": b"x"}, "slip.zip: zip member '../../evil.dcm' points outside"),
    "fake.zip": (b"PK\x03\x04 not really", "fake.zip: not a readable zip archive"),
    "fake.nii": (b"not a nifti header", "fake.nii: not a readable NIfTI file"),
}


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_a_bad_upload_gives_one_line_naming_the_file(
    name: str, segmentation_model: Path, tmp_path: Path
) -> None:
    content, expected = BAD_UPLOADS[name]
    upload = tmp_path / "gradio-upload" / "0123abcd" / name
    upload.parent.mkdir(parents=True)
    if content is None:
        Image.new("L", (8, 8)).save(upload)
    elif isinstance(content, dict):
        _zip(upload, content)
    else:
        upload.write_bytes(content)
    work = tmp_path / "work"
    outcome = viewer.analyse(upload, str(segmentation_model), viewer.PipelineCache(), work)
    assert outcome.error and outcome.case is None
    assert outcome.status.startswith(f"**Error:** {expected}"), outcome.status
    assert "\n" not in outcome.status and "Traceback" not in outcome.status
    assert str(tmp_path) not in outcome.status  # neither the upload's temporary copy nor the run folder
    assert not list(work.iterdir())  # the failed run's folder is gone


def test_bad_models_give_one_line(backbone_model: Path, anatomical_path: Path, tmp_path: Path) -> None:
    cases = {
        str(tmp_path / "missing-model"): "missing-model: no such folder",
        str(backbone_model): "the viewer runs segmentation models and image classifiers",
        "": "no model chosen",
        str(anatomical_path): "is a file; --model takes the folder",
    }
    for model, expected in cases.items():
        outcome = viewer.analyse(anatomical_path, model, viewer.PipelineCache(), tmp_path / "work")
        assert outcome.error and expected in outcome.status and "\n" not in outcome.status, outcome.status
    outcome = viewer.analyse(
        anatomical_path,
        str(backbone_model),
        viewer.PipelineCache(),
        tmp_path / "work",
        allowed=["org/served"],
    )
    assert outcome.status.endswith("this page runs only org/served"), outcome.status
    outcome = viewer.analyse(None, str(backbone_model), viewer.PipelineCache(), tmp_path / "work")
    assert outcome.error and outcome.status == "**Error:** upload an image first."


def test_an_unexpected_error_is_named_by_its_type(tmp_path: Path, anatomical_path: Path) -> None:
    class Broken:
        def get(self, model):
            raise ZeroDivisionError("division by zero\nin a deep frame")

    outcome = viewer.analyse(anatomical_path, "m", Broken(), tmp_path)  # type: ignore[arg-type]
    assert outcome.status == "**Error:** ZeroDivisionError: division by zero"


# ------------------------------------------------------------------------------------------------ drawing


def _marked_case(tmp_path: Path) -> viewer.SegmentationCase:
    """A RAS volume with one bright, labelled block at the patient's right, anterior and superior."""
    data = np.zeros((20, 24, 16), np.float32)  # x (to the right), y (to anterior), z (to superior)
    data[15:19, 18:22, 10:14] = 1000.0
    data[2:6, 2:6, 2:6] = 500.0  # left, posterior, inferior: label 2
    path = tmp_path / "marked.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), path)
    volume = load_volume(path)
    labels = np.where(volume.array[0] > 750, 1, np.where(volume.array[0] > 250, 2, 0)).astype(np.uint8)
    result = {
        "segmentation": volume.with_array(labels),
        "labels": {1: {"voxels": 64, "volume_ml": 0.064}, 2: {"voxels": 64, "volume_ml": 0.064}},
    }
    return viewer.prepare_case(volume, result, {0: "background", 1: "right <b>", 2: "left"}, name=path.name)


def _colour_mask(picture: np.ndarray, value: int, tolerance: int = 3) -> np.ndarray:
    return np.all(np.abs(picture.astype(int) - label_colour(value)) <= tolerance, axis=-1)


def _centre_of(mask: np.ndarray) -> tuple[float, float]:
    rows, columns = np.nonzero(mask)
    return rows.mean() / mask.shape[0], columns.mean() / mask.shape[1]


def test_views_are_radiological(tmp_path: Path) -> None:
    """Axial and coronal: the patient's right on the image's left; superior and anterior at the top."""
    case = _marked_case(tmp_path)
    assert case.letters == (("S", "I"), ("A", "P"), ("R", "L"))
    # Label 1 is at the patient's right, anterior and superior; label 2 at the left, posterior and inferior.
    # Axial: rows A->P, columns R->L. Coronal: rows S->I, columns R->L. Sagittal: rows S->I, columns A->P.
    for value, top_left in ((1, True), (2, False)):
        through = dict(zip(viewer.VIEWS, (int(axis.mean()) for axis in np.nonzero(case.labels == value))))
        for view in viewer.VIEWS:
            picture = viewer.render_view(case, view, through[view], opacity=1.0, letters=False)
            row, column = _centre_of(_colour_mask(picture, value))
            assert (row < 0.5, column < 0.5) == (top_left, top_left), (value, view)


def test_opacity_and_toggles(tmp_path: Path) -> None:
    case = _marked_case(tmp_path)
    index = int(np.nonzero(case.labels == 1)[0].mean())
    full = viewer.render_view(case, "axial", index, opacity=1.0)
    assert full.dtype == np.uint8 and full.ndim == 3 and full.shape[2] == 3
    assert max(full.shape[:2]) >= 320  # small volumes are enlarged, keeping the aspect ratio
    assert _colour_mask(full, 1).sum() > 100
    assert _colour_mask(viewer.render_view(case, "axial", index, opacity=0.0), 1).sum() == 0
    assert _colour_mask(viewer.render_view(case, "axial", index, opacity=1.0, visible=[2]), 1).sum() == 0
    assert viewer.render_view(case, "axial", 10_000).shape == viewer.render_view(case, "axial", -5).shape


def test_legend_table_and_overlay_png(tmp_path: Path) -> None:
    case = _marked_case(tmp_path)
    html = viewer.legend_html(case, visible=[1])
    assert "right &lt;b&gt;" in html and "rgb(31,119,180)" in html and "opacity:0.35" in html
    assert viewer.volume_table(case) == [[1, "right <b>", 64, 0.064], [2, "left", 64, 0.064]]
    through = dict(zip(viewer.VIEWS, (int(axis.mean()) for axis in np.nonzero(case.labels == 1))))
    png = viewer.render_overlay_png(case, through, tmp_path / "overlay.png", opacity=1.0)
    sheet = np.asarray(Image.open(png).convert("RGB"))
    assert sheet.shape[1] > 3 * 200 and _colour_mask(sheet, 1).sum() > 3 * 100
    assert _colour_mask(sheet, 2).sum() > 0  # its legend swatch


def test_a_single_slice_gets_one_view(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((32, 24, 1)).astype(np.float32)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 3.0, 1.0])), path)
    volume = load_volume(path)
    labels = (volume.array[0] > 0.5).astype(np.uint8)
    case = viewer.prepare_case(volume, {"segmentation": volume.with_array(labels)}, {1: "bright"})
    assert case.views() == ["axial"]
    assert viewer.render_view(case, "axial", 0).shape[:2] == (round(320 * 24 / 32), 320)


def test_the_three_views_share_one_scale(tmp_path: Path) -> None:
    # 20 x 24 x 16 voxels of 1 mm: each view's pixels per mm are the same, so the views compare at a glance.
    case = _marked_case(tmp_path)
    sizes = {view: viewer.render_view(case, view, 0, letters=False).shape[:2] for view in viewer.VIEWS}
    scales = set()
    for view, (height, width) in sizes.items():
        _, row_axis, column_axis = viewer.VIEWS[view]
        scales.add(round(height / (case.shape[row_axis] * case.spacing[row_axis]), 1))
        scales.add(round(width / (case.shape[column_axis] * case.spacing[column_axis]), 1))
    assert len(scales) == 1 and max(max(size) for size in sizes.values()) == 320
