#!/usr/bin/env python
"""One CT volume through ``medfm segment``, end to end, against MONAI's SwinUNETR through MONAI's own loading,
sliding window, inversion and saving, in the same script.

    python benchmarks/end_to_end.py --device cuda                                    # 300x512x512, base
    python benchmarks/end_to_end.py --shape 150 256 256 --sizes tiny base --device cpu   # what the CPU table is

The volume is synthetic: an int16 CT (``--shape`` D H W voxels at ``--spacing`` z y x mm, 300x512x512 at
1.5x0.7x0.7 by default) of air, a body ellipse of soft tissue with organ-like blobs and bone, and noise, written
once as ``.nii.gz``. Both systems read that file, resample it to BTCV's grid (3 x 0.75 x 0.75 mm, the
``spad-btcv`` preset; ``Spacingd`` for MONAI), window it, run blended Gaussian sliding windows at overlap 0.5,
map the 14-class prediction back onto the input grid and write it as ``.nii.gz``:

- ``medfm``: the ``medfm segment`` command (``medfm.cli.main``) with a SPAD-ViT segmentation model of random
  weights saved with its processor (``--sizes``: ``tiny`` = hidden 48, 3 blocks; ``base`` = hidden 768,
  12 blocks; both with the default decoder), windows of 48x192x192 (upstream's crop).
- ``swinunetr`` (the peer): MONAI's ``SwinUNETR`` (feature size 48, its published BTCV size) on 96^3 windows
  through ``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``,
  ``sliding_window_inference``, ``AsDiscreted(argmax)``, ``Invertd(nearest_interp=True)`` and ``SaveImaged``.

Each setting (system x size x precision) runs in a fresh subprocess. Wall time is split into model loading,
read, preprocess, model (the sliding window), post-process and write, by wrapping the functions that do each
part. Also recorded: user and system CPU seconds of the process (``getrusage``), peak memory (``ru_maxrss`` on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA), the model's FLOPs (``torch.utils.flop_counter`` on one
window, times the windows) and, measured in the same process, the machine's matmul peak at the setting's
precision (the best of a few square GEMMs), so the model's share of that peak is a same-run figure. Nothing is
asserted; the numbers depend on the machine and are recorded with it in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: SPAD-ViT sizes: (hidden, blocks, heads, MLP width).
SIZES = {"tiny": (48, 3, 3, 128), "base": (768, 12, 12, 2048)}
#: BTCV: background and 13 organs.
NUM_LABELS = 14
MEDFM_ROI = (48, 192, 192)
PEER_ROI = (96, 96, 96)
BTCV_SPACING_ZYX = (3.0, 0.75, 0.75)
PHASES = ("load", "read", "preprocess", "model", "postprocess", "write")


def make_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    """A synthetic int16 CT ``(D, H, W)`` at ``spacing`` (z, y, x) mm, saved as NIfTI (x, y, z on disk)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    depth, height, width = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, depth), np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij"
    )
    ct = np.full(shape, -1000.0, dtype=np.float32)
    body = (y / 0.75) ** 2 + (x / 0.9) ** 2 < 1
    ct[body] = 40.0
    for cz, cy, cx, r, hu in (
        (0.2, 0.1, 0.3, 0.25, 60.0),
        (-0.3, -0.1, -0.35, 0.2, 150.0),
        (0.0, 0.4, 0.0, 0.1, 700.0),
    ):
        ct[((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) < r**2] = hu
    ct += rng.normal(0, 20, size=shape).astype(np.float32)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.round(ct).astype(np.int16).transpose(2, 1, 0), affine), str(path))


def make_medfm_model(folder: Path, size: str) -> None:
    """A SPAD-ViT segmentation model of random weights with the ``spad-btcv`` processor."""
    import torch

    from medfm.models.spad import SpadViTConfig, SpadViTForSemanticSegmentation
    from medfm.processing import MedicalImageProcessor

    torch.manual_seed(0)
    hidden, blocks, heads, mlp = SIZES[size]
    config = SpadViTConfig(
        in_channels=1,
        patch_size=(4, 16, 16),
        adaptive_patch_embed=False,
        hidden_size=hidden,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        intermediate_size=mlp,
        num_labels=NUM_LABELS,
    )
    SpadViTForSemanticSegmentation(config).save_pretrained(folder)
    MedicalImageProcessor.from_preset("spad-btcv").save_pretrained(folder)


