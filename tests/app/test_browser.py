"""The web viewer in a real browser: headless Chromium (the system's, driven by Playwright) goes through upload,
model choice, run, slice slider, opacity, label toggle and downloads on the MNI152 template nilearn ships, with
a tiny segmentation model; the downloaded label map and a screenshot are checked.

Skips, saying why, only where no Chromium or no Playwright is installed (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfm.visualization import label_colour

from ..common.hub_cache import add_to_hub_cache

pytest.importorskip("gradio", reason="the app extra (Gradio) is not installed: pip install -e '.[app]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed: pip install playwright"
)

pytestmark = [
    pytest.mark.slow,
    # Gradio 6's queue calls pandas options that pandas 3 deprecates: its warnings, not the viewer's.
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]

# Flags for a headless Chromium run as root on a machine without a network or a display.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _chromium() -> str | None:
    """The Chromium to drive: ``MEDFM_CHROMIUM``, else ``chromium`` (or ``chromium-browser``) on the PATH, else
    Debian's /usr/bin/chromium."""
    candidates = [
        os.environ.get("MEDFM_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    for candidate in [*candidates, "/usr/bin/chromium"]:
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, segmentation_model: Path):
    """The viewer on a free local port, with a Hub cache listing the tiny model as medfm-test/tiny-seg."""
    from medfm.app import build_app

    root = tmp_path_factory.mktemp("served")
    add_to_hub_cache(segmentation_model, "medfm-test/tiny-seg", root / "hub")
    app = build_app(hub_cache=root / "hub", workdir=root / "work")
    app.queue()
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", root / "work"
    app.close()


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    outside: list[str] = []
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    opened.on("request", lambda r: None if r.url.startswith(served[0]) else outside.append(r.url))
    opened.goto(served[0])
    opened.wait_for_selector("#medfm-run")
    yield opened
    context.close()
    assert not outside, f"the page fetched from outside the app: {outside[:5]}"


def _image_source(page) -> str:
    return page.locator("#medfm-view-axial img").get_attribute("src") or ""


def _wait_for_new_axial(page, before: str) -> None:
    page.wait_for_function(
        "before => { const img = document.querySelector('#medfm-view-axial img');"
        " return img && img.src && img.src !== before; }",
        arg=before,
    )


def _upload(page, path: Path) -> None:
    page.set_input_files("#medfm-upload input[type=file]", str(path))
    page.wait_for_selector(f"#medfm-upload >> text={path.name[:12]}")


def _colour_pixels(picture: np.ndarray, value: int, tolerance: int = 12) -> int:
    return int(np.all(np.abs(picture[..., :3].astype(int) - label_colour(value)) <= tolerance, axis=-1).sum())


def test_upload_run_slide_download(
    page, served, mni_t1_path: Path, segmentation_model: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    _upload(page, mni_t1_path)
    # The model box lists the Hub cache's model; this run picks the folder by typing it.
    box = page.locator("#medfm-model input")
    box.click()
    page.wait_for_selector("text=medfm-test/tiny-seg (segmentation, Hub cache)")
    box.fill(str(segmentation_model))
    box.press("Enter")
    page.click("#medfm-run")
    page.wait_for_selector("#medfm-status >> text=Done", timeout=60_000)
    assert "2 of 2 labels found" in page.inner_text("#medfm-status") or "labels found" in page.inner_text(
        "#medfm-status"
    )
    assert page.locator("#medfm-volumes").inner_text().count("matter") == 2

    # Slide the axial view to another slice, make the labels opaque, and switch grey matter off.
    before = _image_source(page)
    page.locator("#medfm-slider-axial input[type=range]").fill("100")
    _wait_for_new_axial(page, before)
    before = _image_source(page)
    page.locator("#medfm-opacity input[type=range]").fill("1")
    _wait_for_new_axial(page, before)
    before = _image_source(page)
    page.locator("#medfm-labels label", has_text="grey matter").click()
    _wait_for_new_axial(page, before)

    # The label map comes down as NIfTI on the input's grid, with the model's labels only.
    with page.expect_download() as download:
        page.click("#medfm-download-nifti")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    source, labels = nib.load(mni_t1_path), nib.load(saved)
    assert saved.name.endswith(".nii.gz") and labels.shape == source.shape
    assert np.allclose(labels.affine, source.affine)
    values = set(np.unique(np.asarray(labels.dataobj)).tolist())
    assert values <= {0, 1, 2} and values & {1, 2}
    with page.expect_download() as download:
        page.click("#medfm-download-png")
    overlay = tmp_path / download.value.suggested_filename
    download.value.save_as(overlay)
    assert Image.open(overlay).format == "PNG"

    # The screenshot: a real picture, white matter drawn in its colour, grey matter (switched off) not at all.
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    page.locator("#medfm-view-axial img").screenshot(path=str(tmp_path / "axial.png"))
    axial = np.asarray(Image.open(tmp_path / "axial.png").convert("RGB"))
    assert axial.shape[0] > 200 and axial.std() > 20  # not blank
    assert _colour_pixels(axial, 2) > 50
    assert _colour_pixels(axial, 1, tolerance=6) == 0
    whole = np.asarray(Image.open(tmp_path / "viewer.png").convert("RGB"))
    assert _colour_pixels(whole, 2) > _colour_pixels(axial, 2)  # the other views and the legend too
    assert time.monotonic() - started < 60


def test_a_bad_upload_shows_one_line(page, segmentation_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 a truncated gzip stream")
    _upload(page, broken)
    box = page.locator("#medfm-model input")
    box.fill(str(segmentation_model))
    box.press("Enter")
    page.click("#medfm-run")
    page.wait_for_selector("#medfm-status >> text=Error")
    status = page.inner_text("#medfm-status").strip()
    assert status.startswith("Error:") and "broken.nii.gz: the gzip stream cannot be trusted" in status
    assert "Traceback" not in page.content() and len(status.splitlines()) <= 2
    assert not page.locator("#medfm-segmentation").is_visible()


def test_a_classifier_shows_its_top_labels(page, classification_model: Path, anatomical_path: Path) -> None:
    _upload(page, anatomical_path)
    box = page.locator("#medfm-model input")
    box.fill(str(classification_model))
    box.press("Enter")
    page.click("#medfm-run")
    page.wait_for_selector("#medfm-status >> text=classified by", timeout=60_000)
    shown = page.inner_text("#medfm-scores")
    table = page.inner_text("#medfm-score-table")
    assert sum(name in shown for name in ("normal", "benign", "malignant")) == 3
    assert table.count("\n") >= 3 and "rank" in table
    assert not page.locator("#medfm-segmentation").is_visible()
