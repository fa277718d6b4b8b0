"""Starting the viewer from the command line: ``medfm app`` (wired in :mod:`medfm.cli`) and
``python -m medfm.app``. Nothing here imports Gradio until the server starts."""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
from collections.abc import Sequence

from ..errors import AppDependencyError, AppPortError

__all__ = ["AppDependencyError", "add_app_arguments", "main", "require_gradio", "run_app"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def require_gradio() -> None:
    """Raise :class:`AppDependencyError` unless Gradio is installed and imports (it is imported here)."""
    try:
        missing = importlib.util.find_spec("gradio") is None
    except (ImportError, ValueError):  # a broken or blocked package
        missing = True
    if missing:
        raise AppDependencyError(
            'the web viewer needs Gradio, which is not installed; install it with: pip install "medfm[app]"'
        )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when Gradio is imported
    try:
        import gradio  # noqa: F401
    except Exception as error:  # an incomplete install: a dependency missing or of the wrong version
        text = str(error).strip().splitlines()
        raise AppDependencyError(
            f"Gradio is installed but cannot be imported ({type(error).__name__}: {text[0] if text else ''}); "
            'reinstall it with: pip install --force-reinstall "medfm[app]"'
        ) from error


def add_app_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the viewer's options to ``parser`` (``medfm app``'s sub-parser); returns it.

    Options: ``--model`` (repeatable; the first is preselected), ``--host`` (default 127.0.0.1), ``--port``
    (default 7860; 0 picks a free port), ``--share`` (a public Gradio link; off by default), ``--device``,
    ``--hub-cache``.
    """
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="model folder or Hub id to offer first (repeatable; the first is preselected)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to serve on (default {DEFAULT_HOST}: this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)"
    )
    parser.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (off by default)"
    )
    parser.add_argument("--device", default=None, help="where models run, e.g. cpu, cuda, cuda:1")
    parser.add_argument(
        "--hub-cache", default=None, help="Hub cache to list models from (default HF_HUB_CACHE)"
    )
    parser.set_defaults(func=run_app)
    return parser


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as error:
            raise AppPortError(
                f"cannot serve on --host {host} ({error.strerror or error}); pass an address of this machine "
                "(127.0.0.1, or 0.0.0.0 for every interface)"
            ) from None
        return int(probe.getsockname()[1])


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise AppPortError(
                f"cannot serve on {host}:{port} ({error.strerror or error}); pass another --port, or --port 0 "
                "for a free one"
            ) from None


def run_app(args: argparse.Namespace, *, block: bool = True):
    """Serve the viewer with the options :func:`add_app_arguments` parsed; blocks until interrupted.

    Returns:
        0 once the server stops (``block=True``); else the launched ``gradio.Blocks`` (tests).

    Raises:
        AppDependencyError: Gradio is not installed.
        AppPortError: The port is taken or the host is not an address of this machine.
        DeviceUnavailableError: ``--device`` is not a device of this machine.
    """
    require_gradio()
    from . import build_app

    if not 0 <= args.port <= 65535:
        raise AppPortError(f"--port {args.port}: give a port from 1 to 65535, or 0 for a free one")
    from ..hub import check_model_source

    for model in args.model:  # a folder that is not there fails now, not after the first upload
        check_model_source(model)
    port = _free_port(args.host) if args.port == 0 else args.port
    _check_port(args.host, port)
    app = build_app(args.model, device=args.device, hub_cache=args.hub_cache)
    app.queue(default_concurrency_limit=4)
    app.launch(
        server_name=args.host,
        server_port=port,
        share=bool(args.share),
        quiet=True,
        prevent_thread_lock=True,
        show_error=False,
        footer_links=[],
    )
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    print(f"medfm app: serving on http://{shown_host}:{port} (Ctrl+C to stop)", flush=True)
    if getattr(app, "share_url", None):
        print(f"medfm app: public link {app.share_url}", flush=True)
    if not block:
        return app
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medfm.app [options]``: ``medfm app`` itself, so the same options and error contract (one
    line on stderr, status 2; ``--debug`` for the traceback)."""
    from ..cli import main as cli_main

    return cli_main(["app", *(sys.argv[1:] if argv is None else argv)])
