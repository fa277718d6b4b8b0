"""``medfm segment IN_DIR --out OUT_DIR`` (issue 14, item 3): every NIfTI file and DICOM series under a folder,
resumable, one bad case failing alone, a ``volumes.csv``, DataLoader workers, several processes, and the
single-file command's ``--tta`` and ``--sw-batch-size``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from transformers import pipeline

import medfm  # noqa: F401  (registers the pipeline)
from medfm.batch_segmentation import Case, ProcessInfo, find_cases, process_info, segment_folder
from medfm.cli import main
from medfm.io import load_volume, write_nifti

from .common.tiny_models import TISSUES, save_tiny_segmentation_model
from .conftest import NIBABEL_DATA, write_dicom_series
from .examples import launch_on_two_cpu_processes

#: The cases of :func:`cases`, as the job names them, and where their label maps go (relative to OUT).
NAMES = ["site1/case.nii", "site2/ct", "site2/deeper/case.nii.gz"]
OUTPUTS = ["site1/case.nii.gz", "site2/ct.nii.gz", "site2/deeper/case.nii.gz"]
COLUMNS = ["case", "input", "output", "status", *(f"{name} (ml)" for name in TISSUES.values()), "error"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_tiny_segmentation_model(folder)
    return folder


@pytest.fixture
def cases(tmp_path: Path, ct_small_path: Path) -> Path:
    """Two NIfTI files with the same name in different folders (nibabel's shipped MRI and a synthetic 2 mm
    volume) and a DICOM series of 6 slices."""
    root = tmp_path / "in"
    (root / "site1").mkdir(parents=True)
    shutil.copy(NIBABEL_DATA / "anatomical.nii", root / "site1" / "case.nii")
    data = np.random.default_rng(0).random((32, 32, 24)).astype(np.float32)
    affine = np.array(
        [[0.0, 0, 2, -20], [2, 0, 0, -30], [0, 2, 0, 5], [0, 0, 0, 1]]
    )  # not axis-aligned as stored
    (root / "site2" / "deeper").mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine), root / "site2" / "deeper" / "case.nii.gz")
    positions = [np.array([-10.0, -12.0, 2.5 * k]) for k in range(6)]
    write_dicom_series(root / "site2" / "ct", ct_small_path, positions, size=(32, 32))
    (root / "site2" / "notes.txt").write_text("not a case")
    return root


def _segment(capsys, *arguments: str) -> tuple[int, str, str]:
    status = main(["segment", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "volumes.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def _labels(out: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(nib.load(out / name).dataobj) for name in OUTPUTS}


def test_cases_are_found_recursively_and_named_by_their_relative_path(cases: Path) -> None:
    found = find_cases(cases)
    assert [case.name for case in found] == NAMES
    assert [case.kind for case in found] == ["nifti", "dicom", "nifti"]
    assert [case.output("OUT").as_posix() for case in found] == [f"OUT/{name}" for name in OUTPUTS]
    assert Case("a/b.nii.gz", Path("a/b.nii.gz"), "nifti").record("OUT") == Path("OUT/a/b.json")


def test_a_folder_segments_then_resumes(cases: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    command = [str(cases), "--out", str(out), "--model", str(model_dir), "--workers", "0"]
    status, printed, err = _segment(capsys, *command)
    assert status == 0 and err == ""
    assert "3 cases under" in printed and "(2 NIfTI, 1 DICOM series)" in printed
    assert "3 segmented, 0 skipped, 0 failed" in printed
    # Each label map lies on its input's grid: same shape and affine as the input written back as NIfTI.
    for name, output in zip(NAMES, OUTPUTS):
        reference = write_nifti(load_volume(cases / name), tmp_path / "reference.nii.gz")
        written, expected = nib.load(out / output), nib.load(reference)
        assert written.shape == expected.shape
        np.testing.assert_allclose(written.affine, expected.affine, atol=1e-5)
    # volumes.csv: one row per case, the volumes those of the label maps.
    rows = _rows(out)
    assert [row["case"] for row in rows] == NAMES and {row["status"] for row in rows} == {"ok"}
    assert [row["output"] for row in rows] == OUTPUTS and all(row["error"] == "" for row in rows)
    anatomical = nib.load(out / OUTPUTS[0])
    voxel_ml = float(np.prod(anatomical.header.get_zooms()[:3])) / 1000
    for label, name in TISSUES.items():
        expected_ml = float((np.asarray(anatomical.dataobj) == label).sum()) * voxel_ml
        assert float(rows[0][f"{name} (ml)"]) == pytest.approx(expected_ml, abs=1e-6)
    record = json.loads((out / "site2" / "ct.json").read_text())
    assert record["status"] == "ok" and record["kind"] == "dicom" and record["process"] == 0
    assert record["input_fingerprint"]["files"] == 6

    first = _labels(out)
    stamps = {name: (out / name).stat().st_mtime_ns for name in OUTPUTS}
    status, printed, _ = _segment(capsys, *command)
    assert status == 0 and "0 segmented, 3 skipped, 0 failed" in printed
    assert {name: (out / name).stat().st_mtime_ns for name in OUTPUTS} == stamps  # nothing rewritten

    # A label map without its record is not trusted: that case alone is redone.
    (out / "site2" / "deeper" / "case.json").unlink()
    status, printed, _ = _segment(capsys, *command)
    assert status == 0 and "1 segmented, 2 skipped, 0 failed" in printed
    assert "segmented site2/deeper/case.nii.gz" in printed
    # So is a case whose input changed since its record was written.
    nifti = cases / "site1" / "case.nii"
    nifti.write_bytes(nifti.read_bytes())
    status, printed, _ = _segment(capsys, *command)
    assert (
        status == 0
        and "1 segmented, 2 skipped, 0 failed" in printed
        and "segmented site1/case.nii" in printed
    )

    status, printed, _ = _segment(capsys, *command, "--overwrite")
    assert status == 0 and "3 segmented, 0 skipped, 0 failed" in printed
    assert all(np.array_equal(first[name], labels) for name, labels in _labels(out).items())
    assert len(_rows(out)) == 3

    # Other settings make other label maps: --tta redoes every case, and its records say so.
    status, printed, _ = _segment(capsys, *command, "--tta", "--sw-batch-size", "2")
    assert status == 0 and "3 segmented, 0 skipped, 0 failed" in printed
    assert json.loads((out / "site2" / "ct.json").read_text())["settings"]["tta"] is True


def test_bad_cases_fail_alone(cases: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    (cases / "site1" / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", cases / "site2" / "fmri.nii.gz")  # 4D: not one volume
    out = tmp_path / "out"
    command = [str(cases), "--out", str(out), "--model", str(model_dir), "--workers", "2"]
    status, printed, err = _segment(capsys, *command)
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("medfm segment: case site1/broken.nii.gz failed: ") and "gzip" in lines[0]
    assert lines[1].startswith("medfm segment: case site2/fmri.nii.gz failed: ") and "4D volume" in lines[1]
    assert "3 segmented, 0 skipped, 2 failed" in printed and "(5 cases, 2 failed)" in printed
    assert all((out / name).is_file() for name in OUTPUTS)
    assert not (out / "site1" / "broken.nii.gz").exists()
    rows = {row["case"]: row for row in _rows(out)}
    assert (
        rows["site1/broken.nii.gz"]["status"] == "failed" and "gzip" in rows["site1/broken.nii.gz"]["error"]
    )
    assert rows["site1/broken.nii.gz"]["grey matter (ml)"] == ""
    assert [rows[name]["status"] for name in NAMES] == ["ok"] * 3
    # A second run skips what is done and tries the failed cases again.
    status, printed, err = _segment(capsys, *command)
    assert status == 2 and "0 segmented, 3 skipped, 2 failed" in printed and "broken.nii.gz failed" in err


def test_interrupt_stops_the_job_with_130(cases: Path, model_dir: Path, tmp_path: Path, monkeypatch, capsys):
    import multiprocessing

    from medfm.pipelines.medical_segmentation import MedicalSegmentationPipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MedicalSegmentationPipeline, "_forward", interrupted)
    out = tmp_path / "out"
    status, _, err = _segment(
        capsys, str(cases), "--out", str(out), "--model", str(model_dir), "--workers", "2"
    )
    assert status == 130 and err == "medfm segment: interrupted\n"
    assert not list(out.rglob("*.json")) and not (out / "volumes.csv").exists()
    assert multiprocessing.active_children() == []  # the reading workers are gone


@pytest.mark.parametrize(
    ("setup", "out", "message"),
    [
        (lambda root: None, "out", "no NIfTI files (.nii, .nii.gz) or DICOM series found under it"),
        (lambda root: (root / "a.nii").write_bytes(b""), "in/labels", "is inside the input folder"),
        (lambda root: (root / "a.nii").write_bytes(b""), "in", "is inside the input folder"),
        (
            lambda root: [(root / name).write_bytes(b"") for name in ("x.nii", "x.nii.gz")],
            "out",
            "cases x.nii and x.nii.gz would both be written to",
        ),
    ],
)
def test_jobs_that_cannot_run_are_refused_before_loading(
    setup, out: str, message: str, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    setup(root)
    # No model folder is needed: the refusal comes before any loading.
    status, printed, err = _segment(capsys, str(root), "--out", str(tmp_path / out), "--model", "nowhere")
    assert status == 2 and printed == ""
    assert err.startswith("medfm segment: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (root / "labels").exists()


def test_overlay_is_refused_for_a_folder(cases: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    status, _, err = _segment(
        capsys, str(cases), "--out", str(tmp_path / "out"), "--model", str(model_dir), "--overlay", "x.png"
    )
    assert status == 2 and "--overlay draws one volume" in err


def test_workers_do_not_change_the_results(cases: Path, model_dir: Path, tmp_path: Path) -> None:
    segmenter = pipeline("medical-segmentation", model=str(model_dir))
    seen = []
    inline = segment_folder(segmenter, cases, tmp_path / "inline", workers=0, on_case=seen.append)
    forked = segment_folder(segmenter, cases, tmp_path / "forked", workers=2)
    assert (
        [o.case.name for o in seen] == NAMES
        and inline.exit_status == 0
        and inline.summary() == forked.summary()
    )
    for name, labels in _labels(tmp_path / "inline").items():
        assert np.array_equal(labels, _labels(tmp_path / "forked")[name])
    assert (tmp_path / "inline" / "volumes.csv").read_text() == (
        tmp_path / "forked" / "volumes.csv"
    ).read_text()


@pytest.mark.slow
def test_two_processes_split_the_cases(cases: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    arguments = ["segment", str(cases), "--out", str(out), "--model", str(model_dir), "--workers", "1"]
    done = launch_on_two_cpu_processes("medfm", arguments, timeout=240, module=True)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(case.record(out).read_text()) for case in find_cases(cases)]
    # Process i takes cases i, i + 2, ...: each case done once, by the process it was dealt to.
    assert [(r["case"], r["process"], r["processes"]) for r in records] == [
        (name, index % 2, 2) for index, name in enumerate(NAMES)
    ]
    assert "process 0 of 2: 2 segmented" in done.stdout and "process 1 of 2: 1 segmented" in done.stdout
    assert [row["status"] for row in _rows(out)] == ["ok"] * 3


def test_processes_that_cannot_see_each_other_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate
    import torch

    from medfm.errors import DistributedLaunchError

    # What a launcher gives when it sets WORLD_SIZE but Accelerate builds no process group: each process would
    # segment every case.
    alone = SimpleNamespace(num_processes=1, distributed_type="NO", device=torch.device("cpu"))
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedLaunchError, match="each runs alone"):
        process_info()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_info() == ProcessInfo()


def test_single_volume_tta_and_window_batches(
    anatomical_path: Path, model_dir: Path, tmp_path: Path, capsys
) -> None:
    roi = ["--roi-size", "8", "32", "64"]  # three windows on this volume
    common = [str(anatomical_path), "--model", str(model_dir), *roi]
    maps = {}
    for name, extra in [("one", []), ("two", ["--sw-batch-size", "2"]), ("tta", ["--tta"])]:
        out = tmp_path / f"{name}.nii.gz"
        status, printed, _ = _segment(capsys, *common, "--out", str(out), *extra)
        assert status == 0 and f"wrote {out}" in printed
        maps[name] = np.asarray(nib.load(out).dataobj)
    assert np.array_equal(maps["one"], maps["two"])
    expected = pipeline("medical-segmentation", model=str(model_dir))(
        str(anatomical_path), roi_size=(8, 32, 64), tta=True
    )["label_map"]
    assert np.array_equal(maps["tta"], expected)
    status, _, err = _segment(capsys, *common, "--out", str(tmp_path / "x.nii.gz"), "--sw-batch-size", "0")
    assert status == 2 and "--sw-batch-size 0" in err
