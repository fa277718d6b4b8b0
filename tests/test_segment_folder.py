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

    # A label map a person corrected after the job wrote it is kept (and said so), not silently redone.
    edited = out / OUTPUTS[0]
    image = nib.load(edited)
    corrected = np.zeros(image.shape, dtype=np.uint8)
    nib.save(nib.Nifti1Image(corrected, image.affine, image.header), edited)
    status, printed, err = _segment(capsys, *command)
    assert status == 0 and "0 segmented, 3 skipped, 0 failed" in printed
    assert f"case {NAMES[0]} skipped: its label map was changed after medfm wrote it" in err
    assert not np.asarray(nib.load(edited).dataobj).any()

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


# ------------------------------------------------------------------------------------- review regressions


def test_linked_folders_are_searched_but_loops_and_the_output_folder_are_not(tmp_path: Path) -> None:
    root, elsewhere, out = tmp_path / "in", tmp_path / "elsewhere", tmp_path / "out"
    (root / "real").mkdir(parents=True)
    elsewhere.mkdir()
    out.mkdir()
    for folder in (root / "real", elsewhere, out):
        shutil.copy(NIBABEL_DATA / "anatomical.nii", folder / "scan.nii")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # a folder of cases kept elsewhere
    (root / "real" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "root").symlink_to(Path(root.anchor), target_is_directory=True)  # a link to /: a loop as well
    (root / "results").symlink_to(out, target_is_directory=True)  # the job's own output folder
    assert [case.name for case in find_cases(root, exclude=out)] == ["linked/scan.nii", "real/scan.nii"]


def test_a_redone_case_that_fails_leaves_no_stale_label_map(model_dir: Path, tmp_path: Path, capsys) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    shutil.copy(NIBABEL_DATA / "anatomical.nii", root / "a.nii")
    command = [str(root), "--out", str(out), "--model", str(model_dir), "--workers", "0"]
    assert _segment(capsys, *command)[0] == 0 and (out / "a.nii.gz").is_file()
    # The input is replaced by a broken file: the label map of the old input must not stay as the case's result.
    (root / "a.nii").write_bytes((NIBABEL_DATA / "anatomical.nii").read_bytes()[:200])
    status, printed, err = _segment(capsys, *command)
    assert status == 2 and "0 segmented, 0 skipped, 1 failed" in printed and "case a.nii failed" in err
    assert not (out / "a.nii.gz").exists()
    assert json.loads((out / "a.json").read_text())["status"] == "failed"


def test_cases_a_folder_job_cannot_read_say_what_to_do(
    model_dir: Path, tmp_path: Path, ct_small_path: Path, capsys
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(NIBABEL_DATA / "anatomical.nii", root / "a.nii")
    (root / "gone.nii").symlink_to(tmp_path / "moved.nii")
    for index in range(2):  # two series in one folder
        positions = [np.array([0.0, 0.0, 2.5 * k]) for k in range(2)]
        write_dicom_series(root / "mixed", ct_small_path, positions, size=(16, 16), shuffle_seed=index)
        for path in (root / "mixed").glob("IM*.dcm"):
            path.rename(path.with_name(f"s{index}_{path.name}"))
    status, printed, err = _segment(
        capsys, str(root), "--out", str(tmp_path / "out"), "--model", str(model_dir), "--workers", "0"
    )
    assert status == 2 and "1 segmented, 0 skipped, 2 failed" in printed
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("medfm segment: case gone.nii failed: is a symbolic link to ")
    assert lines[0].endswith("which does not exist; fix or remove the link")
    assert lines[1].startswith("medfm segment: case mixed failed: holds 2 series")
    assert "series_uid=" not in lines[1] and "move each series into a folder of its own" in lines[1]


@pytest.mark.parametrize(
    ("setup", "out", "message"),
    [
        (
            lambda root: [(root / "a.nii").write_bytes(b""), (root.parent / "file").write_text("")],
            "file/out",
            "file is a file",
        ),
        (
            lambda root: [(root / "in").mkdir(), (root / "in" / "a.nii").write_bytes(b"")],
            "",  # --out the folder that holds the input folder: in/a.nii's label map would land on in/a.nii.gz
            "case in/a.nii would be written to",
        ),
        (lambda root: (root / "a.nii").write_bytes(b""), "labels.nii.gz", "is a folder of cases (1 found"),
    ],
)
def test_more_jobs_that_cannot_run_are_refused_before_loading(
    setup, out: str, message: str, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "top" / "in"
    root.mkdir(parents=True)
    setup(root)
    target = tmp_path / "top" / out if out else tmp_path / "top"
    status, printed, err = _segment(capsys, str(root), "--out", str(target), "--model", "nowhere")
    assert status == 2 and printed == ""
    assert err.startswith("medfm segment: error: ") and message in err and len(err.splitlines()) == 1


def test_an_unwritable_output_folder_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import medfm.batch_segmentation as batch

    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    (root / "a.nii").write_bytes(b"")
    # A read-only file system (or a folder not ours): the model would run on every case, then fail to write.
    monkeypatch.setattr(batch.os, "access", lambda path, mode: False)
    status, printed, err = _segment(capsys, str(root), "--out", str(out / "sub"), "--model", "nowhere")
    assert status == 2 and printed == "" and len(err.splitlines()) == 1
    assert f"{out}, where it would be created, is read-only or not yours to write" in err
    assert not (out / "sub").exists()


_KILLED_JOB = """
import os, sys, time
from pathlib import Path
from transformers import pipeline
import medfm
from medfm import batch_segmentation as batch

marks = Path(sys.argv[3])
read = batch._CaseReader.__getitem__

def reading(self, index):
    (marks / f"worker-{os.getpid()}").write_text("")
    return read(self, index)

def forward(*args, **kwargs):
    (marks / "main").write_text("")
    time.sleep(120)

batch._CaseReader.__getitem__ = reading
segmenter = pipeline("medical-segmentation", model=sys.argv[4])
segmenter.forward = forward
batch.segment_folder(segmenter, sys.argv[1], sys.argv[2], workers=2)
"""


def test_reading_workers_die_with_a_killed_job(model_dir: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    root, marks = tmp_path / "in", tmp_path / "marks"
    root.mkdir()
    marks.mkdir()
    for index in range(4):  # cases larger than a pipe's buffer, so a read-ahead case blocks its worker
        data = np.random.default_rng(index).random((48, 48, 48)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), root / f"c{index}.nii")
    job = subprocess.Popen(
        [sys.executable, "-c", _KILLED_JOB, str(root), str(tmp_path / "out"), str(marks), str(model_dir)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    def workers() -> list[int]:
        return [int(path.name.split("-")[1]) for path in marks.glob("worker-*")]

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    try:
        deadline = time.monotonic() + 120
        while not ((marks / "main").exists() and len(workers()) == 2) and time.monotonic() < deadline:
            assert job.poll() is None, "the job ended before its workers read ahead"
            time.sleep(0.1)
        assert len(workers()) == 2
        time.sleep(1)  # the workers' read-ahead cases are on their way into the pipe
        job.send_signal(signal.SIGKILL)  # what a scheduler's time limit does, after SIGTERM
        job.wait()
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in workers() if alive(pid)]
        assert left == [], f"workers {left} outlived their job"
    finally:
        job.kill()
        for pid in workers():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
