"""Pictures of volumes: three orthogonal slices in radiological display convention, labels drawn over.

Needs matplotlib (the ``demo`` extra). Slices are shown as a radiologist reads them: axial and coronal
with the patient's right on the image's left, superior and anterior at the top, and pixels drawn with
their true aspect ratio. Every panel carries orientation letters at its edges (S/I, A/P, R/L), and a
single-slice input (a 2D image, a 1-slice volume) gets one panel: its own plane.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io.atomic import atomic_output
from .io.orientation import transform_to_codes
from .io.volume import MedicalVolume

__all__ = [
    "DISPLAY_CODES",
    "LABEL_PALETTE",
    "display_grid",
    "label_colour",
    "orientation_letters",
    "orthogonal_slices_figure",
    "save_orthogonal_slices",
]

#: Display orientation: axis 0 runs head to feet, axis 1 anterior to posterior, axis 2 right to left (nibabel
#: axis codes). Axial and coronal panels then show the patient's right on the image's left (radiological).
DISPLAY_CODES = ("I", "P", "L")

#: Label colours (RGB, 0-255): matplotlib's ``tab10`` table, so every picture medfm draws colours label ``k``
#: alike. Label ``k >= 1`` takes entry ``k - 1``; labels past the table get :func:`label_colour`'s extra hues.
LABEL_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def label_colour(value: int) -> tuple[int, int, int]:
    """The RGB colour (0-255) of label ``value`` (``>= 1``; 0 is background and is not drawn).

    Labels 1 to 10 take :data:`LABEL_PALETTE`; later ones hues spread by the golden angle, so that models with
    many labels (whole-body CT) still get neighbours that differ.
    """
    value = int(value)
    if 1 <= value <= len(LABEL_PALETTE):
        return LABEL_PALETTE[value - 1]
    import colorsys

    hue = (value * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def _unit_colour(value: int) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in label_colour(value))  # type: ignore[return-value]


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
# Each panel fixes one display axis and shows (row axis, column axis).
_PANELS = (("axial", 0, 1, 2), ("coronal", 1, 0, 2), ("sagittal", 2, 0, 1))


def display_grid(volume: MedicalVolume, data: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient ``(D, H, W)`` data of ``volume``'s grid to the display grid (:data:`DISPLAY_CODES`); also
    return that grid's spacing."""
    transform = transform_to_codes(volume.affine, DISPLAY_CODES)
    spacing = tuple(volume.spacing[p] for p in transform.perm)
    return np.ascontiguousarray(transform.apply(data)), spacing  # type: ignore[return-value]


def orientation_letters(volume: MedicalVolume) -> tuple[tuple[str, str], ...]:
    """For each axis of the display grid, the patient directions at its first and last index, e.g.
    ``(("S", "I"), ("A", "P"), ("R", "L"))``.

    Derived from ``volume.orientation`` (the direction each canonical axis runs towards) and the permutation
    and flips that take the canonical grid to the display grid.
    """
    transform = transform_to_codes(volume.affine, DISPLAY_CODES)
    letters = []
    for axis, flip in zip(transform.perm, transform.flip):
        end = volume.orientation[axis]
        end = _OPPOSITE[end] if flip else end
        letters.append((_OPPOSITE[end], end))
    return tuple(letters)


