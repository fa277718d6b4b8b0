"""``pipeline("medical-segmentation")``: a label map for a CT/MR volume, in the input's own geometry."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BatchItemError, BatchOutputError, OverwriteInputError
from ..inference import sliding_window_logits
from ..io import MedicalVolume, write_nifti
from ..processing.image_processing_medical import ProcessedGrid
from .base import MedicalPipeline

__all__ = ["MedicalSegmentationPipeline"]


class MedicalSegmentationPipeline(MedicalPipeline):
    r"""Segment a medical volume with any medfm segmentation model.

    Input: a path (NIfTI, DICOM file or series folder), a :class:`~medfm.io.MedicalVolume`, or an array with
    ``spacing=(z, y, x)``; or a list of them. The model's processor prepares the volume, MONAI's sliding-window
    inference runs the model over it, and the prediction is mapped back onto the input's grid.

    Call parameters:
        roi_size: Window ``(D, H, W)`` on the processed grid; by default the processed volume, capped at 128 per
            axis and rounded up to the model's required multiple.
        overlap: Window overlap fraction (default 0.5).
        sw_batch_size: Windows per forward pass (default 1); the result does not depend on it.
        mode: Blending of overlapping windows, ``"gaussian"`` (default) or ``"constant"``.
        bfloat16: Run the model under bfloat16 autocast.
        tta: Test-time augmentation by mirroring (nnU-Net's): each window is also run flipped along every
            combination of its spatial axes and the logits are averaged (8 forward passes per 3D window, 4 per
            2D one); see :func:`~medfm.inference.sliding_window_logits`.
        progress: A progress bar over the windows: ``True``, ``False``, a mapping of tqdm options, or ``None``
            (default: when a person watches stderr, :func:`~medfm.inference.progress_wanted`).
        spacing: Spacing for array inputs.
        return_probabilities: Also return per-class probabilities on the input grid.
        save_to: Write the label map as NIfTI with the input's affine (atomically, never over the input). For
            a list of inputs it must be a folder (an existing one, or a path ending in ``/``: each label map
            is written there as ``<input name>.nii.gz``) or a pattern with ``{index}`` and/or ``{name}``
            (``"out/{name}_seg.nii.gz"``); one file name for several inputs is refused before anything runs.
        overlay_to: Write a PNG of three orthogonal slices with the labels drawn over the image (for a list,
            a folder or a pattern as for ``save_to``; files are named ``<input name>.png`` in a folder).

    For a list, a failure in item ``k`` raises :class:`~medfm.errors.BatchItemError` naming the item and the
    files earlier items already wrote (they are kept).

    Returns:
        A dict per input: ``segmentation`` (a :class:`~medfm.io.MedicalVolume` of labels carrying the input's
        geometry), ``label_map`` (the labels as an array in the input's own voxel order), ``labels`` (per label:
        name, voxel count and volume in ml), and, when asked, ``probabilities``, ``saved_to`` and ``overlay``.
    """

    _default_task = "medical-segmentation"

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, list | tuple):
            for key, suffix in (("save_to", ".nii.gz"), ("overlay_to", ".png")):
                if kwargs.get(key) is not None and _is_folder(kwargs[key]):
                    Path(kwargs[key]).mkdir(parents=True, exist_ok=True)
                    kwargs[key] = Path(kwargs[key]) / f"{_input_name(inputs, 0)}{suffix}"
            return super().__call__(inputs, *args, **kwargs)
        items = list(inputs)
        destinations = {
            key: _batch_destinations(items, kwargs.get(key), key, suffix)
            for key, suffix in (("save_to", ".nii.gz"), ("overlay_to", ".png"))
        }
        results, written = [], []
        for index, item in enumerate(items):
            item_kwargs = dict(kwargs)
            for key, paths in destinations.items():
                if paths is not None:
                    item_kwargs[key] = paths[index]
            try:
                result = super().__call__(item, *args, **item_kwargs)
            except Exception as error:
                name = _input_name(item, index)
                already = ", ".join(str(p) for p in written) or "nothing"
                raise BatchItemError(
                    f"item {index} of {len(items)} ({name}) failed: {error}; already written by earlier "
                    f"items (kept): {already}",
                    None,
                    index=index,
                    written=written,
                    error=error,
                ) from error
            results.append(result)
            written += [Path(result[k]) for k in ("saved_to", "overlay") if result.get(k) is not None]
        return results

    def _sanitize_parameters(
        self,
        roi_size: Sequence[int] | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        mode: str | None = None,
        bfloat16: bool | None = None,
        tta: bool | None = None,
        progress: bool | dict | None = None,
        spacing: Sequence[float] | None = None,
        return_probabilities: bool | None = None,
        save_to: str | os.PathLike | None = None,
        overlay_to: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for medical-segmentation")
        preprocess = {"spacing": spacing} if spacing is not None else {}
        forward: dict[str, Any] = {}
        if roi_size is not None:
            forward["roi_size"] = tuple(int(n) for n in roi_size)
        if overlap is not None:
            if not 0 <= overlap < 1:
                raise ValueError(f"overlap must be in [0, 1); got {overlap}")
            forward["overlap"] = float(overlap)
        if sw_batch_size is not None:
            if int(sw_batch_size) < 1 or int(sw_batch_size) != sw_batch_size:
                raise ValueError(
                    f"sw_batch_size must be a whole number of windows, at least 1; got {sw_batch_size}"
                )
            forward["sw_batch_size"] = int(sw_batch_size)
        if mode is not None:
            if mode not in ("gaussian", "constant"):
                raise ValueError(f"mode must be 'gaussian' or 'constant'; got {mode!r}")
            forward["mode"] = mode
        if bfloat16 is not None:
            forward["bfloat16"] = bool(bfloat16)
        if tta is not None:
            forward["tta"] = bool(tta)
        if progress is not None:
            forward["progress"] = progress
        postprocess: dict[str, Any] = {}
        if return_probabilities is not None:
            postprocess["return_probabilities"] = bool(return_probabilities)
        if save_to is not None:
            postprocess["save_to"] = save_to
        if overlay_to is not None:
            postprocess["overlay_to"] = overlay_to
        return preprocess, forward, postprocess

    def _forward(
        self,
        model_inputs: dict[str, Any],
        roi_size: tuple[int, int, int] | None = None,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        mode: str = "gaussian",
        bfloat16: bool = False,
        tta: bool = False,
        progress: bool | dict | None = None,
    ) -> dict[str, Any]:
        pixel_values = model_inputs["pixel_values"]
        if pixel_values.ndim == 4:  # (B, C, H, W): one slice
            pixel_values = pixel_values.unsqueeze(2)
        logits = sliding_window_logits(
            self.model,
            pixel_values,
            roi_size,
            spacing=model_inputs["spacing"],
            overlap=overlap,
            sw_batch_size=sw_batch_size,
            mode=mode,
            bfloat16=bfloat16,
            tta=tta,
            progress=progress,
        )
        return {"logits": logits, "grid": model_inputs["grid"], "volume": model_inputs["volume"]}

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        return_probabilities: bool = False,
        save_to: str | os.PathLike | None = None,
        overlay_to: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        grid: ProcessedGrid = model_outputs["grid"]
        volume: MedicalVolume = model_outputs["volume"]
        restored = self.image_processor.post_process_semantic_segmentation(
            model_outputs["logits"], [grid], return_probabilities=return_probabilities
        )[0]
        segmentation: MedicalVolume = restored["segmentation"]
        result: dict[str, Any] = {
            "segmentation": segmentation,
            "label_map": segmentation.to_source_array()
            if segmentation.source is not None
            else segmentation.array[0],
            "labels": self._label_statistics(segmentation),
        }
        if return_probabilities:
            result["probabilities"] = restored["probabilities"]
        if save_to is not None:
            result["saved_to"] = write_nifti(segmentation, save_to, protect=[volume.source_path])
        if overlay_to is not None:
            from ..visualization import save_orthogonal_slices

            names = {int(k): v for k, v in self.model.config.id2label.items()}
            result["overlay"] = save_orthogonal_slices(
                volume, Path(overlay_to), labels=segmentation, label_names=names
            )
        return result

    def _label_statistics(self, segmentation: MedicalVolume) -> dict[int, dict[str, Any]]:
        voxel_ml = float(np.prod(segmentation.spacing)) / 1000.0
        values, counts = np.unique(segmentation.array, return_counts=True)
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        return {
            int(value): {
                "name": id2label.get(int(value), str(int(value))),
                "voxels": int(count),
                "volume_ml": float(count) * voxel_ml,
            }
            for value, count in zip(values, counts)
        }


_INPUT_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom")


def _input_name(item: Any, index: int) -> str:
    """The name an input's outputs take in a folder: its file name without the image suffix (a DICOM folder's
    name), or ``item-<index>`` for in-memory inputs."""
    source = item if isinstance(item, str | os.PathLike) else getattr(item, "source_path", None)
    if source is None:
        return f"item-{index}"
    name = Path(source).name
    for suffix in _INPUT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name or f"item-{index}"


def _is_folder(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return Path(text).is_dir() or text.endswith((os.sep, "/"))


def _batch_destinations(
    items: list[Any], target: str | os.PathLike | None, key: str, suffix: str
) -> list[Path] | None:
    """One output path per item from a folder or a ``{index}``/``{name}`` pattern.

    Raises:
        BatchOutputError: ``target`` is one file for several items, a bad pattern, or two items get one path.
        OverwriteInputError: An item's output would be written over one of the batch's inputs.
    """
    if target is None:
        return None
    text = os.fspath(target)
    names = [_input_name(item, index) for index, item in enumerate(items)]
    if "{index}" in text or "{name}" in text:
        try:
            paths = [Path(text.format(index=i, name=n)) for i, n in enumerate(names)]
        except (KeyError, IndexError, ValueError) as error:
            raise BatchOutputError(
                f"{key} pattern has a field other than {{index}} and {{name}} ({error!r})", text
            ) from None
    elif _is_folder(text):
        paths = [Path(text) / f"{name}{suffix}" for name in names]
    elif len(items) <= 1:
        paths = [Path(text)] * len(items)
    else:
        raise BatchOutputError(
            f"{key} is one file for a list of {len(items)} inputs, so each output would overwrite the last; "
            f"pass a folder (existing, or ending in '/') or a pattern with {{index}} or {{name}}, e.g. "
            f"'out/{{name}}{suffix}'",
            text,
        )
    seen: dict[Path, int] = {}
    for index, path in enumerate(paths):
        resolved = path.resolve()
        if resolved in seen:
            raise BatchOutputError(
                f"{key} gives items {seen[resolved]} and {index} the same output {path}; use {{index}} in a "
                "pattern to tell them apart",
                text,
            )
        seen[resolved] = index
    sources = {}
    for index, item in enumerate(items):
        source = item if isinstance(item, str | os.PathLike) else getattr(item, "source_path", None)
        if source is not None:
            sources[Path(source).resolve()] = index
    for index, path in enumerate(paths):
        if path.resolve() in sources:
            raise OverwriteInputError(
                f"{key} for item {index} would write over input item {sources[path.resolve()]}", path
            )
    if _is_folder(text):
        Path(text).mkdir(parents=True, exist_ok=True)
    return paths
