"""Compile medfm's Triton kernels for an NVIDIA Hopper GPU (sm_90) without one: Triton lowers each kernel to
PTX and the ptxas shipped in the triton wheel assembles it. Run in a process without TRITON_INTERPRET.

Prints one ``OK name shared-bytes`` line per kernel, or raises.
"""

from __future__ import annotations

import os
import sys

import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
except ImportError as error:  # the offline compile API of another Triton version
    print(f"SKIP: {error}")
    sys.exit(0)

from medfm.kernels import _flash_varlen_kernels as flash
from medfm.kernels._rope3d_kernel import rope3d_kernel

FLOAT32_POINTERS = {"LSE", "DELTA", "POSITIONS", "FREQ_DEPTH", "FREQ_IN_PLANE"}
FLOAT_SCALARS = {"scale", "scale_log2"}


def _signature(kernel, constants: dict, dtype: str) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name == "CU":
            signature[name] = "*i32"
        elif name.isupper():
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return signature


def compile_kernel(kernel, constants: dict, dtype: str = "bf16", num_warps: int = 4, num_stages: int = 3):
    target = GPUTarget("cuda", 90, 32)
    source = ASTSource(fn=kernel, signature=_signature(kernel, constants, dtype), constexprs=constants)
    options = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    compiled = triton.compile(source, target=target, options=options.__dict__)
    assert "cubin" in compiled.asm, "no cubin: ptxas did not run"
    return compiled


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    attention = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=128, BLOCK_N=64, PRECISION="tf32", UPCAST=False)
    for kernel in (flash.forward, flash.backward_key_value, flash.backward_query):
        compiled = compile_kernel(kernel, attention)
        print("OK", kernel.__name__, compiled.metadata.shared)
    for pair in (True, False):
        rope = dict(HEAD_DIM=64, QUARTER=16, BLOCK_HEADS=16, BLOCK_HALF=32, SIGN=1.0, PAIR=pair)
        compiled = compile_kernel(rope3d_kernel, rope)
        print("OK", f"rope3d_kernel(PAIR={pair})", compiled.metadata.shared)


if __name__ == "__main__":
    main()
