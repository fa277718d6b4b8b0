"""The kernels compile for a real GPU (sm_90, Hopper) on a machine without one: Triton's full lowering to PTX
and ptxas, which the interpreter tests never exercise (bf16 tensor-core products, the tile layouts, shared
memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfm.kernels import triton_available

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="triton is not installed (pip install 'medfm[triton]')"
)


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))  # a fresh compile, every time
    script = Path(__file__).with_name("compile_for_gpu.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    compiled = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("OK")]
    assert compiled == [
        "forward",
        "backward_key_value",
        "backward_query",
        "rope3d_kernel(PAIR=True)",
        "rope3d_kernel(PAIR=False)",
    ], done.stdout
