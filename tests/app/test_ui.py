"""The viewer's page and launcher without a browser: Gradio stays optional, the page builds with the models
given, and the launcher serves it (or says in one line why it cannot)."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import medfm.app
from medfm.app import AppDependencyError, add_app_arguments
from medfm.app.launcher import AppPortError
from medfm.errors import DeviceUnavailableError, MedfmError, ModelNotFoundError


def test_medfm_app_imports_without_gradio_and_says_what_to_install(monkeypatch) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, medfm, medfm.app; print('gradio' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    with pytest.raises(AppDependencyError, match=r'pip install "medfm\[app\]"') as raised:
        medfm.app.build_app()
    assert isinstance(raised.value, MedfmError) and isinstance(raised.value, ImportError)
    status = medfm.app.main(["--port", "0"])
    assert status == 2


def _parse(*argv: str) -> argparse.Namespace:
    return add_app_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_launcher_options() -> None:
    args = _parse()
    assert (args.model, args.host, args.port, args.share, args.device) == ([], "127.0.0.1", 7860, False, None)
    args = _parse("--model", "a", "--model", "org/b", "--port", "0", "--share", "--device", "cpu")
    assert args.model == ["a", "org/b"] and args.port == 0 and args.share and args.func is medfm.app.run_app


def test_a_taken_port_and_a_bad_device_are_one_line(capsys) -> None:
    pytest.importorskip("gradio", reason="the app extra (Gradio) is not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AppPortError, match=f"cannot serve on 127.0.0.1:{port}.*--port 0"):
            medfm.app.run_app(_parse("--port", str(port)))
    assert medfm.app.main(["--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a port from 1 to 65535" in err
    with pytest.raises(DeviceUnavailableError):
        medfm.app.build_app(device="nonsense")
    # Before anything is served: a host that is no address of this machine, a model folder that is not there.
    with pytest.raises(AppPortError, match=r"--host no-such-host\.invalid"):
        medfm.app.run_app(_parse("--host", "no-such-host.invalid", "--port", "0"))
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        medfm.app.run_app(_parse("--model", "/no/such/model", "--port", "0"))


def test_the_page_preselects_the_model_given(segmentation_model: Path, tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio", reason="the app extra (Gradio) is not installed")
    app = medfm.app.build_app(model=str(segmentation_model), hub_cache=tmp_path / "hub", workdir=tmp_path)
    assert isinstance(app, gr.Blocks)
    (box,) = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "medfm-model"]
    assert box.value == str(segmentation_model) and box.choices == [(str(segmentation_model),) * 2]
    assert app.analytics_enabled is False


def test_the_launcher_serves_the_page(segmentation_model: Path) -> None:
    pytest.importorskip("gradio", reason="the app extra (Gradio) is not installed")
    app = medfm.app.run_app(_parse("--model", str(segmentation_model), "--port", "0"), block=False)
    try:
        url = app.local_url.rstrip("/")
        with urllib.request.urlopen(f"{url}/config", timeout=30) as response:
            config = json.loads(response.read())
        assert config["title"] == "medfm viewer"
        with urllib.request.urlopen(url + "/", timeout=30) as page:
            html = page.read().decode()
        assert page.status == 200 and "<html" in html.lower()
    finally:
        app.close()


def test_a_locked_page_serves_its_model_only(segmentation_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio", reason="the app extra (Gradio) is not installed")
    app = medfm.app.build_app(model="org/served", lock_model=True, workdir=tmp_path)
    (box,) = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "medfm-model"]
    assert box.value == "org/served" and box.interactive is False and box.choices == [("org/served",) * 2]
    with pytest.raises(ValueError, match="lock_model"):
        medfm.app.build_app(lock_model=True)
