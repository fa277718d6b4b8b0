"""Sliding-window inference: a progress bar when a person watches a terminal, none in tests, CI and logs."""

from __future__ import annotations

import io

import pytest
import torch

from medfm.inference import progress_wanted, sliding_window_logits
from medfm.models.spad import SpadViTForSemanticSegmentation

from .common.tiny_models import tiny_segmentation_config


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _watched(monkeypatch: pytest.MonkeyPatch) -> _Terminal:
    """stderr is a terminal and nothing says the run is unattended (called in the test body: pytest sets
    PYTEST_CURRENT_TEST again after the fixtures)."""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    for name in ("CI", "PYTEST_CURRENT_TEST", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    return terminal


def _run(**kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    model = SpadViTForSemanticSegmentation(tiny_segmentation_config()).eval()
    volume = torch.randn(1, 1, 16, 64, 64)
    return sliding_window_logits(
        model, volume, roi_size=(8, 32, 64), spacing=torch.tensor([4.0, 1, 1]), **kwargs
    )


def test_progress_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    _watched(monkeypatch)
    assert progress_wanted()
    assert not progress_wanted(io.StringIO())  # a log file or a pipe
    monkeypatch.setenv("CI", "true")
    assert not progress_wanted()
    monkeypatch.setenv("CI", "false")
    assert progress_wanted()
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/test_inference.py::x (call)")
    assert not progress_wanted()


def test_progress_bar_by_default_when_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    watched = _watched(monkeypatch)
    logits = _run()
    assert logits.shape == (1, 3, 16, 64, 64)
    assert "100%" in watched.getvalue()  # tqdm's bar over the windows
    watched.seek(0)
    watched.truncate()
    torch.testing.assert_close(_run(progress=False), logits)
    assert watched.getvalue() == ""


def test_no_progress_bar_in_tests_or_logs(capfd: pytest.CaptureFixture) -> None:
    _run()  # under pytest, stderr captured: neither a terminal nor watched
    assert capfd.readouterr().err == ""
