"""Folder-to-folder segmentation: every NIfTI file and DICOM series under a folder, in one resumable job.

``medfm segment IN_DIR --out OUT_DIR --model M`` runs :func:`segment_folder`. The job

- finds its cases recursively (:func:`find_cases`): each ``.nii``/``.nii.gz`` file, and each folder that holds
  DICOM slices (one series, read as :func:`medfm.io.load_volume` reads a series folder);
- writes each label map on its input's grid under the same relative path (``IN/sub/ct.nii.gz`` ->
  ``OUT/sub/ct.nii.gz``, the series folder ``IN/a/b/`` -> ``OUT/a/b.nii.gz``) and, after it, a small JSON
  record of the case (``OUT/sub/ct.json``: input fingerprint, model, settings, per-label volumes, status);
- skips a case whose record says it is done with the same input, model and settings and whose label map is
  the one the record describes, so an interrupted job resumes where it stopped;
- goes on after a bad case (its record says ``failed`` and why);
- reads and preprocesses the next cases in DataLoader workers while the model runs on the current one;
- splits the cases across the processes of an ``accelerate launch`` (or ``torchrun``), each on its own device;
- ends with ``OUT/volumes.csv``: one row per case, built from the records (resumed cases included).

The model's own pipeline does the work (its ``preprocess``, ``forward`` and ``postprocess``), so a folder job
gives exactly what ``pipeline("medical-segmentation")`` gives for each file.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .distributed import check_processes_joined, launched_processes
from .errors import (
    BatchOutputError,
    DatasetError,
    DistributedLaunchError,
    MedfmError,
    MixedSeriesError,
    OutputPathError,
    VolumeNotFoundError,
    one_line,
)
from .io.atomic import atomic_output
from .io.dicom import is_dicom_file
from .io.nifti import is_nifti_path

__all__ = [
    "BARRIER_TIMEOUT",
    "RECORD_FORMAT",
    "VOLUMES_CSV",
    "BatchReport",
    "Case",
    "CaseOutcome",
    "ProcessInfo",
    "check_folders",
    "default_workers",
    "find_cases",
    "holds_dicom_slices",
    "process_info",
    "segment_folder",
    "write_volumes_csv",
]

#: The table :func:`segment_folder` writes in the output folder.
VOLUMES_CSV = "volumes.csv"
#: The ``format`` field of a case record; a record of another format is not trusted (the case is redone).
RECORD_FORMAT = "medfm-segment-case/1"
#: How long a process that finished its share waits at the end for the others (the default of torch's
#: process groups, 30 minutes, is shorter than the gap a long job's last cases can leave).
BARRIER_TIMEOUT = timedelta(hours=24)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One input of a folder job.

    Attributes:
        name: The input's path relative to the input folder, with ``/`` separators (``"sub/ct.nii.gz"``, or
            ``"a/b"`` for a DICOM series folder): how the job names the case.
        source: The NIfTI file or the DICOM series folder.
        kind: ``"nifti"`` or ``"dicom"``.
    """

    name: str
    source: Path
    kind: str

    @property
    def stem(self) -> str:
        """The outputs' relative path without suffix: ``sub/ct`` for ``sub/ct.nii.gz``, ``a/b`` for a series."""
        if self.kind == "nifti":
            for suffix in _NIFTI_SUFFIXES:
                if self.name.lower().endswith(suffix):
                    return self.name[: -len(suffix)]
        return self.name

    def output(self, out_dir: str | os.PathLike) -> Path:
        """Where the case's label map goes: ``OUT/<stem>.nii.gz``."""
        return Path(out_dir) / f"{self.stem}.nii.gz"

    def record(self, out_dir: str | os.PathLike) -> Path:
        """Where the case's record goes: ``OUT/<stem>.json``, written after the label map."""
        return Path(out_dir) / f"{self.stem}.json"


def _visible(name: str) -> bool:
    return not name.startswith(".")


