#!/usr/bin/env python
"""A heterogeneous batch of 3D volumes: packed (no padding) against padded to the largest shape.

    python benchmarks/packing.py --device cuda --dtype bf16 --size base
    python benchmarks/packing.py --device cpu --dtype fp32 --size tiny --steps 2   # smoke run

The batch mixes volumes of different shapes and spacings (anisotropy levels), as a pre-training stream does.
*Padded* puts every volume in the largest shape (zeros) and runs one ordinary batch, as upstream's
shape-grouped batches would have to; *packed* runs ``SpadViTModel.forward_packed`` with
``attn_implementation="medfm_varlen"`` (``--varlen-backend``: flash-attn's kernel, medfm's Triton kernel or
per-sequence SDPA; ``auto`` picks the first available on the device). On CUDA both layouts use the fused RoPE
kernel when Triton is installed. Throughput counts real tokens only (padding is waste), forward and backward.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SIZES = {
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=512),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
}
# (depth, height, width) in voxels at one anisotropy level (aniso_d 0: isotropic patches of 16).
SHAPES = [(64, 192, 192), (32, 160, 160), (48, 128, 192), (16, 96, 96), (80, 224, 224), (32, 64, 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink every shape by this factor (smoke runs)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--varlen-backend", choices=["auto", "flash_attn", "triton", "sdpa"], default="auto")
    args = parser.parse_args()
    os.environ["MEDFM_VARLEN_BACKEND"] = args.varlen_backend

    import medfm  # noqa: F401
    from medfm.layers.varlen_attention import varlen_backend
    from medfm.models.spad import SpadViTConfig, SpadViTModel

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = SpadViTModel(SpadViTConfig(**SIZES[args.size])).to(device).train()
    shapes = [tuple(max(16, int(n * args.scale) // 16 * 16) for n in shape) for shape in SHAPES]
    volumes = [torch.randn(3, *shape, device=device) for shape in shapes]
    real_tokens = sum((d // 16) * (h // 16) * (w // 16) for d, h, w in shapes)
    largest = tuple(max(s[i] for s in shapes) for i in range(3))
    padded = torch.zeros(len(volumes), 3, *largest, device=device)
    for index, volume in enumerate(volumes):
        padded[index, :, : volume.shape[1], : volume.shape[2], : volume.shape[3]] = volume

    def packed_step():
        model.set_attn_implementation("medfm_varlen")
        model.forward_packed(volumes, aniso_ds=[0] * len(volumes)).last_hidden_state.float().sum().backward()

    def padded_step():
        model.set_attn_implementation("sdpa")
        model(padded, aniso_d=0).last_hidden_state.float().sum().backward()

    print(
        f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; {args.size}; "
        f"{len(volumes)} volumes, {real_tokens} real tokens; padded to {largest}: "
        f"{len(volumes) * (largest[0] // 16) * (largest[1] // 16) * (largest[2] // 16)} tokens\n"
    )
    probe = torch.empty(1, device=device, dtype=torch.bfloat16 if dtype != torch.float32 else torch.float32)
    print(f"packed attention backend: {varlen_backend(probe)}\n")
    print("| layout | s/step | real tokens/s | peak MB |")
    print("| --- | --- | --- | --- |")
    results = {}
    for label, step in (("padded (sdpa)", padded_step), ("packed (medfm_varlen)", packed_step)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(args.warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        results[label] = real_tokens / seconds
        memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "n/a"
        print(f"| {label} | {seconds:.3f} | {results[label]:.0f} | {memory} |")
    print(
        f"\npacked / padded real-token throughput: {results['packed (medfm_varlen)'] / results['padded (sdpa)']:.2f}x"
    )


if __name__ == "__main__":
    main()
