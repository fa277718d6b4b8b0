"""Segmentation metrics per label, spacing-aware, on MONAI's implementations.

``segmentation_metrics(prediction, reference)`` takes label maps (arrays, tensors or
:class:`~medfm.io.MedicalVolume`, e.g. a pipeline's output) and returns, for each foreground label, the
Dice coefficient, the 95th-percentile Hausdorff distance in mm and the normalised surface Dice at a
tolerance in mm. Distances use the voxel spacing, so anisotropic CT is measured correctly.

Conventions: a label absent from both maps gets ``nan`` for every metric (nothing to measure); a label
present in only one gets Dice 0, surface Dice 0 and HD95 ``inf``.

What would be scored wrong is refused, as the pipelines do: plain arrays need ``spacing=`` (a volume carries
its own; medfm never guesses a voxel size, and a 1 mm guess on 3 mm CT makes HD95 three times too small), and
a label map must hold integer labels (a probability or logit map, or one channel per class, is refused with
a hint to take the argmax or threshold first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .errors import InvalidGeometryError, LabelMapError
from .io import MedicalVolume

__all__ = ["LabelMetrics", "mean_metrics", "segmentation_metrics"]


@dataclass(frozen=True)
class LabelMetrics:
    """Metrics of one label.

    Attributes:
        dice: Dice coefficient in [0, 1].
        hd95: 95th-percentile symmetric Hausdorff distance in mm.
        nsd: Normalised surface Dice in [0, 1] at ``tolerance_mm``.
        prediction_voxels: Voxels predicted as this label.
        reference_voxels: Voxels of this label in the reference.
    """

    dice: float
    hd95: float
    nsd: float
    prediction_voxels: int
    reference_voxels: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _check_labels(array: np.ndarray, name: str) -> np.ndarray:
    """Refuse non-integer values in a label map; return it as integers."""
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise LabelMapError(f"the {name} is a label map of integers; got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise LabelMapError(f"the {name} holds NaN or infinite values; a label map holds integer labels")
    if not np.array_equal(array, np.round(array)):
        low, high = float(array.min()), float(array.max())
        kind = "probabilities" if low >= 0.0 and high <= 1.0 else "non-integer values"
        raise LabelMapError(
            f"the {name} holds {kind} (dtype {array.dtype}, range [{low:.4g}, {high:.4g}]), not integer labels; "
            "take the argmax over classes (or threshold a probability) first"
        )
    return array.astype(np.int64)


def _labels_and_spacing(item: Any, name: str) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    if isinstance(item, MedicalVolume):
        if item.num_channels != 1:
            raise LabelMapError(
                f"the {name} is a label map of one channel; got {item.num_channels} channels "
                "(one per class? take the argmax over channels first)"
            )
        return _check_labels(item.array[0], name), item.spacing
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    array = np.asarray(item)
    if (
        array.ndim == 4
        and array.shape[0] > 1
        and not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer))
    ):
        raise LabelMapError(
            f"the {name} has shape {array.shape}: a channel axis of {array.shape[0]} float maps (probabilities or "
            "logits per class?), not a label map; take the argmax over the first axis first"
        )
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise LabelMapError(
            f"the {name} is a label map of shape (D, H, W) or (H, W); got shape {array.shape}"
        )
    return _check_labels(array, name), None


def _voxel_spacing(
    spacing: Sequence[float] | float | None, carried: tuple[float, float, float] | None, ndim: int
) -> tuple[float, ...]:
    """The spacing along the map's axes: the explicit one, else the volumes'; never a guess."""
    if spacing is None:
        if carried is None:
            raise InvalidGeometryError(
                "HD95 and surface Dice are distances in mm: plain arrays need spacing=(z, y, x) in mm "
                "(or pass MedicalVolumes, which carry it); medfm never guesses voxel size"
            )
        values = tuple(float(v) for v in carried)
    else:
        values = tuple(float(v) for v in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
        if len(values) == 1:
            values = values * ndim
        if carried is not None and len(values) == 3 and not np.allclose(values, carried, rtol=1e-4):
            raise InvalidGeometryError(f"spacing={values} contradicts the volumes' spacing {tuple(carried)}")
    if len(values) == 3 and ndim == 2:
        values = values[1:]
    if len(values) != ndim:
        raise InvalidGeometryError(f"spacing {values} has {len(values)} values for a {ndim}D label map")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InvalidGeometryError(f"spacing {values} must be finite and positive (mm)")
    return values


def segmentation_metrics(
    prediction: Any,
    reference: Any,
    *,
    labels: Iterable[int] | None = None,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 1.0,
) -> dict[int, LabelMetrics]:
    """Dice, HD95 (mm) and normalised surface Dice per label.

    Args:
        prediction: Predicted label map: ``(D, H, W)`` / ``(H, W)`` integers or a single-channel volume.
        reference: Reference label map on the same grid.
        labels: Labels to score; default: every non-zero label in either map.
        spacing: Voxel spacing in mm, ``(z, y, x)`` (or ``(y, x)`` for 2D maps, or one number); required
            for plain arrays, taken from a :class:`MedicalVolume` when given one (and must agree with it).
        tolerance_mm: Surface Dice tolerance.

    Raises:
        InvalidGeometryError: Plain arrays without ``spacing``, or spacings that disagree.
        LabelMapError: A map of probabilities, logits or other non-integer values, or one channel per class.
        ValueError: Maps of different shapes (both errors above are ``ValueError`` too).
    """
    pred, pred_spacing = _labels_and_spacing(prediction, "prediction")
    ref, ref_spacing = _labels_and_spacing(reference, "reference")
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} are not on the same grid")
    if pred_spacing and ref_spacing and not np.allclose(pred_spacing, ref_spacing, rtol=1e-4):
        raise InvalidGeometryError(
            f"prediction spacing {pred_spacing} differs from reference spacing {ref_spacing}"
        )
    voxel_spacing = _voxel_spacing(spacing, pred_spacing or ref_spacing, pred.ndim)
    if labels is None:
        labels = sorted(int(v) for v in set(np.unique(pred)) | set(np.unique(ref)) if v != 0)
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    results = {}
    for label in labels:
        p = torch.from_numpy(pred == label)[None, None].float()
        r = torch.from_numpy(ref == label)[None, None].float()
        n_pred, n_ref = int(p.sum()), int(r.sum())
        if n_pred == 0 and n_ref == 0:
            results[int(label)] = LabelMetrics(math.nan, math.nan, math.nan, 0, 0)
            continue
        if n_pred == 0 or n_ref == 0:
            results[int(label)] = LabelMetrics(0.0, math.inf, 0.0, n_pred, n_ref)
            continue
        dice = float(compute_dice(p, r, include_background=True)[0, 0])
        hd95 = float(
            compute_hausdorff_distance(
                p, r, include_background=True, percentile=95, spacing=list(voxel_spacing)
            )[0, 0]
        )
        nsd = float(
            compute_surface_dice(
                p, r, class_thresholds=[tolerance_mm], include_background=True, spacing=list(voxel_spacing)
            )[0, 0]
        )
        results[int(label)] = LabelMetrics(dice, hd95, nsd, n_pred, n_ref)
    return results


def mean_metrics(per_label: dict[int, LabelMetrics]) -> dict[str, float]:
    """Mean Dice, HD95 and NSD over labels, ignoring ``nan`` (labels absent from both maps)."""
    out = {}
    for name in ("dice", "hd95", "nsd"):
        values = [getattr(m, name) for m in per_label.values() if not math.isnan(getattr(m, name))]
        out[name] = float(np.mean(values)) if values else math.nan
    return out
