#!/usr/bin/env python
"""Attention and RoPE on 3D token grids: eager, sdpa, flash-attn (when installed) and medfm's varlen path.

    python benchmarks/attention_3d.py --device cuda --dtype bf16            # on a GPU
    python benchmarks/attention_3d.py --device cpu --dtype fp32 --grids 6x4x4 8x6x6 --steps 3   # smoke run

For each token grid (default 24x12x12 up to 40x24x24, head dim 64) it times forward and forward+backward
attention per implementation and reports tokens/s, peak memory (CUDA) and achieved TFLOP/s as a fraction of
the device's bf16 peak (``--peak-tflops``, or a known value for H100/H200). Attention FLOPs are counted as
``4 * B * heads * L^2 * head_dim`` forward and 3.5x that forward+backward (flash-attn's convention). It also
times the fused Triton 3D RoPE against the eager rotation on the same grids.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

KNOWN_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _implementations(device: torch.device, dtype: torch.dtype):
    from medfm.layers.varlen_attention import varlen_attention_forward

    def eager(q, k, v):
        weights = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return weights.softmax(-1) @ v

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def varlen(q, k, v):  # one packed stream of the batch's sequences
        b, h, length, d = q.shape
        packed = [t.transpose(0, 1).reshape(1, h, b * length, d) for t in (q, k, v)]
        cu = torch.arange(b + 1, device=q.device) * length
        return varlen_attention_forward(torch.nn.Module(), *packed, None, scaling=d**-0.5, cu_seqlens=cu)[0]

    table = {"eager": eager, "sdpa": sdpa, "medfm_varlen": varlen}
    try:
        from flash_attn import flash_attn_func

        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            table["flash-attn"] = lambda q, k, v: flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)))
    except ImportError:
        pass
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--grids", nargs="+", default=["24x12x12", "32x16x16", "40x24x24"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak of the device, for the fraction")
    args = parser.parse_args()

    import medfm  # noqa: F401
    from medfm.kernels import grid_positions, rope3d, rope3d_reference, triton_available
    from medfm.layers import Rope3D

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in KNOWN_BF16_PEAK_TFLOPS.items() if k in name), None)
    print(f"Device: {name}; dtype {args.dtype}; batch {args.batch}, {args.heads} heads x {args.head_dim}\n")
    print(
        "| grid | tokens | implementation | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | TFLOP/s | of peak | peak MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for grid_text in args.grids:
        grid = tuple(int(n) for n in grid_text.split("x"))
        length = grid[0] * grid[1] * grid[2]
        shape = (args.batch, args.heads, length, args.head_dim)
        for label, fn in _implementations(device, dtype).items():
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                forward = _timed(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), args.steps, args.warmup, device)
                both = _timed(
                    lambda fn=fn, q=q, k=k, v=v: fn(q, k, v).float().sum().backward(),
                    args.steps,
                    args.warmup,
                    device,
                )
            except (RuntimeError, torch.OutOfMemoryError) as error:
                print(
                    f"| {grid_text} | {length} | {label} | failed: {str(error).splitlines()[0][:60]} | | | | | |"
                )
                continue
            flops = 3.5 * 4 * args.batch * args.heads * length**2 * args.head_dim
            tflops = flops / both / 1e12
            fraction = f"{tflops / peak:.1%}" if peak else "n/a"
            memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "n/a"
            print(
                f"| {grid_text} | {length} | {label} | {forward * 1e3:.2f} | {both * 1e3:.2f} | "
                f"{args.batch * length / both:.0f} | {tflops:.2f} | {fraction} | {memory} |"
            )

    print("\n| grid | RoPE | fwd ms | speed-up |")
    print("| --- | --- | --- | --- |")
    frequencies = Rope3D(args.head_dim, (2333.0, 10000.0, 10000.0)).frequencies(device)
    for grid_text in args.grids:
        grid = tuple(int(n) for n in grid_text.split("x"))
        positions = grid_positions([grid], device=device)
        x = torch.randn(args.batch, positions.shape[0], args.heads, args.head_dim, device=device, dtype=dtype)
        eager = _timed(
            lambda x=x, positions=positions: rope3d_reference(x, positions, *frequencies),
            args.steps,
            args.warmup,
            device,
        )
        print(f"| {grid_text} | eager rotation (cos/sin tables) | {eager * 1e3:.3f} | 1.00x |")
        if triton_available() and (device.type == "cuda" or __import__("os").environ.get("TRITON_INTERPRET")):
            fused = _timed(
                lambda x=x, positions=positions: rope3d(x, positions, *frequencies),
                args.steps,
                args.warmup,
                device,
            )
            print(f"| {grid_text} | fused Triton kernel | {fused * 1e3:.3f} | {eager / fused:.2f}x |")


if __name__ == "__main__":
    main()
