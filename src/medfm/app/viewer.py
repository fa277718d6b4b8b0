"""What the web viewer does, as plain functions: read an upload, find and load models, run them with progress,
draw slices with their labels, and tabulate the results. Nothing here imports Gradio, so all of it is tested
without a browser (``tests/app/test_viewer.py``).

Display convention: slices are drawn from the display grid of :mod:`medfm.visualization` (axis codes
``I P L``: head to feet, anterior to posterior, patient right to left), so the axial and coronal views show the
patient's right on the image's left (radiological convention), superior and anterior at the top; the sagittal
view has anterior on the left. Pixels keep their true aspect ratio, and each view carries orientation letters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import (
    CorruptFileError,
    EmptySeriesError,
    MedfmError,
    ModelLoadError,
    UnsupportedFormatError,
    VolumeNotFoundError,
    WrongTaskError,
    first_line,
    one_line,
)
from ..io import MedicalVolume, load_volume
from ..visualization import display_grid, label_colour, orientation_letters

__all__ = [
    "IMAGE_SUFFIXES_NOT_READ",
    "TASK_NAMES",
    "VIEWS",
    "CachedModel",
    "Outcome",
    "PipelineCache",
    "SegmentationCase",
    "analyse",
    "classification_table",
    "extract_zip",
    "file_stem",
    "legend_html",
    "list_cached_models",
    "load_upload",
    "model_choices",
    "prepare_case",
    "remove_folder",
    "render_overlay_png",
    "render_view",
    "resolve_task",
    "run_classification",
    "run_segmentation",
    "user_message",
    "volume_table",
]

logger = logging.getLogger(__name__)

#: The viewer's tasks, with how the page names them.
TASK_NAMES = {"medical-segmentation": "segmentation", "medical-image-classification": "classification"}

#: The three views: name -> (fixed display axis, row axis, column axis), as medfm.visualization's panels.
VIEWS: dict[str, tuple[int, int, int]] = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}

#: 2D picture formats that ``medfm.io`` does not read (yet): refused with a message saying so.
IMAGE_SUFFIXES_NOT_READ = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

#: Limits of a zipped DICOM series: what is unpacked, at most (a zip bomb is refused before it fills the disk).
ZIP_MAX_BYTES = 4 * 1024**3
ZIP_MAX_FILES = 20_000

# The longer side of a drawn view lies in this range of pixels (small volumes are enlarged, big ones kept).
_VIEW_MIN_EDGE, _VIEW_MAX_EDGE = 320, 640
Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------------------------- reading uploads


def _display_name(path: str | os.PathLike) -> str:
    return Path(path).name


def extract_zip(
    archive: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    max_bytes: int = ZIP_MAX_BYTES,
    max_files: int = ZIP_MAX_FILES,
) -> Path:
    """Unpack a zip archive (a DICOM series) into ``destination``, refusing what could escape it.

    Members with an absolute path, a drive letter or a ``..`` part are refused (a zip-slip archive writes
    outside the folder); symbolic links and macOS resource forks (``__MACOSX/``) are skipped; the sizes the
    archive declares, and the bytes really unpacked, are capped by ``max_bytes`` and ``max_files``.

    Args:
        archive: The ``.zip`` file.
        destination: An empty or new folder to unpack into.
        max_bytes: Most bytes to unpack in all.
        max_files: Most members to unpack.

    Returns:
        ``destination``.

    Raises:
        CorruptFileError: Not a readable zip archive (truncated, damaged, encrypted).
        UnsupportedFormatError: A member would land outside ``destination``, or the archive is too big.
    """
    name = _display_name(archive)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.is_dir()]
            if len(members) > max_files:
                raise UnsupportedFormatError(
                    f"the zip holds {len(members)} files; the viewer unpacks at most {max_files}", name
                )
            declared = sum(m.file_size for m in members)
            if declared > max_bytes:
                raise UnsupportedFormatError(
                    f"the zip unpacks to {declared / 1024**3:.1f} GiB; the viewer unpacks at most "
                    f"{max_bytes / 1024**3:.1f} GiB",
                    name,
                )
            written = 0
            for member in members:
                parts = PurePosixPath(member.filename.replace("\\", "/")).parts
                if (
                    member.filename.startswith(("/", "\\"))
                    or ".." in parts
                    or (parts and ":" in parts[0])
                    or not parts
                ):
                    raise UnsupportedFormatError(
                        f"zip member {member.filename!r} points outside the archive (an absolute path or '..'); "
                        "zip the series folder itself",
                        name,
                    )
                if stat.S_ISLNK(member.external_attr >> 16) or parts[0] == "__MACOSX":
                    continue
                target = destination.joinpath(*parts)
                if not target.resolve().is_relative_to(root):
                    raise UnsupportedFormatError(
                        f"zip member {member.filename!r} points outside the archive", name
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(member) as source, open(target, "wb") as out:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:  # the declared sizes lied
                            raise UnsupportedFormatError(
                                f"the zip unpacks to more than {max_bytes / 1024**3:.1f} GiB", name
                            )
                        out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise CorruptFileError(f"not a readable zip archive ({first_line(error)})", name) from None
    except RuntimeError as error:  # encrypted members, unsupported compression
        raise CorruptFileError(f"cannot unpack the zip ({first_line(error)})", name) from None
    except NotImplementedError as error:
        raise UnsupportedFormatError(f"cannot unpack the zip ({first_line(error)})", name) from None
    return destination


def load_upload(path: str | os.PathLike, workdir: str | os.PathLike) -> MedicalVolume:
    """Read an uploaded file: NIfTI (``.nii``, ``.nii.gz``), a DICOM file, or a zipped DICOM series (``.zip``,
    unpacked safely into ``workdir`` by :func:`extract_zip`).

    Raises:
        UnsupportedFormatError: A 2D picture (PNG, JPEG...: medfm does not read them yet) or another format.
        CorruptFileError, EmptySeriesError, MedfmError: What the readers raise for a damaged file, a zip
            without DICOM slices, and so on.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeNotFoundError(
            "no such file; upload a NIfTI file, a DICOM file or a zipped series", path.name
        )
    lower = path.name.lower()
    if lower.endswith(IMAGE_SUFFIXES_NOT_READ):
        raise UnsupportedFormatError(
            "2D pictures (PNG, JPEG, TIFF...) are not read by medfm yet; upload NIfTI (.nii, .nii.gz), "
            "a DICOM file, or a DICOM series zipped (.zip)",
            path.name,
        )
    if lower.endswith(".zip"):
        folder = extract_zip(path, Path(workdir) / "series")
        try:
            return load_volume(folder)
        except EmptySeriesError as error:
            raise EmptySeriesError(
                f"the zip holds no DICOM image ({error.reason}); zip a folder of DICOM slices", path.name
            ) from None
    return load_volume(path)