def _centre(labels: np.ndarray | None, shape: tuple[int, ...]) -> list[int]:
    if labels is not None and np.any(labels > 0):
        # The centre of the labelled region, so every panel shows some of it.
        return [round(float(np.mean(axis))) for axis in np.nonzero(labels > 0)]
    return [n // 2 for n in shape]


def orthogonal_slices_figure(
    volume: MedicalVolume,
    *,
    labels: MedicalVolume | np.ndarray | None = None,
    label_names: dict[int, str] | None = None,
    title: str | None = None,
    channel: int = 0,
    alpha: float = 0.4,
):
    """A matplotlib figure of the axial, coronal and sagittal slices through the centre (of the labels, if
    given), or of the one plane of a single-slice input (a 2D image, a 1-slice volume).

    Every panel carries orientation letters at its edges (:func:`orientation_letters`). Arguments as
    :func:`save_orthogonal_slices`; the caller closes the figure (``matplotlib.pyplot.close``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, spacing = display_grid(volume, volume.array[channel].astype(np.float32))
    letters = orientation_letters(volume)
    label_data = None
    if labels is not None:
        label_array = labels.array if isinstance(labels, MedicalVolume) else np.asarray(labels)
        label_array = label_array.reshape(label_array.shape[-3:])
        if label_array.shape != volume.spatial_shape:
            raise ValueError(f"labels {label_array.shape} are not on the image grid {volume.spatial_shape}")
        label_data, _ = display_grid(volume, label_array)
    finite = image[np.isfinite(image)]
    vmin, vmax = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    centre = _centre(label_data, image.shape)

    # A single-slice input has one plane: the panel that fixes its one-voxel axis. Otherwise all three.
    flat = [axis for axis, n in enumerate(image.shape) if n == 1]
    panels = [panel for panel in _PANELS if panel[1] == flat[0]] if flat else list(_PANELS)
    figure, axes = plt.subplots(
        1, len(panels), figsize=(4 * len(panels), 4.4), facecolor="black", squeeze=False
    )
    for axis, (name, fixed, rows, columns) in zip(axes[0], panels):
        index = [slice(None)] * 3
        index[fixed] = centre[fixed]
        aspect = spacing[rows] / spacing[columns]
        axis.imshow(
            image[tuple(index)], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest"
        )
        if label_data is not None:
            plane = label_data[tuple(index)]
            colours = np.zeros((*plane.shape, 4))
            for value in np.unique(plane[plane > 0]):
                colours[plane == value] = (*_unit_colour(int(value)), alpha)
            axis.imshow(colours, aspect=aspect, interpolation="nearest")
        # Orientation letters: the row axis's first index is at the top, the column axis's at the left.
        style = dict(transform=axis.transAxes, color="yellow", fontsize=11, fontweight="bold")
        axis.text(0.5, 0.98, letters[rows][0], ha="center", va="top", **style)
        axis.text(0.5, 0.02, letters[rows][1], ha="center", va="bottom", **style)
        axis.text(0.02, 0.5, letters[columns][0], ha="left", va="center", **style)
        axis.text(0.98, 0.5, letters[columns][1], ha="right", va="center", **style)
        axis.set_title(name, color="white")
        axis.axis("off")
    if label_data is not None:
        present = [int(v) for v in np.unique(label_data) if v > 0]
        handles = [
            Patch(color=_unit_colour(v), label=(label_names or {}).get(v, f"label {v}")) for v in present
        ]
        figure.legend(
            handles=handles, loc="lower center", ncol=max(1, len(handles)), frameon=False, labelcolor="white"
        )
    if title:
        figure.suptitle(title, color="white")
    figure.tight_layout()
    return figure


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
    """Write a PNG with the axial, coronal and sagittal slices through the centre (of the labels, if given);
    a single-slice input (a 2D image, a 1-slice volume) gets its one plane. Panels carry orientation letters.

    Args:
        volume: The image.
        path: Output ``.png`` (written atomically; never over ``volume``'s source file).
        labels: Optional label map on the same grid ``(D, H, W)`` / ``(1, D, H, W)``, drawn in colour.
        label_names: Names for the legend, by label value.
        title: Figure title.
        channel: Which image channel to show.
        alpha: Opacity of the labels.
    """
    import matplotlib.pyplot as plt

    figure = orthogonal_slices_figure(
        volume, labels=labels, label_names=label_names, title=title, channel=channel, alpha=alpha
    )
    path = Path(path)
    try:
        with atomic_output(path, inputs=[volume.source_path]) as tmp:
            figure.savefig(tmp, format="png", dpi=100, facecolor="black")
    finally:
        plt.close(figure)
    return path
