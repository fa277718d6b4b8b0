"""The demo runs end to end on the MNI152 template nilearn ships: fine-tunes, segments, writes what it says."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from medfm.demo import mni152_paths, run_demo


@pytest.mark.slow
def test_demo_fine_tunes_and_writes_outputs(tmp_path: Path) -> None:
    written = run_demo(tmp_path / "out")  # the demo as `make demo` runs it: 300 steps
    segmentation = nib.load(written["segmentation"])
    t1 = nib.load(mni152_paths()["t1"])
    assert segmentation.shape == t1.shape and np.array_equal(segmentation.affine, t1.affine)
    assert set(np.unique(np.asarray(segmentation.dataobj))) <= {0, 1, 2}
    assert Image.open(written["overlay"]).format == "PNG"
    metrics = json.loads(written["metrics"].read_text())
    # Held-out hemisphere Dice; `make demo` prints about 0.85 (grey) and 0.84 (white matter).
    assert metrics["dice_grey_matter"] > 0.75 and metrics["dice_white_matter"] > 0.75
    card = ModelCard.load(written["model"] / "README.md")
    assert {r.metric_name for r in card.data.eval_results} == {"dice_grey_matter", "dice_white_matter"}
    assert {r.metric_type for r in card.data.eval_results} == {"dice"}
    assert (written["model"] / "preprocessor_config.json").is_file()
