"""Segmentation metrics per label, spacing-aware, on MONAI's implementations.

``segmentation_metrics(prediction, reference)`` takes label maps (arrays, tensors or
:class:`~medfm.io.MedicalVolume`, e.g. a pipeline's output) and returns, for each foreground label, the
Dice coefficient, the 95th-percentile Hausdorff distance in mm and the normalised surface Dice at a
tolerance in mm. Distances use the voxel spacing, so anisotropic CT is measured correctly.

Conventions: a label absent from both maps gets ``nan`` for every metric (nothing to measure); a label
present in only one gets Dice 0, surface Dice 0 and HD95 ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

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


def _labels_and_spacing(item: Any) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    if isinstance(item, MedicalVolume):
        if item.num_channels != 1:
            raise ValueError(f"a label map has one channel; got {item.num_channels}")
        return item.array[0], item.spacing
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    array = np.asarray(item)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise ValueError(f"a label map is (D, H, W) or (H, W); got shape {array.shape}")
    return array, None


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
        spacing: Voxel spacing in mm along the map's axes; taken from a :class:`MedicalVolume` when given one,
            otherwise 1 mm.
        tolerance_mm: Surface Dice tolerance.

    Raises:
        ValueError: Maps of different shapes, or volumes with different spacings.
    """
    pred, pred_spacing = _labels_and_spacing(prediction)
    ref, ref_spacing = _labels_and_spacing(reference)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} are not on the same grid")
    if pred_spacing and ref_spacing and not np.allclose(pred_spacing, ref_spacing, rtol=1e-4):
        raise ValueError(f"prediction spacing {pred_spacing} differs from reference spacing {ref_spacing}")
    voxel_spacing = spacing or pred_spacing or ref_spacing or (1.0,) * pred.ndim
    if len(voxel_spacing) == 3 and pred.ndim == 2:
        voxel_spacing = voxel_spacing[1:]
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
