"""Composable, serialisable preprocessing steps.

A step is a small dataclass with a registered ``name``; ``step.to_dict()`` gives ``{"name": ..., **fields}``
and :func:`step_from_dict` rebuilds it, so a processor's whole recipe lives in
``preprocessor_config.json``. Steps act on a :class:`ProcessingState`: a ``(C, D, H, W)`` float32 tensor,
its affine, and the record of spatial operations needed to map predictions back.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ProcessorConfigError
from ..memory import array_bytes, check_allocation
from .spatial import (
    INTERPOLATION_MODES,
    pad_symmetric,
    padding_to_multiple,
    resize,
    resized_affine,
    shape_for_spacing,
    shifted_affine,
)

__all__ = [
    "STEP_TYPES",
    "Clip",
    "MinMax",
    "Normalize",
    "PadToMultiple",
    "PercentileClip",
    "ProcessingState",
    "RepeatChannels",
    "Resample",
    "Resize",
    "ScaleShift",
    "Step",
    "Window",
    "ZScore",
    "step_from_dict",
]

#: Registered step classes by name.
STEP_TYPES: dict[str, type[Step]] = {}


@dataclass
class ProcessingState:
    """What flows through the steps for one image.

    Attributes:
        tensor: ``(C, D, H, W)`` float32.
        affine: Voxel-to-world affine of ``tensor``'s grid.
        operations: Spatial operations applied so far, as JSON-friendly dicts.
    """

    tensor: torch.Tensor
    affine: np.ndarray
    operations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def set_grid(self, tensor: torch.Tensor, affine: np.ndarray, record: dict[str, Any]) -> None:
        self.tensor, self.affine = tensor, affine
        self.operations.append(record)


class Step(ABC):
    """Base class: subclasses are dataclasses with a unique ``name`` and an :meth:`apply`."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            STEP_TYPES[cls.name] = cls

    @abstractmethod
    def apply(self, state: ProcessingState) -> None:
        """Transform ``state`` in place."""

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **fields}`` with plain Python values, ready for JSON."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"name": self.name, **values}

    def _fail(self, message: str) -> ProcessorConfigError:
        return ProcessorConfigError(f"step {self.name!r}: {message}")


def _plain(value: Any) -> Any:
    """NumPy/torch scalars and arrays, and tuples, as JSON-friendly Python values."""
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def step_from_dict(spec: dict[str, Any] | Step) -> Step:
    """Build a step from ``{"name": ..., **params}`` (a :class:`Step` is returned as is).

    Raises:
        ProcessorConfigError: Unknown name or parameters.
    """
    if isinstance(spec, Step):
        return spec
    if not isinstance(spec, dict) or "name" not in spec:
        raise ProcessorConfigError(f"a step must be a dict with a 'name'; got {spec!r}")
    params = dict(spec)
    name = params.pop("name")
    if name not in STEP_TYPES:
        raise ProcessorConfigError(f"unknown step {name!r}; known steps: {sorted(STEP_TYPES)}")
    try:
        return STEP_TYPES[name](**params)
    except TypeError as error:
        raise ProcessorConfigError(f"step {name!r}: {error}") from error


def _per_channel(values: Sequence[float] | float, channels: int, what: str, step: Step) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() == 1:
        tensor = tensor.expand(channels)
    if tensor.numel() != channels:
        raise step._fail(f"{what} has {tensor.numel()} values but the image has {channels} channels")
    return tensor.view(channels, 1, 1, 1)


def _three(values: Sequence[Any] | Any, what: str, step: Step) -> list[Any]:
    if not isinstance(values, list | tuple):
        return [values] * 3
    if len(values) != 3:
        raise step._fail(f"{what} needs 3 values (D, H, W); got {list(values)}")
    return list(values)


# --- intensity ---------------------------------------------------------------------------------------


@dataclass
class Window(Step):
    """Clip to an intensity window (e.g. CT ``[-175, 250]`` HU) and map it linearly to ``[out_min, out_max]``."""

    name: ClassVar[str] = "window"
    low: float
    high: float
    out_min: float = 0.0
    out_max: float = 1.0
    clip: bool = True

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise self._fail(f"high ({self.high}) must exceed low ({self.low})")

    def apply(self, state: ProcessingState) -> None:
        x = state.tensor
        if self.clip:
            x = x.clamp(self.low, self.high)
        scale = (self.out_max - self.out_min) / (self.high - self.low)
        state.tensor = (x - self.low) * scale + self.out_min


@dataclass
class ScaleShift(Step):
    """``x * scale + shift``: ``2x - 1`` is ``scale=2, shift=-1``; ``/255`` is ``scale=1/255``."""

    name: ClassVar[str] = "scale_shift"
    scale: float = 1.0
    shift: float = 0.0

    def apply(self, state: ProcessingState) -> None:
        state.tensor = state.tensor * self.scale + self.shift


@dataclass
class Clip(Step):
    """Clamp to ``[low, high]`` (either may be ``None``)."""

    name: ClassVar[str] = "clip"
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is not None and self.high is not None and float(self.low) > float(self.high):
            raise self._fail(f"low {self.low} is above high {self.high}")

    def apply(self, state: ProcessingState) -> None:
        state.tensor = state.tensor.clamp(self.low, self.high)


