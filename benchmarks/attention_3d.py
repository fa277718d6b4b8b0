#!/usr/bin/env python
"""Attention and RoPE on 3D token grids: eager, sdpa, flash-attn (when installed) and medfm's Triton kernels.

    python benchmarks/attention_3d.py --device cuda --dtype bf16            # on a GPU
    python benchmarks/attention_3d.py --device cpu --dtype fp32 --grids 6x4x4 8x6x6 --steps 3   # smoke run

For each token grid (default 24x12x12 up to 40x24x24, head dim 64) it times forward and forward+backward
attention per implementation and reports tokens/s, peak memory (CUDA) and achieved TFLOP/s as a fraction of
the device's bf16 peak (``--peak-tflops``, or a known value for H100/H200). Attention FLOPs are counted as
``4 * B * heads * L^2 * head_dim`` forward and 3.5x that forward+backward (flash-attn's convention). The
varlen rows run the batch as one packed stream: ``medfm triton`` is medfm's own flash-attention kernel,
``flash-attn varlen`` flash-attn's (when installed). A second table gives each implementation's largest error
against a float32 reference on the same inputs (output and gradients), and a third times the fused Triton 3D
RoPE (queries and keys in one launch) against the eager rotation, forward and forward+backward.
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
    from medfm.kernels import flash_attention_varlen, interpreting, triton_available

    def eager(q, k, v):
        weights = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return weights.softmax(-1) @ v

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def packed(kernel):  # the batch's sequences as one packed stream, (total, heads, head_dim)
        def run(q, k, v):
            b, h, length, d = q.shape
            stream = [t.transpose(1, 2).reshape(b * length, h, d) for t in (q, k, v)]
            cu = torch.arange(b + 1, device=q.device, dtype=torch.int32) * length
            return kernel(*stream, cu, length)

        return run

    table = {"eager": eager, "sdpa": sdpa}
    if triton_available() and (device.type == "cuda" or interpreting()):
        table["medfm triton"] = packed(lambda q, k, v, cu, longest: flash_attention_varlen(q, k, v, cu))
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func
        except ImportError:
            pass
        else:
            table["flash-attn"] = lambda q, k, v: flash_attn_func(
                *(t.transpose(1, 2) for t in (q, k, v))
            ).transpose(1, 2)
            table["flash-attn varlen"] = packed(
                lambda q, k, v, cu, longest: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)
            )
    return table


def _agreement(table, shape, device, dtype) -> None:
    """Largest absolute error of output and gradients against float32 eager attention on the same inputs."""
    generator = torch.Generator(device).manual_seed(0)
    inputs = [torch.randn(shape, device=device, generator=generator) for _ in range(3)]
    grad = torch.randn(shape, device=device, generator=generator)

    def run(fn, cast):
        leaves = [t.to(cast, copy=True).requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out = out.reshape(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2) if out.ndim == 3 else out
        out.backward(grad.to(out.dtype))
        return [out.float()] + [leaf.grad.float() for leaf in leaves]

    reference = run(table["eager"], torch.float32)
    for label, fn in table.items():
        errors = [(got - want).abs().max().item() for got, want in zip(run(fn, dtype), reference)]
        print(f"| {label} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")


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

    print("\nLargest absolute error against float32 eager attention, first grid:\n")
    print("| implementation | output | dq | dk | dv |")
    print("| --- | --- | --- | --- | --- |")
    first = tuple(int(n) for n in args.grids[0].split("x"))
    shape = (args.batch, args.heads, first[0] * first[1] * first[2], args.head_dim)
    _agreement(_implementations(device, dtype), shape, device, dtype)
    _rope_table(args, device, dtype)


def _rope_table(args, device: torch.device, dtype: torch.dtype) -> None:
    """The fused RoPE (queries and keys in one launch) against the eager rotation with prebuilt cos/sin tables
    (the model builds them once per forward pass and shares them across blocks, so they are not timed)."""
    from medfm.kernels import interpreting, rope3d_qk, triton_available
    from medfm.layers import Rope3D

    rope = Rope3D(args.head_dim, (2333.0, 10000.0, 10000.0))
    print("\n| grid | RoPE on q and k | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for grid_text in args.grids:
        grid = tuple(int(n) for n in grid_text.split("x"))
        rotation = rope.rotation([grid], device=device)
        rotation.tables  # noqa: B018  (built once, outside the timing)
        shape = (args.batch, rotation.positions.shape[0], args.heads, args.head_dim)
        q, k = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))

        def eager(q=q, k=k, rotation=rotation):
            return rotation.rotate_eager(q), rotation.rotate_eager(k)

        def fused(q=q, k=k, rotation=rotation):
            return rope3d_qk(q, k, rotation.positions, *rotation.frequencies)

        results = {}
        candidates = {"eager rotation (cos/sin tables)": eager}
        if triton_available() and (device.type == "cuda" or interpreting()):
            candidates["fused Triton kernel"] = fused
        for label, fn in candidates.items():
            forward = _timed(fn, args.steps, args.warmup, device)
            both = _timed(
                lambda fn=fn: sum(t.float().sum() for t in fn()).backward(), args.steps, args.warmup, device
            )
            results[label] = (forward, both)
            base = results["eager rotation (cos/sin tables)"]
            print(
                f"| {grid_text} | {label} | {forward * 1e3:.3f} | {both * 1e3:.3f} | "
                f"{base[0] / forward:.2f}x | {base[1] / both:.2f}x |"
            )


if __name__ == "__main__":
    main()