class Clock:
    """Seconds spent in each phase; :meth:`wrap` times a function (nested phases are subtracted from the
    outer one, so the phases add up to the wall time they cover)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._stack: list[list] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.seconds[name] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(torch, device: str, dtype) -> float:
    """Best GFLOP/s of a few square matrix products on ``device`` in ``dtype``."""
    n = 4096 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        _sync(torch, device)
        start = time.perf_counter()
        a @ b
        _sync(torch, device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def window_flops(torch, model, window, **inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(window, **inputs)
    return float(counter.get_total_flops())


def _measure_medfm(setting: dict, clock: Clock, torch) -> dict:
    import medfm.pipelines.base as pipeline_base
    import medfm.pipelines.medical_segmentation as segmentation
    from medfm import cli

    counted = {"windows": 0, "model": None}
    original_load = cli._load_pipeline

    def load(*args, **kwargs):
        with clock.phase("load"):
            pipe = original_load(*args, **kwargs)
        counted["model"] = pipe.model

        def count(module, args, kwargs):
            window = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
            counted["windows"] += window.shape[0]

        pipe.model.register_forward_pre_hook(count, with_kwargs=True)
        return pipe

    cli._load_pipeline = load
    clock.wrap(pipeline_base, "as_volume", "read")
    clock.wrap(pipeline_base.MedicalPipeline, "preprocess", "preprocess")
    clock.wrap(segmentation, "sliding_window_logits", "model")
    clock.wrap(segmentation.MedicalSegmentationPipeline, "postprocess", "postprocess")
    clock.wrap(segmentation, "write_nifti", "write")
    argv = ["segment", setting["volume"], "--model", setting["model"], "--out", setting["out"]]
    argv += ["--roi-size", *map(str, MEDFM_ROI), "--device", setting["device"]]
    argv += ["--bf16"] if setting["precision"] == "bf16" else []
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        status = cli.main(argv)
    if status != 0:
        raise RuntimeError(f"medfm segment exited with {status}")
    model = counted["model"]
    device = next(model.parameters()).device
    window = torch.zeros(1, 1, *MEDFM_ROI, device=device)
    spacing = torch.tensor([BTCV_SPACING_ZYX], device=device)
    return counted["windows"], lambda: window_flops(torch, model, window, spacing=spacing)


def _measure_swinunetr(setting: dict, clock: Clock, torch) -> dict:
    from monai.data import decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    device = torch.device(setting["device"])
    with clock.phase("load"):
        model = SwinUNETR(in_channels=1, out_channels=NUM_LABELS, feature_size=48).to(device).eval()
    preprocess = Compose(
        [
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=BTCV_SPACING_ZYX[::-1], mode="bilinear"),
            ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    loader = LoadImaged("image", image_only=False)
    post = Compose(
        [
            AsDiscreted("pred", argmax=True),
            Invertd("pred", transform=preprocess, orig_keys="image", nearest_interp=True),
        ]
    )
    out_dir = str(Path(setting["out"]).parent)
    saver = SaveImaged(
        "pred", output_dir=out_dir, output_postfix="seg", separate_folder=False, print_log=False
    )
    windows = {"count": 0}
    model.register_forward_pre_hook(
        lambda module, args: windows.__setitem__("count", windows["count"] + args[0].shape[0])
    )
    with clock.phase("read"):
        data = loader({"image": setting["volume"]})
    with clock.phase("preprocess"):
        data = preprocess(data)
    with clock.phase("model"):
        image = data["image"][None].to(device)
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting["precision"] == "bf16"),
        ):
            logits = sliding_window_inference(image, PEER_ROI, 1, model, overlap=0.5, mode="gaussian")
        data["pred"] = decollate_batch(logits.float().cpu())[0]
        _sync(torch, setting["device"])
    with clock.phase("postprocess"):
        data = post(data)
    with clock.phase("write"):
        saver(data)
    return windows["count"], lambda: window_flops(torch, model, torch.zeros(1, 1, *PEER_ROI, device=device))


def _measure(setting: dict) -> dict:
    """One setting, in this process."""
    import resource

    import torch

    import medfm  # noqa: F401

    torch.manual_seed(0)
    device = setting["device"]
    dtype = torch.bfloat16 if setting["precision"] == "bf16" else torch.float32
    peak = matmul_peak(torch, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    clock = Clock()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    measure = _measure_medfm if setting["system"] == "medfm" else _measure_swinunetr
    windows, count_flops = measure(setting, clock, torch)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = after.ru_maxrss / 1024
    return {
        "windows": windows,
        "flops": count_flops() * windows,  # after the timed job
        "phases": clock.seconds,
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "peak_mb": peak_mb,
        "matmul_peak_gflops": peak,
        "threads": torch.get_num_threads(),
    }


def _run(setting: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(setting)], capture_output=True, text=True
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 0.7, 0.7], metavar=("Z", "Y", "X"))
    parser.add_argument("--sizes", nargs="+", default=["base"], choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-peer", action="store_true", help="skip SwinUNETR")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(json.loads(args.measure))))
        return

    import monai
    import torch

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="medfm-e2e-"))
    volume = work / "ct.nii.gz"
    make_ct(volume, tuple(args.shape), tuple(args.spacing))
    settings = []
    for size in args.sizes:
        folder = work / f"spad-{size}"
        make_medfm_model(folder, size)
        settings += [("medfm", size, p, str(folder)) for p in args.precisions]
    if not args.no_peer:
        settings += [("swinunetr", "fs48", p, "") for p in args.precisions]
    results = []
    for system, size, precision, model in settings:
        setting = {
            "system": system,
            "size": size,
            "precision": precision,
            "model": model,
            "device": args.device,
            "volume": str(volume),
            "out": str(work / f"{system}-{size}-{precision}.nii.gz"),
        }
        results.append((setting, _run(setting)))
        print(f"done {system} {size} {precision}", file=sys.stderr)

    print(
        f"\n{platform.machine()}, torch {torch.__version__}, MONAI {monai.__version__}, device {args.device}, "
        f"volume {'x'.join(map(str, args.shape))} int16 at {'x'.join(map(str, args.spacing))} mm (z y x), "
        f"{time.perf_counter() - started:.0f} s in all\n"
    )
    header = [
        "system", "model", "precision", "windows", "wall s", *(f"{p} s" for p in PHASES), "non-model % (without load)",
        "model GFLOP/s", "% of matmul peak", "user s", "sys s", "sys/user", "peak MB", "wall vs peer",
    ]  # fmt: skip
    print(_row(header))
    print(_row(["---"] * len(header)))
    peers = {s["precision"]: r for s, r in results if s["system"] == "swinunetr" and "error" not in r}
    for setting, result in results:
        cells = [setting["system"], setting["size"], setting["precision"]]
        if "error" in result:
            print(_row([*cells, f"failed: {result['error']}"]))
            continue
        phases, wall = result["phases"], result["wall"]
        rate = result["flops"] / phases["model"] / 1e9
        peer = peers.get(setting["precision"])
        print(
            _row(
                [
                    *cells,
                    result["windows"],
                    f"{wall:.1f}",
                    *(f"{phases[p]:.2f}" for p in PHASES),
                    f"{100 * (wall - phases['model'] - phases['load']) / (wall - phases['load']):.1f}",
                    f"{rate:.0f}",
                    f"{100 * rate / result['matmul_peak_gflops']:.0f} (of {result['matmul_peak_gflops']:.0f})",
                    f"{result['user']:.1f}",
                    f"{result['sys']:.1f}",
                    f"{result['sys'] / max(result['user'], 1e-9):.2f}",
                    f"{result['peak_mb']:.0f}",
                    f"{peer['wall'] / wall:.2f}x faster" if peer and setting["system"] == "medfm" else "",
                ]
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps([{**s, **r} for s, r in results], indent=2))


if __name__ == "__main__":
    main()
