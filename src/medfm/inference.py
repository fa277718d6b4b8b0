"""Sliding-window inference over a processed volume, for any medfm segmentation model.

One implementation serves ``pipeline("medical-segmentation")`` and the fine-tuning validation, so what is
validated is what users run. It relies only on the model contract
(:class:`~medfm.models.modeling_utils.MedfmModelMixin`): the input multiple and minimum shape, whether the
forward takes ``spacing``, and whether the model takes volumes or 2D slices (a 2D-only model runs on
``(1, H, W)`` windows, i.e. slice by slice).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import NonFiniteOutputError
from .models.modeling_utils import model_contract

__all__ = [
    "DEFAULT_ROI_EDGE",
    "NonFiniteOutputError",
    "check_roi_size",
    "default_roi_size",
    "flip_combinations",
    "progress_wanted",
    "sliding_window_count",
    "sliding_window_logits",
]

#: Default cap of the window edge, per axis, on the processed grid.
DEFAULT_ROI_EDGE = 128


#: Environment variables that mark a run nobody watches (continuous integration, a test runner).
_UNATTENDED_ENV = ("CI", "PYTEST_CURRENT_TEST")


def progress_wanted(stream=None) -> bool:
    """Whether a person is likely watching ``stream`` (default ``sys.stderr``): it is a terminal, and the process
    runs neither under pytest nor in CI (``CI`` set to anything but ``""``, ``0`` or ``false``).

    Output redirected to a file or a pipe (a log) is not a terminal, so it gets no progress bar.
    """
    for name in _UNATTENDED_ENV:
        if os.environ.get(name, "").strip().lower() not in ("", "0", "false"):
            return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def default_roi_size(
    model: nn.Module,
    shape: Sequence[int],
    spacing: torch.Tensor | Sequence[float] | None = None,
    max_edge: int = DEFAULT_ROI_EDGE,
) -> tuple[int, int, int]:
    """A window for a processed volume of spatial ``shape`` ``(D, H, W)``: the volume, capped at ``max_edge`` per
    axis, rounded up to the model's required multiple and at least its minimum input shape.

    A 2D-only model's window is one slice deep. A model built for one input window (MiM's ``image_size``:
    its position tables are sized to it) gets that window.
    """
    contract = model_contract(model)
    preferred = contract.preferred_input_shape()
    if preferred is not None:
        return tuple(preferred)  # type: ignore[return-value]
    multiple = contract.required_input_multiple(spacing)
    minimum = contract.minimum_input_shape(spacing)
    roi = [max(low, math.ceil(min(n, max_edge) / m) * m) for n, m, low in zip(shape, multiple, minimum)]
    if contract.input_spatial_dims == (2,):
        roi[0] = 1
    try:
        contract.check_input_shape(roi, spacing)
    except ValueError:
        # E.g. one multiple on every axis leaves a single voxel at the coarsest level of a feature pyramid:
        # widen the window along the last axis.
        roi[-1] *= 2
    return tuple(roi)  # type: ignore[return-value]


def check_roi_size(model: nn.Module, roi_size: Sequence[int], spacing=None) -> tuple[int, int, int]:
    """``roi_size`` as a tuple, if the model can run on windows of that size.

    Raises:
        ValueError: Not three sizes, or a window the model cannot run on (the model's own message).
    """
    contract = model_contract(model)
    roi = tuple(int(n) for n in roi_size)
    if len(roi) != 3 or any(n < 1 for n in roi):
        raise ValueError(f"roi_size must be three positive sizes (D, H, W); got {tuple(roi_size)}")
    if contract.input_spatial_dims == (2,):
        if roi[0] != 1:
            raise ValueError(f"roi_size {roi}: a 2D model runs on windows one slice deep, (1, H, W)")
        multiple = contract.required_input_multiple(spacing)
        if any(n % m for n, m in zip(roi[1:], multiple[1:])):
            raise ValueError(
                f"roi_size {roi} must be a multiple of {tuple(multiple[1:])} in-plane for this model"
            )
        return roi  # type: ignore[return-value]
    try:
        contract.check_input_shape(roi, spacing)
    except ValueError as error:
        raise ValueError(f"roi_size {roi}: {error}") from None
    return roi  # type: ignore[return-value]


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the empty one first): the ``2^k`` mirrorings test-time augmentation averages."""
    axes = tuple(axes)
    return [combo for k in range(len(axes) + 1) for combo in itertools.combinations(axes, k)]


def sliding_window_count(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's ``sliding_window_inference`` visits on a volume of spatial ``shape`` (per batch
    item): a volume smaller than the window is padded to it; along each axis the windows step by
    ``int(roi * (1 - overlap))`` (at least 1), the last one flush with the far edge."""
    count = 1
    for size, roi in zip(shape, roi_size):
        size = max(int(size), int(roi))
        step = int(roi) if roi == size else max(int(roi * (1 - overlap)), 1)
        count *= math.ceil((size - roi) / step) + 1
    return count


def sliding_window_logits(
    model: nn.Module,
    pixel_values: torch.Tensor,
    roi_size: Sequence[int] | None = None,
    *,
    spacing: torch.Tensor | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    bfloat16: bool = False,
    tta: bool = False,
    progress: bool | Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Logits ``(B, K, D, H, W)`` of processed volumes ``(B, C, D, H, W)`` (or one ``(C, D, H, W)``) by MONAI's
    blended sliding windows.

    Args:
        model: A medfm segmentation model (a PEFT wrapper is fine).
        pixel_values: What the model's processor made.
        roi_size: Window ``(D, H, W)``; :func:`default_roi_size` when omitted.
        spacing: The processed grid's spacing, for models whose forward takes it.
        overlap: Fraction of overlap between windows.
        sw_batch_size: Windows per forward pass (the result does not depend on it).
        mode: ``"gaussian"`` or ``"constant"`` blending.
        bfloat16: Run the model under bfloat16 autocast.
        tta: Test-time augmentation by mirroring, as nnU-Net does (Isensee et al., Nature Methods 2021): each
            window is also run flipped along every combination of its spatial axes longer than one voxel (8
            runs for a 3D window, 4 for the one-slice window of a 2D model), each output is flipped back, and
            the *logits* are averaged (as nnU-Net v2 does; averaging logits rather than probabilities keeps
            this function's output logits, blended like any other) before the windows are blended. It costs
            that many forward passes.
        progress: Show a progress bar (tqdm, on stderr) over the windows. ``None``: when a person is watching
            (:func:`progress_wanted`: stderr is a terminal, not under pytest or CI), so tests and logs get none.
            A mapping shows the bar with those tqdm options (``{"position": 1, "leave": False}`` puts it under
            a bar over cases).
    """
    from monai.inferers import sliding_window_inference

    contract = model_contract(model)
    if int(sw_batch_size) < 1:
        raise ValueError(f"sw_batch_size must be at least 1; got {sw_batch_size}")
    if progress is None:
        progress = progress_wanted()
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[None]
    roi = check_roi_size(model, roi_size, spacing) if roi_size is not None else None
    roi = roi or default_roi_size(model, pixel_values.shape[2:], spacing)
    device = next(model.parameters()).device
    pixel_values = pixel_values.to(device)
    extra = contract.model_inputs(pixel_values, spacing)
    extra.pop("pixel_values")
    two_d = contract.input_spatial_dims == (2,)
    # Mirroring axes of a window (B, C, D, H, W): the spatial ones longer than a voxel (a flip of a one-slice
    # axis is the identity, so a 2D model's windows are mirrored in-plane only).
    flip_axes = [axis for axis, size in zip((2, 3, 4), roi) if size > 1] if tta else []
    combinations = flip_combinations(flip_axes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        options = {
            "desc": "windows",
            "unit": "window",
            **(dict(progress) if isinstance(progress, Mapping) else {}),
        }
        total = sliding_window_count(pixel_values.shape[2:], roi, overlap) * pixel_values.shape[0]
        bar = tqdm(total=total, **options)

    def run(window: torch.Tensor) -> torch.Tensor:
        logits = model(pixel_values=window[:, :, 0] if two_d else window, **extra).logits
        return logits[:, :, None] if two_d else logits

    def predict(window: torch.Tensor) -> torch.Tensor:
        logits = run(window)
        if len(combinations) > 1:
            total = logits.float()
            for axes in combinations[1:]:
                total = total + run(window.flip(axes)).float().flip(axes)
            logits = total / len(combinations)
        if bar is not None:
            bar.update(window.shape[0])
        return logits

    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
            logits = sliding_window_inference(
                pixel_values,
                roi_size=roi,
                sw_batch_size=sw_batch_size,
                predictor=predict,
                overlap=overlap,
                mode=mode,
                progress=False,
            )
    finally:
        if bar is not None:
            bar.close()
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError(
            f"{type(contract).__name__} produced non-finite logits (NaN or Inf) on this input; a label map made "
            "from them would be meaningless (check the model's weights and config, e.g. layer_norm_eps > 0)"
        )
    return logits
