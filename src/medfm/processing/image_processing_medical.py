"""`MedicalImageProcessor`: a transformers image processor for 2D and 3D medical images.

It reads what a radiologist has (NIfTI, DICOM, arrays with a spacing), runs a serialisable list of
steps (resampling, intensity presets, channel repeat, padding), and returns ``pixel_values`` and
``spacing`` for a model, plus, per image, the record needed to put a prediction back onto the input's
own grid (:meth:`MedicalImageProcessor.post_process_semantic_segmentation`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from ..errors import (
    InvalidIntensityError,
    MemoryBudgetError,
    ProcessorConfigError,
    UnsupportedFormatError,
    VolumeShapeError,
)
from ..io import MedicalVolume, as_volume, load_volume
from ..io.volume import VolumeGeometry
from ..memory import array_bytes, check_allocation
from .presets import get_preset
from .spatial import undo_operations
from .steps import PadToMultiple, ProcessingState, Resize, Step, step_from_dict

__all__ = ["MedicalBatchFeature", "MedicalImageProcessor", "ProcessedGrid"]


class MedicalImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments transformers' ``from_dict`` passes through to the constructor."""

    steps: list[dict[str, Any]]
    preset: str | None
    squeeze_2d: bool
    allow_multichannel: bool


@dataclass
class ProcessedGrid:
    """How one input became one row of ``pixel_values``.

    Attributes:
        input_geometry: The input's canonical grid (and its source file's grid, if any).
        operations: Spatial operations in the order applied (``resize``, ``pad``), as plain dicts.
        affine: Voxel-to-world affine of the processed grid.
        shape: ``(D, H, W)`` of the processed grid.
    """

    input_geometry: VolumeGeometry
    operations: list[dict[str, Any]] = field(default_factory=list)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    shape: tuple[int, int, int] = (1, 1, 1)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def processed_volume(self, pixel_values: torch.Tensor | np.ndarray) -> MedicalVolume:
        """Wrap one processed image ``(C, D, H, W)`` (or ``(C, H, W)``) as a volume on the processed grid."""
        array = (
            pixel_values.detach().cpu().numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
        )
        if array.ndim == 3:
            array = array[:, None]
        return MedicalVolume(array=array, affine=self.affine, modality=self.input_geometry.modality)


class MedicalBatchFeature(BatchFeature):
    """A :class:`~transformers.BatchFeature` that also carries ``grids`` (one :class:`ProcessedGrid` per image).

    ``grids`` is an attribute, not a key, so ``model(**inputs)`` sees only model inputs.
    """

    def __init__(self, data: dict[str, Any], grids: list[ProcessedGrid], tensor_type: Any = None):
        super().__init__(data=data, tensor_type=tensor_type)
        self.grids = grids


def _is_single_input(images: Any) -> bool:
    if isinstance(images, MedicalVolume | str | os.PathLike):
        return True
    if isinstance(images, np.ndarray | torch.Tensor):
        return images.ndim <= 4
    return False


