#!/usr/bin/env python
"""Throughput and peak memory of SPAD-ViT MIM pre-training steps, against MONAI's 3D ViT in the same process.

    python benchmarks/pretrain_throughput.py --sizes tiny small --device cpu --steps 3
    python benchmarks/pretrain_throughput.py --sizes small base --device cuda --steps 20

For every size, attention implementation (eager, sdpa), precision (fp32, bf16 autocast) and activation
checkpointing setting it times full training steps (forward, soft-target MIM loss, backward, AdamW) of
``SpadViTForMaskedImageModeling`` on a batch of 3D crops (``--crop`` at ``--aniso-d``), and the same for
MONAI's ``ViT`` (same width, depth, heads and token grid; MSE on its tokens) as the peer. Each setting runs
in a fresh subprocess so its peak memory is its own: ``ru_maxrss`` on CPU, ``max_memory_allocated`` on CUDA.
Prints a Markdown table with samples/s, tokens/s, peak memory and the ratio to the peer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time

SIZES = {
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=512),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
}


def _measure(setting: dict) -> dict:
    """One setting, in this process: seconds per step and peak memory."""
    import resource

    import torch

    import medfm  # noqa: F401
    from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling

    torch.manual_seed(0)
    device = torch.device(setting["device"])
    batch, crop, aniso_d = setting["batch"], setting["crop"], setting["aniso_d"]
    x = torch.randn(batch, 3, *crop, device=device)
    size = SIZES[setting["size"]]
    depth_patch = max(16 >> aniso_d, 1)
    grid = (crop[0] // depth_patch, crop[1] // 16, crop[2] // 16)
    tokens = grid[0] * grid[1] * grid[2]
    if setting["model"] == "spad-vit":
        config = SpadViTConfig(**size, codebook_size=1024)
        config._attn_implementation = setting["attention"]
        model = SpadViTForMaskedImageModeling(config).to(device).train()
        if setting["checkpointing"]:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        targets = torch.randn(batch, tokens, 1024, device=device)

        def step_loss():
            return model(x, aniso_d=aniso_d, target_logits=targets).loss
    else:
        from monai.networks.nets import ViT

        model = (
            ViT(
                in_channels=3,
                img_size=grid,
                patch_size=1,
                hidden_size=size["hidden_size"],
                mlp_dim=size["intermediate_size"],
                num_layers=size["num_hidden_layers"],
                num_heads=size["num_attention_heads"],
                classification=False,
                spatial_dims=3,
            )
            .to(device)
            .train()
        )
        embed = torch.nn.Conv3d(3, 3, (depth_patch, 16, 16), stride=(depth_patch, 16, 16)).to(device)

        def step_loss():
            return model(embed(x))[0].float().pow(2).mean()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(setting["warmup"] + setting["steps"]):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting["precision"] == "bf16"):
            loss = step_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= setting["warmup"]:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds_per_step": seconds,
        "samples_per_s": batch / seconds,
        "tokens_per_s": batch * tokens / seconds,
        "peak_mb": peak_mb,
        "tokens": tokens,
    }


def _run(setting: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(setting)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, nargs=3, default=(40, 160, 160), help="D H W")
    parser.add_argument("--aniso-d", type=int, default=1, help="anisotropy level (depth patch 16 >> aniso_d)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(json.loads(args.measure))))
        return

    import torch

    machine = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"Machine: {machine}; torch {torch.__version__}; batch {args.batch} x crop {tuple(args.crop)} at aniso_d {args.aniso_d}\n"
    )
    print(
        "| size | attention | precision | checkpointing | s/step | samples/s | tokens/s | peak MB | vs MONAI ViT |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = {
        "device": args.device,
        "batch": args.batch,
        "crop": list(args.crop),
        "aniso_d": args.aniso_d,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    for size in args.sizes:
        peers = {}
        for precision in ("fp32", "bf16"):
            peers[precision] = _run(
                {
                    **base,
                    "size": size,
                    "model": "monai-vit",
                    "attention": "-",
                    "precision": precision,
                    "checkpointing": False,
                }
            )
        for attention, precision, checkpointing in itertools.product(
            ("eager", "sdpa"), ("fp32", "bf16"), (False, True)
        ):
            result = _run(
                {
                    **base,
                    "size": size,
                    "model": "spad-vit",
                    "attention": attention,
                    "precision": precision,
                    "checkpointing": checkpointing,
                }
            )
            if "error" in result:
                print(
                    f"| {size} | {attention} | {precision} | {checkpointing} | failed: {result['error']} | | | | |"
                )
                continue
            peer = peers[precision]
            ratio = (
                f"{result['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if "tokens_per_s" in peer else "n/a"
            )
            print(
                f"| {size} | {attention} | {precision} | {'on' if checkpointing else 'off'} | "
                f"{result['seconds_per_step']:.3f} | {result['samples_per_s']:.2f} | {result['tokens_per_s']:.0f} | "
                f"{result['peak_mb']:.0f} | {ratio} |"
            )
        for precision, peer in peers.items():
            if "tokens_per_s" in peer:
                print(
                    f"| {size} | MONAI ViT (peer) | {precision} | off | {peer['seconds_per_step']:.3f} | "
                    f"{peer['samples_per_s']:.2f} | {peer['tokens_per_s']:.0f} | {peer['peak_mb']:.0f} | 1.00x |"
                )


if __name__ == "__main__":
    main()