def user_message(error: BaseException, renames: Mapping[str, str] | None = None) -> str:
    """One line for the page: a medfm error's message, with temporary paths (Gradio's upload folder, the
    unpacked zip) replaced by the names the user knows (``renames``: path -> name); another exception is
    named by its type. Never a traceback."""
    text = one_line(error)
    for path, name in sorted((renames or {}).items(), key=lambda item: -len(item[0])):
        text = text.replace(path, name)
    return text


# ---------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class CachedModel:
    """A medfm model found in the local Hub cache.

    Attributes:
        repo_id: Its Hub id.
        task: ``"medical-segmentation"`` or ``"medical-image-classification"``.
        model_type: The ``model_type`` of its ``config.json``.
    """

    repo_id: str
    task: str
    model_type: str


def _medfm_model_types() -> set[str]:
    """The model types medfm registers with transformers' AutoConfig."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import medfm  # noqa: F401  (registers the models)

    types = set()
    for model_type in CONFIG_MAPPING:
        try:
            config_class = CONFIG_MAPPING[model_type]
        except (KeyError, ImportError, AttributeError):
            continue
        if config_class.__module__.split(".")[0] == "medfm":
            types.add(model_type)
    return types


def list_cached_models(cache_dir: str | os.PathLike | None = None) -> list[CachedModel]:
    """The segmentation and classification models of medfm in the local Hub cache (``HF_HUB_CACHE``).

    A repository counts when the ``config.json`` of its ``main`` snapshot (else its newest) names a
    ``model_type`` that medfm registers with transformers' AutoConfig and a head the viewer runs. Nothing
    is downloaded.
    """
    from huggingface_hub import scan_cache_dir
    from transformers import AutoConfig

    from ..tasks import model_task

    try:
        cache = scan_cache_dir(cache_dir)
    except Exception:  # CacheNotFound, an unreadable folder: nothing cached
        return []
    known = _medfm_model_types()
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        snapshot = Path(revisions[0].snapshot_path)
        try:
            model_type = json.loads((snapshot / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            continue
        if model_type not in known:
            continue
        try:
            task = model_task(AutoConfig.from_pretrained(snapshot))
        except Exception:  # an unreadable config is not offered
            continue
        if task in TASK_NAMES:
            found.append(CachedModel(repo.repo_id, task, model_type))
    return found


def model_choices(
    given: Sequence[str] = (), cache_dir: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """Choices for the page's model box, as (label, value): the models given on the command line first, then
    those of the local Hub cache (:func:`list_cached_models`)."""
    choices = [(model, model) for model in given]
    seen = set(given)
    for model in list_cached_models(cache_dir):
        if model.repo_id not in seen:
            choices.append((f"{model.repo_id} ({TASK_NAMES[model.task]}, Hub cache)", model.repo_id))
            seen.add(model.repo_id)
    return choices


def resolve_task(model: str) -> str:
    """The viewer task of ``model`` (a folder, an adapter folder or a Hub id), checked as ``medfm segment`` and
    ``medfm classify`` check ``--model``.

    Raises:
        ModelNotFoundError, ModelLoadError: No such folder or Hub id, or no usable model in it.
        WrongTaskError: A model with neither a segmentation nor a classification head.
    """
    from ..cli import _model_config

    model = model.strip()
    if not model:
        raise ModelLoadError("no model chosen; pick one from the list or type a model folder or a Hub id")
    try:
        _model_config(model, "medical-segmentation")
        return "medical-segmentation"
    except WrongTaskError as segmentation_error:
        try:
            _model_config(model, "medical-image-classification")
            return "medical-image-classification"
        except WrongTaskError:
            kind = segmentation_error.reason.split(";")[0].split(", not ")[0]
            raise WrongTaskError(
                f"{kind}; the viewer runs segmentation models and image classifiers (fine-tune one with "
                "examples/finetune_segmentation.py or examples/finetune_classification.py)",
                model,
            ) from None


class PipelineCache:
    """Loaded pipelines, one per (model, device), the most recently used kept (``size`` of them).

    Args:
        device: The device every pipeline runs on (``None``: transformers' default, the CPU).
        size: How many models stay loaded.
    """

    def __init__(self, device: str | None = None, size: int = 2):
        self.device = device
        self.size = size
        self._pipelines: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str) -> tuple[str, Any]:
        """``(task, pipeline)`` of ``model``, loaded on first use.

        Raises:
            ModelNotFoundError, ModelLoadError, WrongTaskError: As :func:`resolve_task`, or the weights do not
                load.
        """
        model = model.strip()
        with self._lock:
            if model in self._pipelines:
                self._pipelines.move_to_end(model)
                return self._pipelines[model]
            task = resolve_task(model)
            loaded = (task, _load_pipeline(task, model, self.device))
            self._pipelines[model] = loaded
            while len(self._pipelines) > self.size:
                self._pipelines.popitem(last=False)
            return loaded


def _load_pipeline(task: str, model: str, device: str | None) -> Any:
    from ..cli import load_pipeline_quietly

    return load_pipeline_quietly(task, model, device)


# ------------------------------------------------------------------------------------------------- running


def _quiet(progress: Progress | None) -> Progress:
    return progress if progress is not None else (lambda fraction, text: None)


def run_segmentation(
    segmenter: Any,
    volume: MedicalVolume,
    save_to: str | os.PathLike,
    *,
    overlap: float = 0.5,
    bfloat16: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segment ``volume`` with a ``medical-segmentation`` pipeline, reporting progress window by window.

    The pipeline's own stages run in its order (preprocess, forward, postprocess, as ``Pipeline.__call__``
    does for one input); a hook on the model counts the windows of the sliding window.

    Args:
        segmenter: ``pipeline("medical-segmentation", ...)``.
        volume: The image.
        save_to: Where the label map is written, as NIfTI on the input's grid.
        overlap: Window overlap, in [0, 1).
        bfloat16: Run the model under bfloat16 autocast.
        progress: ``progress(fraction, text)``, called at each stage and window.

    Returns:
        The pipeline's result (``segmentation``, ``label_map``, ``labels``, ``saved_to``).
    """
    from ..inference import default_roi_size, sliding_window_count

    report = _quiet(progress)
    report(0.05, "preprocessing")
    inputs = segmenter.preprocess(volume)
    shape = tuple(inputs["pixel_values"].shape[-3:]) if inputs["pixel_values"].ndim == 5 else (1,)
    total = None
    if not 0 <= overlap < 1:
        raise ValueError(f"window overlap must be in [0, 1); got {overlap}")
    if len(shape) == 3:
        try:
            roi = default_roi_size(segmenter.model, shape, inputs["spacing"])
            total = sliding_window_count(shape, roi, overlap)
        except Exception:  # a model contract without a default window: count without a total
            total = None
    done = [0]

    def on_window(module: Any, args: Any) -> None:  # before each window's forward
        done[0] += 1
        if total:
            current = min(done[0], total)
            report(0.1 + 0.8 * (current - 1) / total, f"window {current} of {total}")
        else:
            report(0.5, f"window {done[0]}")

    report(
        0.1,
        f"running the model ({total} window{'s' if total != 1 else ''})" if total else "running the model",
    )
    handle = segmenter.model.register_forward_pre_hook(on_window)
    try:
        outputs = segmenter.forward(inputs, overlap=float(overlap), bfloat16=bool(bfloat16))
    finally:
        handle.remove()
    report(0.92, "writing the label map")
    return segmenter.postprocess(outputs, save_to=save_to)


def run_classification(classifier: Any, volume: MedicalVolume, top_k: int = 5) -> list[dict[str, Any]]:
    """The ``top_k`` labels of ``volume`` by a ``medical-image-classification`` pipeline, best first."""
    return classifier(volume, top_k=max(1, int(top_k)))


def classification_table(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[str, float], list[list[Any]]]:
    """A classifier's rows as ``{label: score}`` (for a bar chart) and table rows ``[rank, label, score]``."""
    rows = list(rows)
    scores = {str(row["label"]): float(row["score"]) for row in rows}
    table = [[rank, str(row["label"]), round(float(row["score"]), 4)] for rank, row in enumerate(rows, 1)]
    return scores, table


# ------------------------------------------------------------------------------------------------- drawing


@dataclass
class SegmentationCase:
    """A segmented volume, ready to draw: image and labels on the display grid.

    Attributes:
        name: The upload's file name.
        image: ``(D, H, W)`` uint8 display-grid image, windowed to its 0.5-99.5 percentiles.
        labels: ``(D, H, W)`` display-grid label map.
        spacing: The display grid's spacing in mm.
        letters: Patient directions at each display axis's first and last index.
        names: Label value -> name (the model's ``id2label``; background excluded).
        volumes: Label value -> (voxels, ml) of the labels found.
        label_map: The written NIfTI label map.
        folder: Where this case's files are.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    letters: tuple[tuple[str, str], ...]
    names: dict[int, str]
    volumes: dict[int, tuple[int, float]] = field(default_factory=dict)
    label_map: Path | None = None
    folder: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def views(self) -> list[str]:
        """The views worth showing: all three, or the one plane of a single-slice input."""
        flat = [axis for axis, n in enumerate(self.shape) if n == 1]
        if flat:
            return [name for name, (fixed, _, _) in VIEWS.items() if fixed == flat[0]]
        return list(VIEWS)

    def centre(self) -> dict[str, int]:
        """Initial slice per view: through the centre of the labels found, else of the volume."""
        if np.any(self.labels > 0):
            points = [round(float(np.mean(axis))) for axis in np.nonzero(self.labels > 0)]
        else:
            points = [n // 2 for n in self.shape]
        return {name: points[fixed] for name, (fixed, _, _) in VIEWS.items()}


def _windowed(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8)
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    scaled = (np.nan_to_num(image, nan=low) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def prepare_case(
    volume: MedicalVolume,
    result: Mapping[str, Any],
    id2label: Mapping[int, str],
    *,
    name: str = "volume",
    folder: str | os.PathLike | None = None,
) -> SegmentationCase:
    """A :class:`SegmentationCase` from an image and a segmentation pipeline's result."""
    segmentation: MedicalVolume = result["segmentation"]
    image, spacing = display_grid(volume, volume.array[0].astype(np.float32))
    labels, _ = display_grid(segmentation, segmentation.array.reshape(segmentation.array.shape[-3:]))
    labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int32)
    names = {int(k): str(v) for k, v in id2label.items() if int(k) != 0}
    for value in np.unique(labels):
        if value != 0:
            names.setdefault(int(value), f"label {int(value)}")
    volumes = {
        int(value): (int(stats["voxels"]), float(stats["volume_ml"]))
        for value, stats in result.get("labels", {}).items()
        if int(value) != 0
    }
    saved = result.get("saved_to")
    return SegmentationCase(
        name=name,
        image=_windowed(image),
        labels=labels,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        letters=orientation_letters(volume),
        names=dict(sorted(names.items())),
        volumes=volumes,
        label_map=Path(saved) if saved is not None else None,
        folder=Path(folder) if folder is not None else None,
    )


