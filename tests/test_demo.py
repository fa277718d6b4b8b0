"""The demo runs end to end on the MNI152 template shipped with nilearn and writes what it says."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medfm.demo import mni152_paths, run_demo


def test_demo_writes_outputs(tmp_path: Path, capsys) -> None:
    written = run_demo(tmp_path / "out")
    out = capsys.readouterr()
    assert "Input: mni_icbm152_t1" in out.err + out.out
    for path in written.values():
        assert path.exists() and path.stat().st_size > 0
    labels = nib.load(written["labels"])
    t1 = nib.load(mni152_paths()["t1"])
    assert labels.shape == t1.shape and np.array_equal(labels.affine, t1.affine)
    assert set(np.unique(np.asarray(labels.dataobj))) == {0, 1, 2}
    image = Image.open(written["slices"])
    assert image.format == "PNG" and image.size[0] > 600
    # The voxel agreement line reports the label round trip through the processor.
    text = out.err + out.out
    agreement = float(text.split("and back")[1].split("%")[0].split()[-1])
    assert agreement > 97.0
