"""Sliding-window inference: a progress bar when a person watches a terminal, none in tests, CI and logs;
test-time augmentation by mirroring; window batches that do not change the result."""

from __future__ import annotations

import io

import pytest
import torch

from medfm.inference import flip_combinations, progress_wanted, sliding_window_count, sliding_window_logits
from medfm.models.spad import SpadViTForSemanticSegmentation

from .common.threshold_model import ThresholdConfig, ThresholdSegmenter
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


def test_progress_options_place_the_window_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    watched = _watched(monkeypatch)
    _run(progress={"position": 1, "leave": False, "desc": "tiles"})
    assert "tiles:" in watched.getvalue() and "0/9" in watched.getvalue()  # 3 x 3 x 1 windows


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [((16, 64, 64), (8, 32, 64), 0.5), ((5, 33, 17), (4, 16, 16), 0.25), ((3, 8, 8), (4, 16, 16), 0.5)],
)
def test_window_count_is_what_monai_visits(shape, roi, overlap) -> None:
    model = ThresholdSegmenter(ThresholdConfig()).eval()
    sliding_window_logits(model, torch.rand(1, 1, *shape), roi, overlap=overlap, progress=False)
    assert model.calls == sliding_window_count(shape, roi, overlap)


def _tiny() -> SpadViTForSemanticSegmentation:
    torch.manual_seed(0)
    return SpadViTForSemanticSegmentation(tiny_segmentation_config()).eval()


def test_tta_averages_the_logits_of_every_mirrored_input() -> None:
    model, spacing = _tiny(), torch.tensor([4.0, 1, 1])
    volume = torch.randn(1, 1, 8, 32, 64, generator=torch.Generator().manual_seed(1))
    roi = (8, 32, 64)  # one window, the volume: mirroring the window is mirroring the volume

    def logits(x: torch.Tensor, **kwargs) -> torch.Tensor:
        return sliding_window_logits(model, x, roi, spacing=spacing, **kwargs)

    combinations = flip_combinations((2, 3, 4))
    assert len(combinations) == 8 and combinations[0] == ()
    manual = torch.stack(
        [logits(volume.flip(axes)).flip(axes) if axes else logits(volume) for axes in combinations]
    ).mean(0)
    averaged = logits(volume, tta=True)
    torch.testing.assert_close(averaged, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(averaged, logits(volume), atol=1e-4)  # this model is not mirror-symmetric


def test_tta_mirrors_every_axis_longer_than_a_voxel() -> None:
    model = ThresholdSegmenter(ThresholdConfig()).eval()
    volume = torch.rand(1, 1, 4, 16, 16)
    plain = sliding_window_logits(model, volume, (4, 16, 16))
    model.calls = 0
    mirrored = sliding_window_logits(model, volume, (4, 16, 16), tta=True)
    assert model.calls == 8
    torch.testing.assert_close(mirrored, plain)  # a voxel-wise model is its own mirror image
    model.calls = 0
    sliding_window_logits(model, volume, (1, 16, 16), overlap=0, tta=True)
    assert model.calls == 4 * 4  # four one-slice windows, each mirrored in-plane only


def test_window_batches_do_not_change_the_logits() -> None:
    one = _run()
    torch.testing.assert_close(_run(sw_batch_size=2), one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run(sw_batch_size=4, tta=True), _run(tta=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sw_batch_size must be at least 1"):
        _run(sw_batch_size=0)


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [((48, 64, 64), (32, 32, 32), 0.5), ((10, 100, 37), (8, 32, 32), 0.25), ((5, 20, 20), (8, 32, 32), 0.0)],
)
def test_window_count_matches_monais_windows(shape, roi, overlap) -> None:
    from monai.inferers import sliding_window_inference

    calls = []

    def predictor(window: torch.Tensor) -> torch.Tensor:
        calls.append(window.shape[0])
        return window

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, predictor, overlap=overlap)
    assert sliding_window_count(shape, roi, overlap) == len(calls)