def holds_dicom_slices(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` itself (not a subfolder) holds a DICOM file (:func:`medfm.io.dicom.is_dicom_file`:
    the DICOM preamble or a ``.dcm``/``.dicom`` name), i.e. it is a series folder rather than a folder of cases.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return False
    for entry in entries:
        if not _visible(entry.name) or entry.name.upper() == "DICOMDIR" or is_nifti_path(entry.name):
            continue
        try:
            if entry.is_file() and is_dicom_file(entry.path):
                return True
        except OSError:
            continue
    return False


def find_cases(in_dir: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Case]:
    """The cases under ``in_dir``, sorted by name: every NIfTI file, and every folder holding DICOM slices.

    A series folder is read as :func:`medfm.io.load_volume` reads one (its subfolders included), so folders
    below it are not series of their own; NIfTI files are cases wherever they are. Hidden files and folders
    (names starting with ``.``) and ``DICOMDIR`` files are passed over, as the DICOM reader does. Symbolic links
    are followed, to files and to folders (a folder of cases linked in from elsewhere is searched), except a
    link that leads back to a folder the search is already in (a loop).

    Args:
        in_dir: The folder to search.
        exclude: A folder never searched, however it is reached (a job's output folder, which a link inside
            ``in_dir`` may lead to: its label maps are not cases).

    Raises:
        VolumeNotFoundError: ``in_dir`` is not a folder.
    """
    root = Path(in_dir)
    if not root.is_dir():
        raise VolumeNotFoundError(
            "no such folder; a folder job takes a folder of NIfTI files and DICOM series", root
        )
    excluded = os.path.realpath(exclude) if exclude is not None else None
    # The real paths of the folders each walked folder lies in (by the walk), to refuse links that loop.
    chains: dict[str, frozenset[str]] = {os.fspath(root): frozenset({os.path.realpath(root)})}
    cases: list[Case] = []
    series: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        chain = chains.pop(folder, frozenset())
        real_here = os.path.realpath(folder)
        kept = []
        for name in sorted(d for d in dirs if _visible(d)):
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real == excluded:
                continue
            if os.path.islink(path) and (real in chain or _within(real_here, real)):
                continue  # a link back to a folder the walk is in: following it would never end
            chains[path] = chain | {real}
            kept.append(name)
        dirs[:] = kept
        here = Path(folder)
        relative = here.relative_to(root).as_posix()
        inside_series = any(s == here or s in here.parents for s in series)
        if not inside_series and holds_dicom_slices(here):
            series.append(here)
            cases.append(Case(root.resolve().name if relative == "." else relative, here, "dicom"))
        for name in sorted(files):
            if _visible(name) and is_nifti_path(name) and len(name) > len(".nii"):
                path = here / name
                cases.append(Case(path.relative_to(root).as_posix(), path, "nifti"))
    return sorted(cases, key=lambda case: case.name)


def _within(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_folders(in_dir: str | os.PathLike, out_dir: str | os.PathLike, cases: Sequence[Case]) -> None:
    """Refuse, before anything runs, a folder job that cannot run as asked.

    Raises:
        DatasetError: ``in_dir`` holds no NIfTI file and no DICOM series.
        OutputPathError: ``out_dir`` is a file, or ``in_dir`` itself or a folder inside it (its label maps
            would be found as cases by the next run), or cannot be written (read-only, no permission).
        BatchOutputError: Two cases would write the same label map (``a/ct.nii`` and ``a/ct.nii.gz``, or a
            series folder ``a/ct/`` and ``a/ct.nii.gz``).
    """
    source, target = Path(in_dir).resolve(), Path(out_dir).resolve()
    if target == source or source in target.parents:
        raise OutputPathError(
            f"is inside the input folder {in_dir}, so the next run would read its label maps as cases; choose "
            "an output folder outside it",
            out_dir,
        )
    if target.exists() and not target.is_dir():
        raise OutputPathError("is a file; for a folder of inputs --out takes a folder", out_dir)
    _check_writable(target, out_dir)
    if not cases:
        raise DatasetError(
            "no NIfTI files (.nii, .nii.gz) or DICOM series found under it (searched recursively)", in_dir
        )
    seen: dict[str, Case] = {}
    real_source = os.path.realpath(source)
    for case in cases:
        for written in (case.output(out_dir), case.record(out_dir)):
            if _within(os.path.realpath(written), real_source):
                raise BatchOutputError(
                    f"case {case.name} would be written to {written}, inside the input folder (the output folder "
                    "holds the input folder); choose an output folder that does not hold the input folder",
                    in_dir,
                )
        key = case.stem
        if key in seen:
            raise BatchOutputError(
                f"cases {seen[key].name} and {case.name} would both be written to {case.output(out_dir)}; rename "
                "one of them (or segment them into separate output folders)",
                in_dir,
            )
        seen[key] = case


def _check_writable(target: Path, out_dir: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be written (or created), before any case runs the model only to fail
    at writing its label map."""
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(
            f"cannot be created: {existing} is a file; choose another output folder", out_dir
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == target else f"{existing}, where it would be created,"
        raise OutputPathError(
            f"cannot be written: {where} is read-only or not yours to write (permission denied or a read-only "
            "file system); choose a writable output folder",
            out_dir,
        )


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class ProcessInfo:
    """Which share of a folder job this process runs.

    Attributes:
        index: This process's rank (0 is the main process, which writes ``volumes.csv``).
        count: How many processes share the job.
        device: The device this process should run the model on (``None``: the caller's choice).
        wait_for_everyone: Blocks until every process reaches it (``None`` for a single process).
    """

    index: int = 0
    count: int = 1
    device: str | None = None
    wait_for_everyone: Callable[[], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def process_info() -> ProcessInfo:
    """This process's share of a job launched with ``accelerate launch`` (or ``torchrun``): its rank, the number
    of processes, its device (``cuda:<local rank>`` on GPUs) and a barrier. One process when ``WORLD_SIZE`` is
    unset or 1.

    On a machine without GPUs the processes join a gloo process group whether or not the launch asked for CPU
    (``--cpu`` / ``ACCELERATE_USE_CPU=1``).

    Raises:
        DistributedLaunchError: Several processes were launched but cannot see each other.
    """
    launched = launched_processes()
    if launched <= 1:
        return ProcessInfo()
    import torch
    from accelerate import PartialState

    try:
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    except (RuntimeError, ValueError) as error:
        raise DistributedLaunchError(
            f"{launched} processes were launched but cannot form a process group ({error}); launch with "
            "`accelerate launch --num_processes N` (on a machine without GPUs add --cpu or set "
            "ACCELERATE_USE_CPU=1) or torchrun"
        ) from error
    check_processes_joined(
        state.num_processes,
        state.distributed_type,
        ", so each would segment every case; launch with `accelerate launch --num_processes N` (on a machine "
        "without GPUs add --cpu or set ACCELERATE_USE_CPU=1)",
    )
    device = str(state.device) if state.device is not None and state.device.type != "cpu" else None
    return ProcessInfo(state.process_index, state.num_processes, device, state.wait_for_everyone)


# ---------------------------------------------------------------------------------------------- the records


def _fingerprint(path: Path) -> dict[str, int]:
    """Files, bytes and newest modification time (ns) of a file, or of the visible files under a folder."""
    if path.is_file():
        stat = path.stat()
        return {"files": 1, "bytes": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}
    files = size = newest = 0
    for folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if _visible(d)]
        for name in names:
            if not _visible(name):
                continue
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            files, size, newest = files + 1, size + int(stat.st_size), max(newest, int(stat.st_mtime_ns))
    return {"files": files, "bytes": size, "mtime_ns": newest}


def _model_identity(pipeline: Any) -> dict[str, Any]:
    """What says which model made a label map: its id (a local folder resolved), its Hub revision, and the
    fingerprint of a local folder's top-level files (a model saved again into the same folder is another one)."""
    model = pipeline.model
    name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    identity: dict[str, Any] = {"id": name, "revision": getattr(model.config, "_commit_hash", None)}
    folder = Path(name).expanduser()
    if name and folder.is_dir():
        identity["id"] = str(folder.resolve())
        files = sorted(p for p in folder.iterdir() if p.is_file() and _visible(p.name))
        identity["files"] = {p.name: [int(p.stat().st_size), int(p.stat().st_mtime_ns)] for p in files}
    return identity


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _write_record(path: Path, record: dict[str, Any], protect: Iterable[Path]) -> None:
    with atomic_output(path, inputs=protect) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")


#: What :func:`_done_state` says of a case whose label map was changed after its record was written.
EDITED = "edited"


def _done_state(case: Case, out_dir: Path, model: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """``"done"`` when the case's outputs are complete: a record saying ``ok``, made from this very input (size
    and modification time), by this model with these settings, next to the label map it describes;
    :data:`EDITED` when all that holds but the label map was changed since (a person corrected it in a viewer:
    it is kept, not overwritten); ``None`` when the case is to be (re)done."""
    record = _read_record(case.record(out_dir))
    if record is None or record.get("status") != "ok":
        return None
    if record.get("model") != model or record.get("settings") != settings:
        return None
    if record.get("input_fingerprint") != _fingerprint(case.source):
        return None
    output = case.output(out_dir)
    if not output.is_file():
        return None
    return "done" if record.get("output_fingerprint") == _fingerprint(output) else EDITED


# ------------------------------------------------------------------------------------------ the outcomes


@dataclass
class CaseOutcome:
    """What became of one case in this run.

    Attributes:
        case: The case.
        status: ``"ok"`` (segmented now), ``"skipped"`` (done by an earlier run) or ``"failed"``.
        output: The label map (``None`` when the case failed).
        record: The case's record as written (or as found, for a skipped case).
        error: One line saying why the case failed (for a skipped case: why it was kept, when it was edited).
        details: The failure's traceback, for ``--debug``.
        seconds: Time spent on the case in this process (reading and preprocessing included).
    """

    case: Case
    status: str
    output: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    details: str | None = None
    seconds: float = 0.0


@dataclass
class BatchReport:
    """What :func:`segment_folder` did in this process.

    Attributes:
        in_dir: The input folder.
        out_dir: The output folder.
        outcomes: One per case of this process's share, in case order.
        process: This process's share.
        total_cases: Cases of the whole job (all processes).
        volumes_csv: The table, when this process wrote it (the main process).
        job_failed: Failed cases of the whole job, read from the records (main process only).
    """

    in_dir: Path
    out_dir: Path
    outcomes: list[CaseOutcome]
    process: ProcessInfo = field(default_factory=ProcessInfo)
    total_cases: int = 0
    volumes_csv: Path | None = None
    job_failed: int | None = None

    def _count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.outcomes)

    @property
    def segmented(self) -> int:
        return self._count("ok")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def exit_status(self) -> int:
        """The job's exit status, 2 when a case failed, else 0. In a multi-process job the main process gives
        the whole job's status and the others 0 (their failed cases are in the records and the table): a
        launcher stops every process as soon as one exits with an error."""
        if not self.process.is_main:
            return 0
        return 2 if self.failed or self.job_failed else 0

    def summary(self) -> str:
        """``N segmented, S skipped, F failed`` (of this process's share)."""
        return f"{self.segmented} segmented, {self.skipped} skipped, {self.failed} failed"


# ------------------------------------------------------------------------------------- reading in workers


def _one_line(error: BaseException, source: Path | None = None) -> str:
    """An error as one line: a medfm error's reason (without the path when it is the case's own input), any
    other error's first line with its type when that is not self-explanatory."""
    text = None
    if isinstance(error, MedfmError) and source is not None and error.path is not None:
        text = error.reason if Path(error.path).resolve() == source.resolve() else str(error)
    line = one_line(error, text)
    if isinstance(error, MixedSeriesError):
        # The reader's advice (series_uid=) is not an option of a folder job.
        line = line.replace(
            "(pass series_uid= to choose)",
            "(a folder job reads one series per folder: move each series into a folder of its own)",
        )
    return line


@dataclass
class _Prepared:
    """A case read and preprocessed in a worker, or why it could not be."""

    case: Case
    inputs: dict[str, Any] | None
    fingerprint: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    details: str | None = None
    seconds: float = 0.0


class _CaseReader:
    """The DataLoader's dataset: case ``i`` read and preprocessed by the pipeline's own ``preprocess``. An error
    comes back as a failed item instead of being raised, so one bad file does not stop the loader."""

    def __init__(self, pipeline: Any, cases: Sequence[Case], preprocess_params: dict[str, Any]):
        self.pipeline = pipeline
        self.cases = list(cases)
        self.preprocess_params = preprocess_params

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> _Prepared:
        case = self.cases[index]
        start = time.perf_counter()
        # Taken before reading: a record describes the input as it was read.
        fingerprint = _fingerprint(case.source)
        try:
            if case.source.is_symlink() and not case.source.exists():
                raise VolumeNotFoundError(
                    f"is a symbolic link to {os.readlink(case.source)}, which does not exist; fix or remove the link",
                    case.source,
                )
            inputs = self.pipeline.preprocess(os.fspath(case.source), **self.preprocess_params)
        except Exception as error:  # any failure of one case is that case's, reported with it
            return _Prepared(
                case,
                None,
                fingerprint,
                _one_line(error, case.source),
                traceback.format_exc(),
                time.perf_counter() - start,
            )
        return _Prepared(case, inputs, fingerprint, seconds=time.perf_counter() - start)


def _pass_through(item: _Prepared) -> _Prepared:
    """The DataLoader's collate function: one case at a time, as it came."""
    return item


def _worker_context(workers: int) -> tuple[int, Any]:
    """Workers and their start method. Workers are forked (Linux): they get the pipeline without pickling its
    model. Where forking is not the platform's way (macOS, Windows), cases are read in the main process."""
    if workers <= 0:
        return 0, None
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return workers, multiprocessing.get_context("fork")
    return 0, None


def _die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader worker start (Linux): have the kernel kill this worker when the process that started it dies.

    A job killed by SIGTERM or SIGKILL (a scheduler's time limit, ``kill``) cannot stop its workers, and they
    do not stop by themselves: each blocks for ever writing its read-ahead case into a pipe that its sibling
    workers still hold open, keeping a preprocessed volume in memory.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux's C library: nothing to ask for
        return
    if os.getppid() != parent:  # the job died before the request was made
        os._exit(1)


def _loader(pipeline: Any, cases: Sequence[Case], preprocess_params: dict[str, Any], workers: int):
    from torch.utils.data import DataLoader

    workers, context = _worker_context(workers)
    options: dict[str, Any] = {}
    if workers:
        # One case ahead per worker: a preprocessed CT can take gigabytes.
        options = {
            "multiprocessing_context": context,
            "prefetch_factor": 1,
            "persistent_workers": False,
            "worker_init_fn": functools.partial(_die_with_parent, os.getpid()),
        }
    return DataLoader(
        _CaseReader(pipeline, cases, preprocess_params),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_pass_through,
        **options,
    )


# -------------------------------------------------------------------------------------------------- the job


def default_workers() -> int:
    """``min(2, CPU count)``: two cases read ahead keep a GPU fed without taking the machine's cores."""
    return min(2, os.cpu_count() or 1)


def segment_folder(
    pipeline: Any,
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    tta: bool = False,
    sw_batch_size: int = 1,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    mode: str = "gaussian",
    bfloat16: bool = False,
    progress: bool | None = None,
    processes: ProcessInfo | None = None,
    cases: Sequence[Case] | None = None,
    on_case: Callable[[CaseOutcome], None] | None = None,
) -> BatchReport:
    """Segment every NIfTI file and DICOM series under ``in_dir`` into ``out_dir`` (see the module's docstring).

    Args:
        pipeline: A ``pipeline("medical-segmentation")``; its model, processor and device are used as they are.
        in_dir: Folder searched recursively for cases (:func:`find_cases`).
        out_dir: Output folder (created); it must not be ``in_dir`` or inside it.
        overwrite: Redo every case, even those an earlier run finished.
        workers: DataLoader worker processes reading and preprocessing the next cases while the model runs
            (default :func:`default_workers`; 0 reads in this process).
        tta: Test-time augmentation by mirroring (:func:`~medfm.inference.sliding_window_logits`).
        sw_batch_size: Windows per forward pass.
        roi_size: Sliding window ``(D, H, W)``; by default the pipeline's.
        overlap: Window overlap.
        mode: Window blending, ``"gaussian"`` or ``"constant"``.
        bfloat16: bfloat16 autocast.
        progress: Progress bars on stderr, one over cases and one over each case's windows below it. ``None``:
            when a person watches (:func:`~medfm.inference.progress_wanted`); only the main process shows them.
        processes: This process's share of a multi-process job (:func:`process_info`); by default the whole job.
            Process ``i`` of ``n`` takes cases ``i, i + n, ...``; the main process writes ``volumes.csv`` once
            every process is done.
        cases: The cases, when already found (:func:`find_cases`); found here otherwise.
        on_case: Called with each case's :class:`CaseOutcome` as it finishes (skipped cases included).

    Returns:
        A :class:`BatchReport` of this process's cases.

    Raises:
        DatasetError: No case under ``in_dir``.
        OutputPathError: ``out_dir`` inside ``in_dir``, or a file.
        BatchOutputError: Two cases would write the same label map.
        ValueError: An invalid option (``overlap``, ``roi_size``, ``sw_batch_size``...).
        DistributedLaunchError: The processes of a multi-process job could not all finish.

        A case that fails does not raise: its outcome says ``failed`` and the job goes on.
    """
    from .inference import progress_wanted

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    processes = processes or ProcessInfo()
    cases = list(find_cases(in_dir, exclude=out_dir) if cases is None else cases)
    check_folders(in_dir, out_dir, cases)
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be 0 or more; got {workers}")
    options = {
        "overlap": overlap,
        "sw_batch_size": sw_batch_size,
        "mode": mode,
        "bfloat16": bfloat16,
        "tta": tta,
    }
    if roi_size is not None:
        options["roi_size"] = roi_size
    preprocess_params, forward_params, postprocess_params = pipeline._sanitize_parameters(**options)
    preprocess_params = {**getattr(pipeline, "_preprocess_params", {}), **preprocess_params}
    forward_params = {**getattr(pipeline, "_forward_params", {}), **forward_params}
    postprocess_params = {**getattr(pipeline, "_postprocess_params", {}), **postprocess_params}
    postprocess_params.pop("save_to", None)
    postprocess_params.pop("overlay_to", None)
    settings = {
        "roi_size": list(forward_params["roi_size"]) if forward_params.get("roi_size") is not None else None,
        "overlap": forward_params.get("overlap", 0.5),
        "mode": forward_params.get("mode", "gaussian"),
        "bfloat16": bool(forward_params.get("bfloat16", False)),
        "tta": bool(forward_params.get("tta", False)),
    }
    model = _model_identity(pipeline)
    show = (progress_wanted() if progress is None else bool(progress)) and processes.is_main
    forward_params["progress"] = {"position": 1, "leave": False} if show else False

    mine = cases[processes.index :: processes.count]
    outcomes: dict[str, CaseOutcome] = {}
    todo: list[Case] = []
    for case in mine:
        state = None if overwrite else _done_state(case, out_dir, model, settings)
        if state is not None:
            outcome = CaseOutcome(
                case, "skipped", case.output(out_dir), _read_record(case.record(out_dir)) or {}
            )
            if state == EDITED:
                outcome.error = (
                    "its label map was changed after medfm wrote it: kept as it is, and its volumes in "
                    f"{VOLUMES_CSV} are those medfm measured (--overwrite redoes it)"
                )
            outcomes[case.name] = outcome
            if on_case is not None:
                on_case(outcome)
        else:
            todo.append(case)
    out_dir.mkdir(parents=True, exist_ok=True)

    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="cases", unit="case", position=0)
    failed = 0
    try:
        for prepared in _loader(pipeline, todo, preprocess_params, workers) if todo else ():
            outcome = _finish_case(
                pipeline, prepared, out_dir, forward_params, postprocess_params, model, settings, processes
            )
            outcomes[prepared.case.name] = outcome
            failed += outcome.status == "failed"
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=failed, refresh=False)
            if on_case is not None:
                on_case(outcome)
    finally:
        if bar is not None:
            bar.close()

    report = BatchReport(
        in_dir, out_dir, [outcomes[case.name] for case in mine], processes, total_cases=len(cases)
    )
    if processes.wait_for_everyone is not None:
        processes.wait_for_everyone()  # every share is done: the records are all there
    if processes.is_main:
        report.volumes_csv = write_volumes_csv(cases, out_dir, pipeline.model.config.id2label)
        report.job_failed = sum(
            (_read_record(case.record(out_dir)) or {}).get("status") != "ok" for case in cases
        )
    if processes.wait_for_everyone is not None:
        processes.wait_for_everyone()  # no process exits (and has its launcher stop the rest) before the table
    return report


def _finish_case(
    pipeline: Any,
    prepared: _Prepared,
    out_dir: Path,
    forward_params: dict[str, Any],
    postprocess_params: dict[str, Any],
    model: dict[str, Any],
    settings: dict[str, Any],
    processes: ProcessInfo,
) -> CaseOutcome:
    """Run the model on a prepared case, write its label map, then its record; a failure goes in the record."""
    case = prepared.case
    start = time.perf_counter()
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "case": case.name,
        "kind": case.kind,
        "input": os.fspath(case.source.resolve()),
        "input_fingerprint": prepared.fingerprint,
        "output": f"{case.stem}.nii.gz",
        "model": model,
        "settings": settings,
        "process": processes.index,
        "processes": processes.count,
    }
    error, details = prepared.error, prepared.details
    output = None
    if error is None:
        try:
            outputs = pipeline.forward(prepared.inputs, **forward_params)
            result = pipeline.postprocess(outputs, save_to=case.output(out_dir), **postprocess_params)
            output = Path(result["saved_to"])
            segmentation = result["segmentation"]
            record.update(
                status="ok",
                output_fingerprint=_fingerprint(output),
                shape=[int(n) for n in result["label_map"].shape],
                spacing=[float(s) for s in segmentation.spacing],
                labels={
                    str(label): {k: stats[k] for k in ("name", "voxels", "volume_ml")}
                    for label, stats in result["labels"].items()
                },
            )
        except Exception as failure:  # one case's failure is reported with it; the job goes on
            error, details = _one_line(failure, case.source), traceback.format_exc()
    prepared.inputs = None  # the volumes go now, not when the next case has been read
    seconds = prepared.seconds + time.perf_counter() - start
    if error is not None:
        output = None
        record.update(status="failed", error=error)
        # A label map at the case's path is not this input's with this model (it would have been skipped, or
        # is this run's own, unfinished): left there, it would pass for the case's result.
        _remove(case.output(out_dir), case.source)
    record.update(
        seconds=round(seconds, 3), finished=datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    try:
        _write_record(case.record(out_dir), record, protect=[case.source])
    except Exception as failure:  # no record: the next run redoes the case
        if error is None:
            error, details, output = (
                f"cannot write its record: {_one_line(failure)}",
                traceback.format_exc(),
                None,
            )
            record.update(status="failed", error=error)
        # An earlier run's record would describe another label map (volumes.csv would list its volumes).
        _remove(case.record(out_dir), case.source)
        _remove(case.output(out_dir), case.source)
    status = "failed" if error is not None else "ok"
    return CaseOutcome(case, status, output, record, error, details, seconds)


def _remove(path: Path, keep: Path) -> None:
    """Delete the output ``path``, unless it is (or lies in) the input ``keep`` (a link inside the input folder may
    lead anywhere)."""
    real, source = os.path.realpath(path), os.path.realpath(keep)
    if _within(real, source):
        return
    with contextlib.suppress(OSError):  # nothing more can be done; the record (if any) says the case failed
        path.unlink(missing_ok=True)


def _label_columns(id2label: dict[Any, str]) -> list[tuple[str, str]]:
    """``(label id, column name)`` for each label: ``"<name> (ml)"``, with the id added to a repeated name."""
    labels = sorted(((int(k), str(v)) for k, v in id2label.items()), key=lambda item: item[0])
    names = [name for _, name in labels]
    return [
        (str(label), f"{name} (ml)" if names.count(name) == 1 else f"{name} [{label}] (ml)")
        for label, name in labels
    ]


def write_volumes_csv(cases: Sequence[Case], out_dir: str | os.PathLike, id2label: dict[Any, str]) -> Path:
    """Write ``OUT/volumes.csv`` (atomically) from the cases' records: ``case``, ``input``, ``output``,
    ``status`` (``ok`` / ``failed``), one column of volume in ml per label of ``id2label``, and ``error``.

    A case without a readable record (its process stopped before writing it) is listed as failed.
    """
    out_dir = Path(out_dir)
    columns = _label_columns(id2label)
    destination = out_dir / VOLUMES_CSV
    with (
        atomic_output(destination, inputs=[case.source for case in cases]) as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(["case", "input", "output", "status", *(name for _, name in columns), "error"])
        for case in cases:
            record = _read_record(case.record(out_dir)) or {
                "status": "failed",
                "error": f"no record in {out_dir} (the process that had it did not finish it)",
            }
            ok = record.get("status") == "ok"
            labels = record.get("labels") or {}
            volumes = [_ml(labels.get(label, {}).get("volume_ml", 0.0)) if ok else "" for label, _ in columns]
            writer.writerow(
                [
                    case.name,
                    record.get("input", os.fspath(case.source)),
                    record.get("output", "") if ok else "",
                    "ok" if ok else "failed",
                    *volumes,
                    "" if ok else record.get("error", ""),
                ]
            )
    return destination


def _ml(value: Any) -> str:
    value = float(value)
    return f"{value:.6f}" if math.isfinite(value) else ""
