"""The end-to-end demo on data that ships inside installed packages (no download).

It reads nilearn's MNI152 T1 template (ICBM 2009a, 1 mm), prints its geometry and intensity
statistics, preprocesses it with a :class:`~medfm.processing.MedicalImageProcessor`, maps a tissue
label map made from nilearn's grey/white-matter probability maps through the processor and back, and
writes the preprocessed NIfTI and pictures of three orthogonal slices.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .io import MedicalVolume, load_volume, write_nifti
from .processing import MedicalImageProcessor

__all__ = ["mni152_paths", "run_demo", "tissue_labels"]

TISSUE_NAMES = {1: "grey matter", 2: "white matter"}


def mni152_paths() -> dict[str, Path]:
    """Paths of nilearn's packaged MNI152 T1 template and grey/white-matter probability maps.

    Raises:
        ModuleNotFoundError: nilearn is not installed (``pip install "medfm[demo]"``).
    """
    data = importlib.resources.files("nilearn.datasets") / "data"
    names = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
    return {kind: Path(str(data / name)) for kind, name in names.items()}


def tissue_labels(grey: MedicalVolume, white: MedicalVolume, threshold: float = 0.5) -> np.ndarray:
    """Label map ``(D, H, W)``: 1 where grey matter is the likeliest tissue, 2 for white matter, 0 elsewhere.

    A voxel is labelled when that tissue's probability is at least ``threshold`` (of the map's maximum,
    since nilearn stores the probabilities as 8-bit values).
    """
    gm = grey.array[0].astype(np.float32) / float(grey.array.max())
    wm = white.array[0].astype(np.float32) / float(white.array.max())
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm >= threshold) & (gm >= wm)] = 1
    labels[(wm >= threshold) & (wm > gm)] = 2
    return labels


def _print_table(title: str, rows: dict) -> None:
    width = max(len(k) for k in rows)
    lines = [f"\n{title}"]
    for key, value in rows.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        lines.append(f"  {key:<{width}}  {shown}")
    tqdm.write("\n".join(lines))  # keeps the progress bar below the text


def run_demo(out_dir: str | Path = "demo_outputs", spacing_mm: float = 2.0) -> dict[str, Path]:
    """Run the demo; return the paths it wrote.

    Args:
        out_dir: Folder for the outputs (created if missing).
        spacing_mm: Isotropic spacing the processor resamples to.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = mni152_paths()
    written: dict[str, Path] = {}
    stages = tqdm(total=5, desc="medfm demo", unit="stage")

    stages.set_postfix_str("reading MNI152")
    t1 = load_volume(paths["t1"])
    grey, white = load_volume(paths["gm"]), load_volume(paths["wm"])
    _print_table(f"Input: {paths['t1'].name}", t1.describe())
    stages.update()

    stages.set_postfix_str("preprocessing")
    processor = MedicalImageProcessor(
        steps=[
            {"name": "resample", "spacing": [spacing_mm] * 3, "mode": "linear"},
            {"name": "percentile_clip", "lower": 0.5, "upper": 99.5, "above_min": True, "rescale": True},
            {"name": "pad_to_multiple", "multiple": 16, "value": 0.0},
        ]
    )
    inputs = processor(t1)
    grid = inputs.grids[0]
    processed = grid.processed_volume(inputs["pixel_values"][0])
    _print_table(
        "Processed (model input)",
        {
            "pixel_values shape": tuple(inputs["pixel_values"].shape),
            "spacing (z, y, x) mm": tuple(round(float(s), 4) for s in inputs["spacing"][0]),
            "operations": json.dumps(grid.operations),
            "min": float(inputs["pixel_values"].min()),
            "max": float(inputs["pixel_values"].max()),
            "mean": float(inputs["pixel_values"].mean()),
        },
    )
    stages.update()

    stages.set_postfix_str("label round trip")
    # Send the tissue labels, one-hot, through the processor's spatial steps onto the model grid, as
    # class probabilities a segmentation model would output there, then map them back to the input grid.
    labels = tissue_labels(grey, white)
    one_hot = np.stack([labels == value for value in range(3)]).astype(np.float32)
    spatial_only = MedicalImageProcessor(steps=[processor.steps[0], processor.steps[2]])
    on_model_grid = spatial_only(t1.with_array(one_hot))
    restored = spatial_only.post_process_semantic_segmentation(
        on_model_grid["pixel_values"], on_model_grid.grids, apply_softmax=False
    )[0]["segmentation"]
    agreement = float(np.mean(restored.array[0] == labels))
    volumes_ml = {
        f"{name} volume (ml)": float((labels == value).sum() * np.prod(t1.spacing) / 1000.0)
        for value, name in TISSUE_NAMES.items()
    }
    _print_table(
        "Tissue labels (nilearn GM/WM maps, p >= 0.5)",
        {
            **volumes_ml,
            "labels back on the input grid": f"{restored.spatial_shape}, same affine: "
            f"{bool(np.allclose(restored.affine, t1.affine))}",
            f"voxel agreement after {spacing_mm:g} mm and back": f"{agreement:.2%}",
        },
    )
    stages.update()

    stages.set_postfix_str("writing NIfTI")
    written["preprocessed"] = write_nifti(processed, out_dir / "mni152_t1_preprocessed.nii.gz")
    written["labels"] = write_nifti(restored, out_dir / "mni152_tissue_labels.nii.gz")
    stages.update()

    stages.set_postfix_str("drawing slices")
    from .visualization import save_orthogonal_slices

    written["slices"] = save_orthogonal_slices(
        t1,
        out_dir / "mni152_t1_slices.png",
        labels=restored,
        label_names=TISSUE_NAMES,
        title="MNI152 T1 with grey/white-matter labels (mapped through the processor and back)",
    )
    written["preprocessed_slices"] = save_orthogonal_slices(
        processed,
        out_dir / "mni152_t1_preprocessed_slices.png",
        title=f"Preprocessed: {spacing_mm:g} mm, percentile-clipped to [0, 1], padded to 16",
    )
    stages.update()
    stages.close()

    print("\nWrote:")
    for name, path in written.items():
        print(f"  {name:<20} {path}")
    return written