@dataclass
class ZScore(Step):
    """Per-channel ``(x - mean) / std``.

    With ``nonzero`` the statistics come from the voxels > 0 of each channel (e.g. CHAOS MRI, where 0 is
    background); every voxel is normalised with them.
    """

    name: ClassVar[str] = "zscore"
    nonzero: bool = False
    eps: float = 1e-8

    def apply(self, state: ProcessingState) -> None:
        out = []
        for channel in state.tensor:
            values = channel[channel > 0] if self.nonzero else channel.reshape(-1)
            if values.numel() == 0:
                values = channel.reshape(-1)
            mean, std = values.mean(), values.std(unbiased=False)
            out.append((channel - mean) / (std + self.eps))
        state.tensor = torch.stack(out)


@dataclass
class MinMax(Step):
    """Per-image min-max: ``(x - min + offset) / (max - min + eps) * (out_max - out_min) + out_min``.

    ``offset``/``eps`` reproduce upstream quirks (VIS-MAE adds 1e-6 to both). With ``floor`` the result is
    truncated to integers as an 8-bit export would be (LVM-Med).
    """

    name: ClassVar[str] = "minmax"
    out_min: float = 0.0
    out_max: float = 1.0
    offset: float = 0.0
    eps: float = 1e-8
    per_channel: bool = False
    floor: bool = False

    def apply(self, state: ProcessingState) -> None:
        x = state.tensor
        dims = (1, 2, 3) if self.per_channel else (0, 1, 2, 3)
        low = x.amin(dim=dims, keepdim=True)
        high = x.amax(dim=dims, keepdim=True)
        x = (x - low + self.offset) / (high - low + self.eps) * (self.out_max - self.out_min) + self.out_min
        state.tensor = torch.floor(x) if self.floor else x


@dataclass
class PercentileClip(Step):
    """Clip each channel to its ``[lower, upper]`` percentiles, optionally rescaling that range to [0, 1].

    With ``above_min`` the percentiles come from voxels above the channel minimum, which ignores the
    padding/air floor (SPAD's offline preprocessing).
    """

    name: ClassVar[str] = "percentile_clip"
    lower: float = 0.5
    upper: float = 99.5
    above_min: bool = True
    rescale: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.lower < self.upper <= 100:
            raise self._fail(f"need 0 <= lower < upper <= 100; got {self.lower}, {self.upper}")

    def apply(self, state: ProcessingState) -> None:
        out = []
        for channel in state.tensor:
            values = channel.numpy().reshape(-1)
            if self.above_min:
                above = values[values > values.min()]
                values = above if above.size else values
            low, high = (float(v) for v in np.percentile(values, [self.lower, self.upper]))
            clipped = channel.clamp(low, high)
            if self.rescale:
                # In float64: an image spanning most of float32's range would overflow (x - low) in float32.
                wide = channel.double().clamp(low, high)
                scaled = (wide - low) / (high - low) if high > low else torch.zeros_like(wide)
                clipped = scaled.to(torch.float32)
            out.append(clipped)
        state.tensor = torch.stack(out)


@dataclass
class Normalize(Step):
    """Per-channel ``(x - mean) / std`` with fixed statistics (ImageNet, a dataset's HU statistics...)."""

    name: ClassVar[str] = "normalize"
    mean: list[float] | float = 0.0
    std: list[float] | float = 1.0

    def apply(self, state: ProcessingState) -> None:
        channels = state.tensor.shape[0]
        mean = _per_channel(self.mean, channels, "mean", self)
        std = _per_channel(self.std, channels, "std", self)
        state.tensor = (state.tensor - mean) / std


@dataclass
class RepeatChannels(Step):
    """Copy a grey image into ``num_channels`` channels (grey to RGB); a no-op when it already has them."""

    name: ClassVar[str] = "repeat_channels"
    num_channels: int = 3

    def apply(self, state: ProcessingState) -> None:
        channels = state.tensor.shape[0]
        if channels == self.num_channels:
            return
        if channels != 1:
            raise self._fail(f"cannot make {self.num_channels} channels from an image with {channels}")
        state.tensor = state.tensor.expand(self.num_channels, -1, -1, -1).contiguous()


# --- spatial -----------------------------------------------------------------------------------------


class _GridResizingStep(Step):
    """Shared part of the steps that interpolate onto a new grid: mode check, resize, affine, record."""

    mode: str

    def _check_mode(self) -> None:
        if self.mode not in INTERPOLATION_MODES:
            raise self._fail(f"mode {self.mode!r} is not one of {INTERPOLATION_MODES}")

    @abstractmethod
    def target_shape(self, state: ProcessingState) -> tuple[int, int, int]:
        """The ``(D, H, W)`` to resize ``state`` to."""

    def apply(self, state: ProcessingState) -> None:
        old = tuple(state.tensor.shape[1:])
        new = tuple(self.target_shape(state))
        if new == old:
            return
        state.set_grid(
            resize(state.tensor, new, self.mode, purpose=f"the {self.name!r} step"),
            resized_affine(state.affine, old, new),
            {"op": "resize", "from": list(old), "to": list(new)},
        )


