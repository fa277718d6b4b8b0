"""Fixtures the example tests share."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory, anatomical_path: Path) -> Path:
    """Three cases made from nibabel's anatomical.nii, labels = the bright voxels, in a dataset.json."""
    root = tmp_path_factory.mktemp("Task00_Tiny")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    source = nib.load(anatomical_path)
    data = np.asarray(source.dataobj).astype(np.float32)
    training = []
    for case in range(3):
        image = np.roll(data, 2 * case, axis=0)
        label = (image > np.percentile(image, 70)).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, source.affine), root / "imagesTr" / f"case{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, source.affine), root / "labelsTr" / f"case{case}.nii.gz")
        training.append({"image": f"./imagesTr/case{case}.nii.gz", "label": f"./labelsTr/case{case}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps({"name": "tiny", "labels": {"0": "background", "1": "bright"}, "training": training})
    )
    return root


def write_flip_classes(folder: Path, anatomical_path: Path) -> Path:
    """Two classes of three volumes from nibabel's anatomical.nii, ``upright`` and ``flipped`` (in-plane), as
    class folders under ``folder``."""
    source = nib.load(anatomical_path)
    data = np.asarray(source.dataobj).astype(np.float32)
    for name, transform in {"upright": lambda a: a, "flipped": lambda a: a[:, ::-1, ::-1]}.items():
        (folder / name).mkdir(parents=True)
        for case in range(3):
            volume = np.ascontiguousarray(transform(np.roll(data, case, axis=0)))
            nib.save(nib.Nifti1Image(volume, source.affine), folder / name / f"c{case}.nii.gz")
    return folder
