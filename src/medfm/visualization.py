"""Pictures of volumes: three orthogonal slices in radiological display convention, labels drawn over.

Needs matplotlib (the ``demo`` extra). Slices are shown as a radiologist reads them: axial and coronal
with the patient's right on the image's left, superior and anterior at the top, and pixels drawn with
their true aspect ratio.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io.atomic import atomic_output
from .io.orientation import transform_to_codes
from .io.volume import MedicalVolume

__all__ = ["save_orthogonal_slices"]

# Display orientation: axis 0 runs head to feet, axis 1 anterior to posterior, axis 2 right to left.
_DISPLAY_CODES = ("I", "P", "L")


def _display_grid(volume: MedicalVolume, data: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient ``(D, H, W)`` data of ``volume``'s grid to (I, P, L); also return that grid's spacing."""
    transform = transform_to_codes(volume.affine, _DISPLAY_CODES)
    spacing = tuple(volume.spacing[p] for p in transform.perm)
    return np.ascontiguousarray(transform.apply(data)), spacing  # type: ignore[return-value]


def _centre(labels: np.ndarray | None, shape: tuple[int, ...]) -> list[int]:
    if labels is not None and np.any(labels > 0):
        # The centre of the labelled region, so every panel shows some of it.
        return [round(float(np.mean(axis))) for axis in np.nonzero(labels > 0)]
    return [n // 2 for n in shape]


def save_orthogonal_slices(
    volume: MedicalVolume,
    path: str | os.PathLike,
    *,
    labels: MedicalVolume | np.ndarray | None = None,
    label_names: dict[int, str] | None = None,
    title: str | None = None,
    channel: int = 0,
    alpha: float = 0.4,
) -> Path:
    """Write a PNG with the axial, coronal and sagittal slices through the centre (of the labels, if given).

    Args:
        volume: The image.
        path: Output ``.png`` (written atomically; never over ``volume``'s source file).
        labels: Optional label map on the same grid ``(D, H, W)`` / ``(1, D, H, W)``, drawn in colour.
        label_names: Names for the legend, by label value.
        title: Figure title.
        channel: Which image channel to show.
        alpha: Opacity of the labels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, spacing = _display_grid(volume, volume.array[channel].astype(np.float32))
    label_data = None
    if labels is not None:
        label_array = labels.array if isinstance(labels, MedicalVolume) else np.asarray(labels)
        label_array = label_array.reshape(label_array.shape[-3:])
        if label_array.shape != volume.spatial_shape:
            raise ValueError(f"labels {label_array.shape} are not on the image grid {volume.spatial_shape}")
        label_data, _ = _display_grid(volume, label_array)
    finite = image[np.isfinite(image)]
    vmin, vmax = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    ci, cp, cl = _centre(label_data, image.shape)

    # (name, image slice, row spacing, column spacing); rows of each slice run I or P, columns P or L.
    panels = [
        ("axial", np.s_[ci, :, :], spacing[1], spacing[2]),
        ("coronal", np.s_[:, cp, :], spacing[0], spacing[2]),
        ("sagittal", np.s_[:, :, cl], spacing[0], spacing[1]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    cmap = plt.get_cmap("tab10")
    for axis, (name, index, row_mm, col_mm) in zip(axes, panels):
        axis.imshow(
            image[index], cmap="gray", vmin=vmin, vmax=vmax, aspect=row_mm / col_mm, interpolation="nearest"
        )
        if label_data is not None:
            plane = label_data[index]
            colours = np.zeros((*plane.shape, 4))
            for value in np.unique(plane[plane > 0]):
                colours[plane == value] = (*cmap((int(value) - 1) % 10)[:3], alpha)
            axis.imshow(colours, aspect=row_mm / col_mm, interpolation="nearest")
        axis.set_title(name, color="white")
        axis.axis("off")
    if label_data is not None:
        present = [int(v) for v in np.unique(label_data) if v > 0]
        handles = [
            Patch(color=cmap((v - 1) % 10), label=(label_names or {}).get(v, f"label {v}")) for v in present
        ]
        figure.legend(
            handles=handles, loc="lower center", ncol=max(1, len(handles)), frameon=False, labelcolor="white"
        )
    if title:
        figure.suptitle(title, color="white")
    figure.tight_layout()
    path = Path(path)
    with atomic_output(path, inputs=[volume.source_path]) as tmp:
        figure.savefig(tmp, format="png", dpi=100, facecolor="black")
    plt.close(figure)
    return path