@dataclass
class Resample(_GridResizingStep):
    """Resample to a target spacing ``(z, y, x)`` mm, keeping the field of view.

    ``None`` keeps an axis; a 2D image (``D == 1``) keeps its single slice. The grid's true spacing after
    rounding the shape is what the processor reports, not the nominal target.
    """

    name: ClassVar[str] = "resample"
    spacing: list[float | None] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    mode: str = "linear"

    def __post_init__(self) -> None:
        self.spacing = _three(self.spacing, "spacing", self)
        if any(s is not None and not s > 0 for s in self.spacing):
            raise self._fail(f"spacing {self.spacing} must be positive")
        self._check_mode()

    def target_shape(self, state: ProcessingState) -> tuple[int, int, int]:
        return shape_for_spacing(tuple(state.tensor.shape[1:]), state.spacing, self.spacing)


@dataclass
class Resize(_GridResizingStep):
    """Resize to a fixed shape ``(D, H, W)``; ``None`` keeps an axis (e.g. ``[None, 224, 224]`` for 2D)."""

    name: ClassVar[str] = "resize"
    size: list[int | None] = field(default_factory=lambda: [None, 224, 224])
    mode: str = "linear"

    def __post_init__(self) -> None:
        self.size = _three(self.size, "size", self)
        if any(n is not None and int(n) < 1 for n in self.size):
            raise self._fail(f"size {self.size} must be positive")
        self._check_mode()

    def target_shape(self, state: ProcessingState) -> tuple[int, int, int]:
        old = tuple(state.tensor.shape[1:])
        return tuple(o if n is None else int(n) for o, n in zip(old, self.size))  # type: ignore[return-value]


@dataclass
class PadToMultiple(Step):
    """Pad symmetrically so every spatial axis is a multiple of ``multiple`` (the patch size).

    ``value`` is a number, or ``"min"`` for each channel's minimum (a background that survives any
    normalisation). ``mode`` may also be ``"reflect"`` or ``"replicate"``.

    ``anisotropy_stride`` (a spacing-adaptive model's total stride ``P``, e.g. 16 for SPAD) makes the depth
    multiple follow the grid's anisotropy level as the model's patch does: ``max(P >> aniso_d, 1)``, and 1 for
    a single slice; ``multiple`` then gives the in-plane multiples.
    """

    name: ClassVar[str] = "pad_to_multiple"
    multiple: list[int] | int = 16
    mode: str = "constant"
    value: float | str = 0.0
    anisotropy_stride: int | None = None

    def __post_init__(self) -> None:
        self.multiple = [int(m) for m in _three(self.multiple, "multiple", self)]
        if any(m < 1 for m in self.multiple):
            raise self._fail(f"multiple {self.multiple} must be positive")
        if self.anisotropy_stride is not None:
            stride = int(self.anisotropy_stride)
            if stride < 1 or stride & (stride - 1):
                raise self._fail(f"anisotropy_stride must be a power of 2; got {self.anisotropy_stride}")
            self.anisotropy_stride = stride
        if self.mode not in ("constant", "reflect", "replicate"):
            raise self._fail(f"mode {self.mode!r} is not constant, reflect or replicate")
        if isinstance(self.value, str) and self.value != "min":
            raise self._fail(f"value must be a number or 'min'; got {self.value!r}")

    def multiple_for(self, shape: Sequence[int], spacing: Sequence[float]) -> list[int]:
        """The multiple per axis for a grid of ``shape`` ``(D, H, W)`` and ``spacing``."""
        multiple = list(self.multiple)  # type: ignore[arg-type]
        if self.anisotropy_stride is not None:
            from ..layers.anisotropy import grid_anisotropy

            level = grid_anisotropy(shape[0], spacing, max_stride=self.anisotropy_stride)
            multiple[0] = max(self.anisotropy_stride >> level, 1)  # 1 for a single slice
        return multiple

    def apply(self, state: ProcessingState) -> None:
        old = tuple(state.tensor.shape[1:])
        pads = padding_to_multiple(old, self.multiple_for(old, state.spacing))
        if not any(before or after for before, after in pads):
            return
        if self.value == "min":
            grid = (int(state.tensor.shape[0]), *(n + b + a for n, (b, a) in zip(old, pads)))
            check_allocation(  # padded channels, then their stack
                2 * array_bytes(grid, np.float32),
                f"a {grid} float32 padded grid and its per-channel parts (the {self.name!r} step)",
                hint="check the padding multiple",
            )
            padded = torch.stack(
                [pad_symmetric(c[None], pads, self.mode, float(c.min()))[0] for c in state.tensor]
            )
        else:
            padded = pad_symmetric(state.tensor, pads, self.mode, float(self.value))
        state.set_grid(
            padded,
            shifted_affine(state.affine, [-before for before, _ in pads]),
            {"op": "pad", "pads": [list(p) for p in pads]},
        )
