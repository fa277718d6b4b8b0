"""A fine-tuning example given a --model folder that is not there: one line naming it, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from . import EXAMPLES


@pytest.mark.parametrize("script", ["finetune_segmentation.py", "finetune_classification.py"])
def test_missing_model_folder_is_one_line_not_a_traceback(script: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / script),
            "--model",
            str(missing),
            "--data",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"{missing}: no such folder" in done.stderr
    assert not (tmp_path / "out").exists()
