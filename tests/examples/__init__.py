"""Tests of the scripts in examples/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A port nothing listens on now (a fixed one may still be held by an earlier run)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_on_two_cpu_processes(
    script: Path | str, arguments: list[str], timeout: int = 300, *, module: bool = False
):
    """``accelerate launch`` ``script`` as two CPU processes (gloo DDP); returns the finished process.

    With ``module``, ``script`` names a module run as ``python -m`` (``accelerate launch -m medfm ...``).
    """
    import os
    import subprocess
    import sys

    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *(["-m"] if module else []),
        str(script),
        *arguments,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