class MedicalImageProcessor(BaseImageProcessor):
    r"""Preprocess 2D/3D medical images for medfm models.

    Build it from a preset (``MedicalImageProcessor(preset="spad-btcv")``) or from steps
    (``MedicalImageProcessor(steps=[{"name": "window", "low": -175, "high": 250}, ...])``; see
    :mod:`medfm.processing.steps`). It saves as ``preprocessor_config.json`` and reloads through
    ``AutoImageProcessor``.

    Inputs are paths (NIfTI, DICOM file or series folder), :class:`~medfm.io.MedicalVolume` objects, or
    arrays ``(H, W)``, ``(D, H, W)``, ``(C, D, H, W)`` with ``spacing=(z, y, x)`` mm; or a list of them.
    Every image is first put in canonical orientation (through-plane axis first) and NaN voxels are
    filled with their channel's minimum (0 for a channel that is all NaN).

    Args:
        steps: Step specs (dicts with a ``name``) or :class:`~medfm.processing.steps.Step` objects.
        preset: Name of a preset in :mod:`medfm.processing.presets`; used when ``steps`` is not given.
        squeeze_2d: Return ``(B, C, H, W)`` when every processed image has one slice (2D models).
        allow_multichannel: Read a 4D NIfTI's 4th axis as channels (multi-sequence MR).
    """

    model_input_names = ["pixel_values", "spacing"]
    valid_kwargs = MedicalImageProcessorKwargs

    def __init__(
        self,
        steps: Sequence[dict[str, Any] | Step] | None = None,
        preset: str | None = None,
        squeeze_2d: bool = False,
        allow_multichannel: bool = False,
        **kwargs: Any,
    ):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if steps is None:
            steps = list(get_preset(preset).steps) if preset is not None else []
        # Validate now so a bad config fails at construction, and store the canonical dict form.
        self.steps = [step_from_dict(dict(s) if isinstance(s, dict) else s).to_dict() for s in steps]
        self.preset = preset
        self.squeeze_2d = bool(squeeze_2d)
        self.allow_multichannel = bool(allow_multichannel)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> MedicalImageProcessor:
        """Build the processor of a named preset (see ``medfm presets``)."""
        return cls(preset=name, **kwargs)

    def label_processor(self) -> MedicalImageProcessor:
        """A processor that puts a label map on this processor's grid: the spatial steps only, with
        nearest-neighbour interpolation and padding with 0 (background)."""
        spatial = []
        for spec in self.steps:
            if spec["name"] in ("resample", "resize"):
                spatial.append({**spec, "mode": "nearest"})
            elif spec["name"] == "pad_to_multiple":
                spatial.append({**spec, "mode": "constant", "value": 0.0})
        return MedicalImageProcessor(steps=spatial)

    def padded_for(self, padding: dict[str, Any]) -> MedicalImageProcessor:
        """This processor, made to bring every input to what a model needs.

        ``padding`` is the ``pad_to_multiple`` step the model states (``model.input_padding_step()``). When the
        processor already ends its spatial work with a resize to a size that is a multiple, or pads to a
        multiple of the model's, it is returned as it is; otherwise the model's step is appended, so a
        converted or fine-tuned model's own processor accepts ordinary volumes.
        """
        required = step_from_dict(dict(padding))
        if not isinstance(required, PadToMultiple):
            raise ValueError(f"expected a pad_to_multiple step; got {padding!r}")
        for step in reversed(self.step_objects):
            if isinstance(step, PadToMultiple):
                same_rule = step.anisotropy_stride == required.anisotropy_stride
                if same_rule and all(m % r == 0 for m, r in zip(step.multiple, required.multiple)):
                    return self
                break
            if isinstance(step, Resize):
                sizes_fit = all(n is not None and n % r == 0 for n, r in zip(step.size, required.multiple))
                if sizes_fit and required.anisotropy_stride is None:
                    return self
                break
        clone = MedicalImageProcessor(
            steps=[*self.steps, required.to_dict()],
            squeeze_2d=self.squeeze_2d,
            allow_multichannel=self.allow_multichannel,
        )
        clone.preset = None
        return clone

    @property
    def step_objects(self) -> list[Step]:
        return [step_from_dict(spec) for spec in self.steps]

    # -- preprocessing -----------------------------------------------------------------------------

    def _load(self, item: Any, spacing: Any) -> MedicalVolume:
        if isinstance(item, str | os.PathLike) and self.allow_multichannel:
            return load_volume(item, allow_multichannel=True)
        return as_volume(item, spacing)

    def process_volume(self, volume: MedicalVolume) -> tuple[torch.Tensor, ProcessedGrid]:
        """Run the steps on one volume; return ``(C, D, H, W)`` float32 and its :class:`ProcessedGrid`."""
        if volume.array.dtype.kind not in "biuf":
            raise UnsupportedFormatError(
                f"voxels of dtype {volume.array.dtype}; expected real-valued scalars (complex values are "
                "refused, as a complex NIfTI is)",
                volume.source_path,
            )
        check_allocation(
            2 * array_bytes(volume.array.shape, np.float32),
            f"a {tuple(volume.array.shape)} float32 copy of the input and its NaN-filled version",
            volume.source_path,
            hint="crop or downsample the image first",
        )
        # NumPy converts every dtype a file can hold (uint16..uint64, float16, longdouble) to float32; torch
        # cannot take some of them (longdouble). Values beyond float32 become Inf and are refused below.
        with np.errstate(over="ignore", invalid="ignore"):
            tensor = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
        if torch.isnan(tensor).any():
            floor = torch.nan_to_num(tensor, nan=float("inf")).amin(dim=(1, 2, 3), keepdim=True)
            floor = torch.where(torch.isinf(floor), torch.zeros_like(floor), floor)  # an all-NaN channel
            tensor = torch.where(torch.isnan(tensor), floor.expand_as(tensor), tensor)
        if torch.isinf(tensor).any():  # e.g. float64 voxels beyond float32's range
            raise InvalidIntensityError(
                "voxel values beyond float32's range (+/-3.4e38) became infinite; rescale the image",
                volume.source_path,
            )
        state = ProcessingState(tensor=tensor, affine=volume.affine.copy())
        for step in self.step_objects:
            try:
                step.apply(state)
            except MemoryBudgetError as error:
                if error.path is not None or volume.source_path is None:
                    raise
                raise MemoryBudgetError(error.reason, volume.source_path) from error  # name the file
            if not bool(torch.isfinite(state.tensor).all()):
                # A non-finite value is never an answer (a zero std, a NaN scale, an overflow): say which step.
                raise InvalidIntensityError(
                    f"processor step {step.name!r} ({step.to_dict()}) produced non-finite values "
                    f"(NaN or Inf); check its parameters against this image's intensities",
                    volume.source_path,
                )
        grid = ProcessedGrid(
            input_geometry=volume.geometry,
            operations=state.operations,
            affine=state.affine,
            shape=tuple(state.tensor.shape[1:]),  # type: ignore[arg-type]
        )
        return state.tensor.contiguous(), grid

    def preprocess(
        self,
        images: Any,
        spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> MedicalBatchFeature:
        """Preprocess one image or a list of images.

        Args:
            images: Path, :class:`~medfm.io.MedicalVolume`, array/tensor, or a list of them. A 5D array is a
                batch ``(B, C, D, H, W)``.
            spacing: ``(z, y, x)`` mm for array inputs: one triple for all, or one per image.
            return_tensors: ``"pt"`` (default), ``"np"`` or ``None`` (lists).

        Returns:
            :class:`MedicalBatchFeature` with ``pixel_values`` ``(B, C, D, H, W)`` (``(B, C, H, W)`` with
            ``squeeze_2d``), ``spacing`` ``(B, 3)`` float32 of the processed grids, and ``.grids``.

        Raises:
            ProcessorConfigError: Unexpected keyword arguments.
            VolumeShapeError: Processed images of different shapes in one batch.
            MedfmError: Whatever reading an input raises.
        """
        if kwargs:
            raise ProcessorConfigError(
                f"unexpected arguments {sorted(kwargs)}; expected images, spacing, return_tensors"
            )
        items = [images] if _is_single_input(images) else list(images)
        if not items:
            raise VolumeShapeError("no images given; expected at least one")
        spacings = _spacing_per_item(spacing, len(items))
        tensors, grids = [], []
        for item, item_spacing in zip(items, spacings):
            tensor, grid = self.process_volume(self._load(item, item_spacing))
            tensors.append(tensor)
            grids.append(grid)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise VolumeShapeError(
                f"processed images have different shapes {sorted(shapes)}; add a resize step, or process them "
                "one at a time"
            )
        pixel_values = torch.stack(tensors)
        if self.squeeze_2d and pixel_values.shape[2] == 1:
            pixel_values = pixel_values[:, :, 0]
        data = {
            "pixel_values": pixel_values,
            "spacing": torch.tensor([g.spacing for g in grids], dtype=torch.float32),
        }
        if return_tensors in ("np", "numpy"):
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors is None:
            data = {k: v.tolist() for k, v in data.items()}
        elif return_tensors != "pt":
            raise ProcessorConfigError(f"return_tensors={return_tensors!r}; expected 'pt', 'np' or None")
        return MedicalBatchFeature(data=data, grids=grids)

    # -- post-processing ---------------------------------------------------------------------------

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        grids: Sequence[ProcessedGrid],
        *,
        return_probabilities: bool = False,
        apply_softmax: bool = True,
    ) -> list[dict[str, MedicalVolume]]:
        """Map segmentation predictions on the processed grids back onto each input's own grid.

        Float predictions (logits, or probabilities with ``apply_softmax=False``) are turned into
        probabilities, interpolated linearly back through every resize and un-padded, and the label map is
        their argmax on the input grid. Integer label maps are mapped back with nearest neighbour.

        The returned volumes carry the input's geometry: ``volume.to_source_array()`` gives the voxels in
        the input file's own axis order, and :func:`medfm.io.write_nifti` writes them with the input's affine.

        Args:
            outputs: A model output with ``.logits`` ``(B, K, D, H, W)`` / ``(B, K, H, W)``, such a tensor, or an
                integer label tensor ``(B, D, H, W)`` / ``(B, H, W)``.
            grids: ``inputs.grids`` from :meth:`preprocess`.
            return_probabilities: Also return per-class probabilities ``(K, D, H, W)`` on the input grid
                (memory: K float32 copies of the input grid).
            apply_softmax: Softmax over classes first (set False when ``outputs`` are probabilities).

        Returns:
            One dict per image: ``"segmentation"`` (uint8/int16 labels ``(1, D, H, W)``) and, when asked,
            ``"probabilities"``.
        """
        predictions = getattr(outputs, "logits", outputs)
        if len(predictions) != len(grids):
            raise VolumeShapeError(
                f"{len(predictions)} predictions for {len(grids)} grids; expected one per image"
            )
        results = []
        for prediction, grid in zip(predictions, grids):
            prediction = torch.as_tensor(prediction).detach().cpu()
            results.append(self._restore_one(prediction, grid, return_probabilities, apply_softmax))
        return results

    def _restore_one(
        self, prediction: torch.Tensor, grid: ProcessedGrid, return_probabilities: bool, apply_softmax: bool
    ) -> dict[str, MedicalVolume]:
        is_labels = not torch.is_floating_point(prediction)
        expected_dims = 3 if is_labels else 4
        if prediction.ndim == expected_dims - 1:  # a 2D model's output: add the single slice back
            prediction = prediction.unsqueeze(-3)
        if prediction.ndim != expected_dims or tuple(prediction.shape[-3:]) != tuple(grid.shape):
            raise VolumeShapeError(
                f"prediction of shape {tuple(prediction.shape)} does not fit the processed grid {grid.shape}"
            )
        geometry = grid.input_geometry
        if is_labels:
            restored = undo_operations(prediction[None].float(), grid.operations, mode="nearest")[0]
            labels = restored.round().to(torch.int64)
            return {"segmentation": geometry.attach(_compact_labels(labels))}

        probabilities = prediction.float().softmax(dim=0) if apply_softmax else prediction.float()
        if return_probabilities:
            restored = undo_operations(probabilities, grid.operations, mode="linear")
            labels = restored.argmax(dim=0)
            return {
                "segmentation": geometry.attach(_compact_labels(labels)),
                "probabilities": geometry.attach(restored.numpy()),
            }
        # One class at a time: peak memory is two input-sized float maps, not K of them. Updated in place (the
        # first class wins ties, as argmax does).
        classes = probabilities.shape[0]
        best = labels = better = None
        for k in range(classes):
            channel = undo_operations(probabilities[k : k + 1], grid.operations, mode="linear")[0]
            if best is None:
                best = channel.clone()  # may be a view of the caller's probabilities (no resampling)
                labels = torch.zeros(channel.shape, dtype=torch.uint8 if classes <= 256 else torch.int16)
                better = torch.empty(channel.shape, dtype=torch.bool)
            else:
                torch.gt(channel, best, out=better)
                torch.where(better, channel, best, out=best)  # not maximum(): a NaN must not stick
                labels.masked_fill_(better, k)
        return {"segmentation": geometry.attach(_compact_labels(labels))}


def _compact_labels(labels: torch.Tensor) -> np.ndarray:
    array = labels.numpy()
    top = int(array.max()) if array.size else 0
    return array.astype(np.uint8 if top < 256 else np.int16, copy=False)


def _spacing_per_item(spacing: Any, count: int) -> list[Any]:
    if spacing is None:
        return [None] * count
    values = np.asarray(spacing, dtype=np.float64)
    if values.ndim <= 1:  # one number (isotropic) or one (z, y, x) for every image
        return [values] * count
    if values.ndim == 2 and values.shape[0] == count:
        return list(values)
    raise VolumeShapeError(f"spacing has shape {values.shape}; expected a number, (3,) or ({count}, 3)")