def _view_size(
    shape: Sequence[int], spacing: Sequence[float], row_axis: int, column_axis: int
) -> tuple[int, int]:
    """Pixels (height, width) of a view in true proportions, at one scale for all three views (mm per pixel
    set so the volume's longest physical extent spans the drawing range), so the views can be compared."""
    extents = [int(n) * float(s) for n, s in zip(shape, spacing)]
    longest = max(extents)
    edge = min(max(longest / min(float(s) for s in spacing), _VIEW_MIN_EDGE), _VIEW_MAX_EDGE)
    mm_per_pixel = longest / edge
    return max(1, round(extents[row_axis] / mm_per_pixel)), max(1, round(extents[column_axis] / mm_per_pixel))


def _nearest(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(size[0]) + 0.5) * plane.shape[0] / size[0], plane.shape[0] - 1).astype(int)
    columns = np.minimum((np.arange(size[1]) + 0.5) * plane.shape[1] / size[1], plane.shape[1] - 1).astype(
        int
    )
    return plane[rows][:, columns]


def _edges(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a mask (a pixel of the mask with a 4-neighbour outside it)."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_view(
    case: SegmentationCase,
    view: str,
    index: int,
    *,
    opacity: float = 0.45,
    visible: Iterable[int] | None = None,
    letters: bool = True,
) -> np.ndarray:
    """An RGB ``(H, W, 3)`` uint8 picture of one slice with the labels drawn over it.

    Args:
        case: The segmented volume.
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        index: The slice along the view's display axis (clamped to the volume).
        opacity: Fill opacity of the labels, 0 to 1 (outlines are drawn at twice it).
        visible: Label values to draw (default: all).
        letters: Draw orientation letters at the edges.
    """
    from PIL import Image, ImageDraw

    fixed, row_axis, column_axis = VIEWS[view]
    index = int(np.clip(int(index), 0, case.shape[fixed] - 1))
    take = [slice(None)] * 3
    take[fixed] = index
    plane = case.image[tuple(take)]
    labels = case.labels[tuple(take)]
    size = _view_size(case.shape, case.spacing, row_axis, column_axis)
    grey = Image.fromarray(plane).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    picture = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    labels = _nearest(labels, size)
    shown = set(case.names) if visible is None else {int(v) for v in visible}
    opacity = float(np.clip(opacity, 0.0, 1.0))
    for value in np.unique(labels):
        if value == 0 or int(value) not in shown or opacity == 0:
            continue
        mask = labels == value
        colour = np.asarray(label_colour(int(value)), np.float32)
        picture[mask] = (1 - opacity) * picture[mask] + opacity * colour
        edge = _edges(mask)
        line = min(1.0, 2 * opacity)
        picture[edge] = (1 - line) * picture[edge] + line * colour
    out = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
    if letters:
        draw = ImageDraw.Draw(out)
        font = _font(max(14, min(size) // 18))
        height, width = size
        first_row, last_row = case.letters[row_axis]
        first_column, last_column = case.letters[column_axis]
        style = dict(fill=(255, 221, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((width / 2, 4), first_row, anchor="mt", **style)
        draw.text((width / 2, height - 4), last_row, anchor="mb", **style)
        draw.text((4, height / 2), first_column, anchor="lm", **style)
        draw.text((width - 4, height / 2), last_column, anchor="rm", **style)
    return np.asarray(out)


def render_overlay_png(
    case: SegmentationCase,
    indices: Mapping[str, int],
    path: str | os.PathLike,
    *,
    opacity: float = 0.45,
    visible: Iterable[int] | None = None,
) -> Path:
    """Write the current views side by side, titled, with a legend of the drawn labels, as a PNG."""
    from PIL import Image, ImageDraw

    from ..io.atomic import atomic_output

    shown = sorted(set(case.names) if visible is None else {int(v) for v in visible})
    pictures = [
        (name, render_view(case, name, indices.get(name, 0), opacity=opacity, visible=shown))
        for name in case.views()
    ]
    gap, title = 12, 28
    present = [v for v in shown if v in case.volumes or np.any(case.labels == v)]
    legend_rows = max(1, -(-len(present) // 4)) if present else 0
    width = sum(p.shape[1] for _, p in pictures) + gap * (len(pictures) + 1)
    height = max(p.shape[0] for _, p in pictures) + title + gap * 2 + legend_rows * 24
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    font = _font(16)
    x = gap
    for name, picture in pictures:
        draw.text((x + picture.shape[1] / 2, 6), name, fill=(255, 255, 255), font=font, anchor="mt")
        sheet.paste(Image.fromarray(picture), (x, title))
        x += picture.shape[1] + gap
    y = title + max(p.shape[0] for _, p in pictures) + gap
    column_width = (width - gap) // 4
    for position, value in enumerate(present):
        left = gap + (position % 4) * column_width
        top = y + (position // 4) * 24
        draw.rectangle((left, top + 2, left + 16, top + 18), fill=label_colour(value))
        text = case.names.get(value, f"label {value}")
        if value in case.volumes:
            text += f"  {case.volumes[value][1]:.1f} ml"
        draw.text((left + 22, top + 1), text, fill=(255, 255, 255), font=font)
    path = Path(path)
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def volume_table(case: SegmentationCase) -> list[list[Any]]:
    """Rows ``[label, name, voxels, volume (ml)]``, one per label of the model but the background."""
    return [
        [value, name, case.volumes.get(value, (0, 0.0))[0], round(case.volumes.get(value, (0, 0.0))[1], 3)]
        for value, name in case.names.items()
    ]


def legend_html(case: SegmentationCase, visible: Iterable[int] | None = None) -> str:
    """A legend: each label's colour swatch, name and volume; labels switched off are greyed."""
    from html import escape

    shown = set(case.names) if visible is None else {int(v) for v in visible}
    items = []
    for value, name in case.names.items():
        red, green, blue = label_colour(value)
        ml = case.volumes.get(value, (0, 0.0))[1]
        faded = "" if value in shown else "opacity:0.35;"
        items.append(
            f'<span class="medfm-legend-item" data-label="{value}" style="display:inline-flex;'
            f'align-items:center;gap:6px;margin:2px 14px 2px 0;{faded}">'
            f'<span style="display:inline-block;width:14px;height:14px;border-radius:3px;'
            f'background:rgb({red},{green},{blue})"></span>{escape(name)} '
            f'<span style="opacity:0.7">({ml:.1f} ml)</span></span>'
        )
    return '<div id="medfm-legend-items">' + "".join(items) + "</div>"


def remove_folder(folder: str | os.PathLike | None) -> None:
    """Delete a case's folder (its unpacked upload and written files), quietly."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ one run


@dataclass
class Outcome:
    """What one press of **Run** gave: a segmented case, a classifier's scores, or an error's one line.

    Attributes:
        status: The line for the page (Markdown).
        case: The segmented case (segmentation models).
        scores: Label -> score, best first (classifiers).
        table: ``[rank, label, score]`` rows (classifiers).
        error: Whether ``status`` reports a failure.
    """

    status: str
    case: SegmentationCase | None = None
    scores: dict[str, float] | None = None
    table: list[list[Any]] | None = None
    error: bool = False


def analyse(
    upload: str | os.PathLike | None,
    model: str | None,
    pipelines: PipelineCache,
    workdir: str | os.PathLike,
    *,
    top_k: int = 5,
    overlap: float = 0.5,
    bfloat16: bool = False,
    allowed: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Outcome:
    """Load ``model`` (cached), read ``upload``, and run the model on it; any failure becomes a one-line
    :class:`Outcome` whose ``status`` names the file the user uploaded (not its temporary copy).

    Args:
        upload: The uploaded file (Gradio's copy, which keeps the original name).
        model: A model folder or Hub id.
        pipelines: Loaded pipelines, by model.
        workdir: Where this run's folder is made (unpacked zip, label map); removed again on failure or for a
            classifier, else it is ``case.folder``.
        top_k: Labels a classifier reports.
        overlap: Sliding-window overlap (segmentation).
        bfloat16: Run the model under bfloat16 autocast (segmentation).
        allowed: The only models that may run (a public page serving one model); ``None``: any.
        progress: ``progress(fraction, text)``.
    """
    report = _quiet(progress)
    if upload is None:
        return Outcome("**Error:** upload an image first.", error=True)
    upload = Path(upload)
    Path(workdir).mkdir(parents=True, exist_ok=True)

    folder = Path(tempfile.mkdtemp(prefix="case-", dir=workdir))
    renames = {str(upload): upload.name, str(folder / "series"): f"{upload.name} (unzipped)"}
    try:
        if allowed is not None and (model or "").strip() not in allowed:
            raise ModelLoadError(f"this page runs only {', '.join(allowed)}", (model or "").strip() or None)
        report(0.0, "loading the model")
        task, runner = pipelines.get(model or "")
        report(0.02, f"reading {upload.name}")
        volume = load_upload(upload, folder)
        if task == "medical-image-classification":
            report(0.3, "classifying")
            scores, table = classification_table(run_classification(runner, volume, top_k))
            remove_folder(folder)
            best = table[0]
            return Outcome(
                f"**Done:** {upload.name} classified by `{_model_name(model)}`: **{best[1]}** ({best[2]:.3f}).",
                scores=scores,
                table=table,
            )
        out = folder / f"{file_stem(upload.name)}_labels.nii.gz"
        result = run_segmentation(runner, volume, out, overlap=overlap, bfloat16=bfloat16, progress=report)
        id2label = {int(key): value for key, value in runner.model.config.id2label.items()}
        case = prepare_case(volume, result, id2label, name=upload.name, folder=folder)
    except Exception as error:
        remove_folder(folder)
        if not isinstance(error, MedfmError):
            logger.exception("medfm app: running %s on %s failed", model, upload.name)
        return Outcome(f"**Error:** {user_message(error, renames)}", error=True)
    found = sum(1 for value in case.names if value in case.volumes)
    spacing = tuple(round(s, 2) for s in case.spacing)
    return Outcome(
        f"**Done:** {case.name} segmented by `{_model_name(model)}`: {found} of {len(case.names)} labels found "
        f"(grid {case.shape[0]}x{case.shape[1]}x{case.shape[2]}, spacing {spacing} mm).",
        case=case,
    )


def _model_name(model: str | None) -> str:
    """How the page names a model: a Hub id as it is, a folder by its name."""
    from ..hub import looks_like_local_path

    model = (model or "").strip()
    return Path(model.rstrip("/")).name or model if looks_like_local_path(model) else model


def file_stem(name: str) -> str:
    """A file name without its image suffix (``ct.nii.gz`` -> ``ct``)."""
    for suffix in (".nii.gz", ".nii", ".zip", ".dcm"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or "case"
