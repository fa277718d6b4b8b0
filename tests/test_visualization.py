"""Overlays: three panels for a volume, one for a single-slice input, orientation letters on every panel."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from medfm.io import MedicalVolume, load_volume
from medfm.io.volume import affine_from_spacing
from medfm.visualization import orientation_letters, orthogonal_slices_figure, save_orthogonal_slices

# Letters at (top, bottom, left, right) of each panel in radiological display.
EXPECTED = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


def _edges(axis) -> tuple[str, str, str, str]:
    """The letters at the top, bottom, left and right edges of a panel (by their place in axes coordinates)."""
    placed = {text.get_position(): text.get_text() for text in axis.texts}
    top = placed[max(placed, key=lambda p: p[1])]
    bottom = placed[min(placed, key=lambda p: p[1])]
    left = placed[min(placed, key=lambda p: p[0])]
    right = placed[max(placed, key=lambda p: p[0])]
    return top, bottom, left, right


def _panels(figure) -> dict[str, tuple[str, str, str, str]]:
    return {axis.get_title(): _edges(axis) for axis in figure.axes}


def _volume(shape: tuple[int, int, int], affine: np.ndarray) -> MedicalVolume:
    array = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    return MedicalVolume(array=array, affine=affine)


def _png(path: Path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image[..., :3].std() > 0.01  # not blank
    return image


def test_a_volume_gets_three_panels_with_orientation_letters(anatomical_path: Path, tmp_path: Path) -> None:
    volume = load_volume(anatomical_path)
    figure = orthogonal_slices_figure(volume, labels=np.ones(volume.spatial_shape, dtype=np.int16))
    try:
        assert _panels(figure) == EXPECTED
    finally:
        plt.close(figure)
    image = _png(save_orthogonal_slices(volume, tmp_path / "three.png"))
    assert image.shape[1] == 1200  # three 4-inch panels at 100 dpi


def test_a_single_slice_gets_one_panel(ct_small_path: Path, tmp_path: Path) -> None:
    volume = load_volume(ct_small_path)  # one DICOM CT slice
    assert volume.spatial_shape[0] == 1
    figure = orthogonal_slices_figure(volume)
    try:
        assert _panels(figure) == {"axial": EXPECTED["axial"]}
    finally:
        plt.close(figure)
    image = _png(save_orthogonal_slices(volume, tmp_path / "one.png", labels=np.zeros(volume.spatial_shape)))
    assert image.shape[1] == 400  # one panel, not three degenerate ones


def test_a_coronal_single_slice_shows_its_own_plane(tmp_path: Path) -> None:
    affine = np.array([[0, 0, -0.8, 0], [-3.0, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 0, 1]])  # codes P I L
    volume = _volume((1, 40, 30), affine)
    assert volume.orientation == "PIL"
    figure = orthogonal_slices_figure(volume)
    try:
        assert _panels(figure) == {"coronal": EXPECTED["coronal"]}
    finally:
        plt.close(figure)
    assert _png(save_orthogonal_slices(volume, tmp_path / "coronal.png")).shape[1] == 400


@pytest.mark.parametrize(
    "affine",
    [
        affine_from_spacing((2.0, 1.0, 1.0)),  # S P L, canonical axial
        np.diag([1.0, 1.0, 2.0, 1.0])[[2, 1, 0, 3]],  # S A R: rows and columns flipped
        np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]]),  # L I A
    ],
)
def test_letters_follow_the_volume_orientation(affine: np.ndarray) -> None:
    """Whatever the volume's axis order, the display (and its letters) is radiological."""
    volume = _volume((6, 7, 8), affine)
    assert orientation_letters(volume) == (("S", "I"), ("A", "P"), ("R", "L"))
    figure = orthogonal_slices_figure(volume)
    try:
        assert _panels(figure) == EXPECTED
    finally:
        plt.close(figure)
