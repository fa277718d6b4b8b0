"""Named preprocessing recipes, one per task in the model families' specs.

Spacings are ``(z, y, x)`` mm in medfm's canonical orientation (MONAI's ``pixdim`` lists ``(x, y, z)``,
so a spec's "1.5, 1.5, 2.0" is ``[2.0, 1.5, 1.5]`` here). Where an upstream recipe cannot be matched
exactly, the preset's description says how it differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ProcessorConfigError

__all__ = ["PRESETS", "Preset", "get_preset", "list_presets"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]


@dataclass(frozen=True)
class Preset:
    """A named list of step specs with a description and the spec section it comes from."""

    name: str
    description: str
    source: str
    steps: tuple[dict[str, Any], ...]


def _resample(z: float, y: float, x: float) -> dict[str, Any]:
    return {"name": "resample", "spacing": [z, y, x], "mode": "linear"}


def _window(low: float, high: float) -> dict[str, Any]:
    return {"name": "window", "low": low, "high": high, "out_min": 0.0, "out_max": 1.0}


def _pad(*multiple: int, value: float | str = 0.0) -> dict[str, Any]:
    return {"name": "pad_to_multiple", "multiple": list(multiple), "mode": "constant", "value": value}


def _resize_2d(size: int, mode: str) -> dict[str, Any]:
    return {"name": "resize", "size": [None, size, size], "mode": mode}


_RGB = {"name": "repeat_channels", "num_channels": 3}
#: Padding a spacing-adaptive (SPAD) model needs: 16 in-plane, ``16 >> aniso_d`` in depth, the background value.
_SPAD_PATCH_PAD = {"name": "pad_to_multiple", "multiple": 16, "anisotropy_stride": 16, "value": "min"}
_TWO_X_MINUS_ONE = {"name": "scale_shift", "scale": 2.0, "shift": -1.0}
_DIV_255 = {"name": "scale_shift", "scale": 1.0 / 255.0, "shift": 0.0}
_PERCENTILE_01 = {"name": "percentile_clip", "lower": 0.5, "upper": 99.5, "above_min": True, "rescale": True}


def _mim_ct(spacing: tuple[float, float, float], low: float, high: float) -> tuple[dict[str, Any], ...]:
    return (_resample(*spacing), _window(low, high), _pad(16, 16, 16))


_PRESET_LIST = [
    # --- generic -------------------------------------------------------------------------------------
    Preset(
        "ct",
        "CT, wide window [-1000, 1000] HU to [0, 1], padded to 16.",
        "generic",
        (_window(-1000, 1000), _pad(16, 16, 16)),
    ),
    Preset(
        "mr",
        "MR, per-channel 0.5-99.5 percentile clip to [0, 1], padded to 16.",
        "generic",
        (_PERCENTILE_01, _pad(16, 16, 16)),
    ),
    # --- SPAD / PUMIT (specs/spad.md §d) -----------------------------------------------------------
    Preset(
        "spad-pretrain",
        "SPAD-ViT pre-trained model input: percentile clip to [0,1], grey to RGB, ImageNet mean/std, padded "
        "with the background to the patch at the grid's anisotropy (16 in-plane, 16 >> aniso_d in depth).",
        "spad.md §d (offline step 5, online); the padding is medfm's, so any volume runs",
        (
            _PERCENTILE_01,
            _RGB,
            {"name": "normalize", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            _SPAD_PATCH_PAD,
        ),
    ),
    Preset(
        "spad-vt",
        "SPAD-VT tokenizer input: percentile clip to [0,1], grey to RGB, then 2x-1, padded with the background "
        "to the tokenizer's stride at the grid's anisotropy.",
        "spad.md §d (online); the padding is medfm's, so any volume runs",
        (_PERCENTILE_01, _RGB, _TWO_X_MINUS_ONE, _SPAD_PATCH_PAD),
    ),
    Preset(
        "spad-btcv",
        "BTCV CT: resample to (3, 0.75, 0.75) mm, window [-175, 250] to [0,1], pad to the "
        "(4, 16, 16) patch, then 2x-1.",
        "spad.md §d downstream table",
        (_resample(3.0, 0.75, 0.75), _window(-175, 250), _pad(4, 16, 16), _TWO_X_MINUS_ONE),
    ),
    Preset(
        "spad-chaos",
        "CHAOS MRI (2 channels, T1 in/opposed phase): resample to (9, 1.62109, 1.62109) mm, "
        "per-channel p0.5-p99.5 to [0,1], z-score with statistics of the voxels > 0, pad to (4, 16, 16) "
        "with each channel's minimum.",
        "spad.md §d downstream table",
        (
            _resample(9.0, 1.62109, 1.62109),
            {"name": "percentile_clip", "lower": 0.5, "upper": 99.5, "above_min": False, "rescale": True},
            {"name": "zscore", "nonzero": True},
            _pad(4, 16, 16, value="min"),
        ),
    ),
    Preset(
        "spad-medmnist-3d",
        "MedMNIST v2 3D (values in [0,1]): trilinear resize to 160^3, grey to RGB.",
        "spad.md §d downstream table",
        ({"name": "resize", "size": [160, 160, 160], "mode": "linear"}, _RGB),
    ),
    Preset(
        "spad-medmnist-2d",
        "MedMNIST v2 2D (values in [0,1]): bicubic resize to 160^2, grey to RGB.",
        "spad.md §d downstream table",
        (_resize_2d(160, "bicubic"), _RGB),
    ),
    # --- MiM (specs/mim.md §3) ---------------------------------------------------------------------
    Preset(
        "mim-pretrain",
        "MiM pre-training: window [-1000, 1000] to [0,1] at native spacing, pad to 16.",
        "mim.md §3.1",
        (_window(-1000, 1000), _pad(16, 16, 16)),
    ),
    Preset(
        "mim-btcv",
        "BTCV: (2.0, 1.5, 1.5) mm, window [-175, 250].",
        "mim.md §3.2",
        _mim_ct((2.0, 1.5, 1.5), -175, 250),
    ),
    Preset(
        "mim-amos",
        "AMOS22: (2.0, 1.5, 1.5) mm, window [-175, 250].",
        "mim.md §3.2",
        _mim_ct((2.0, 1.5, 1.5), -175, 250),
    ),
    Preset(
        "mim-flare22",
        "FLARE22: (2.0, 1.5, 1.5) mm, window [-175, 250].",
        "mim.md §3.2",
        _mim_ct((2.0, 1.5, 1.5), -175, 250),
    ),
    Preset(
        "mim-mmwhs",
        "MM-WHS CT: 1.5 mm isotropic, window [0, 1700].",
        "mim.md §3.2",
        _mim_ct((1.5, 1.5, 1.5), 0, 1700),
    ),
    Preset(
        "mim-spleen",
        "MSD Spleen: 1.0 mm isotropic, window [-57, 175].",
        "mim.md §3.2",
        _mim_ct((1.0, 1.0, 1.0), -57, 175),
    ),
    Preset(
        "mim-liver",
        "MSD Liver: 1.0 mm isotropic, window [-21, 189].",
        "mim.md §3.2",
        _mim_ct((1.0, 1.0, 1.0), -21, 189),
    ),
    Preset(
        "mim-lung",
        "MSD Lung: 1.0 mm isotropic, window [-1000, 1000].",
        "mim.md §3.2",
        _mim_ct((1.0, 1.0, 1.0), -1000, 1000),
    ),
    Preset(
        "mim-pancreas",
        "MSD Pancreas: 1.5 mm isotropic, window [-87, 199].",
        "mim.md §3.2",
        _mim_ct((1.5, 1.5, 1.5), -87, 199),
    ),
    Preset(
        "mim-hepatic-vessel",
        "MSD Hepatic vessel: 1.5 mm isotropic, window [0, 230].",
        "mim.md §3.2",
        _mim_ct((1.5, 1.5, 1.5), 0, 230),
    ),
    Preset(
        "mim-colon",
        "MSD Colon: 1.5 mm isotropic, window [-57, 175].",
        "mim.md §3.2",
        _mim_ct((1.5, 1.5, 1.5), -57, 175),
    ),
    Preset(
        "mim-covid19-20",
        "Covid-19-20: (5.0, 1.25, 1.25) mm, window [-1000, 500].",
        "mim.md §3.2",
        _mim_ct((5.0, 1.25, 1.25), -1000, 500),
    ),
    Preset(
        "mim-brats",
        "BraTS21 MRI (4 channels): 1.0 mm isotropic, per-channel z-score over voxels > 0.",
        "mim.md §3.2",
        (_resample(1.0, 1.0, 1.0), {"name": "zscore", "nonzero": True}, _pad(16, 16, 16, value="min")),
    ),
    Preset(
        "mim-cc-ccii",
        "CC-CCII CT classification: per-image min-max to [0,1], resize to (32, 384, 384).",
        "mim.md §3.2",
        ({"name": "minmax"}, {"name": "resize", "size": [32, 384, 384], "mode": "linear"}),
    ),
    # --- UniMiSS (specs/unimiss.md §c) -------------------------------------------------------------
    Preset(
        "unimiss-pretrain-3d",
        "UniMiSS 3D pre-training: raw HU / 1024, no clipping.",
        "unimiss.md §c",
        ({"name": "scale_shift", "scale": 1.0 / 1024.0, "shift": 0.0},),
    ),
    Preset(
        "unimiss-pretrain-2d",
        "UniMiSS 2D pre-training: 8-bit grey to RGB, /255 (no mean/std).",
        "unimiss.md §c",
        (_RGB, _DIV_255),
    ),
    Preset(
        "unimiss-ricord",
        "RICORD: clip HU to [-1024, 325], (x - 158.58) / 324.70, resize to (64, 128, 128). "
        "Upstream resizes with skimage cubic; this uses trilinear.",
        "unimiss.md §c",
        (
            {"name": "clip", "low": -1024.0, "high": 325.0},
            {"name": "normalize", "mean": 158.58, "std": 324.70},
            {"name": "resize", "size": [64, 128, 128], "mode": "linear"},
        ),
    ),
    Preset(
        "unimiss-bcv",
        "BCV (nnU-Net style): CT percentile clip 0.5-99.5 then z-score. nnU-Net takes the "
        "clip bounds and statistics over the whole training set's foreground; this takes them per image.",
        "unimiss.md §c",
        (
            {"name": "percentile_clip", "lower": 0.5, "upper": 99.5, "above_min": False, "rescale": False},
            {"name": "zscore"},
        ),
    ),
    # --- LVM-Med (specs/lvm_med.md §c) -------------------------------------------------------------
    Preset(
        "lvm-med-classification",
        "LVM-Med classification (R50, ViT): 8-bit image, bilinear resize to 224, /255, ImageNet mean/std.",
        "lvm_med.md §c",
        (
            _resize_2d(224, "bilinear"),
            _RGB,
            _DIV_255,
            {"name": "normalize", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        ),
    ),
    Preset(
        "lvm-med-sam-segmentation",
        "LVM-Med ViT + SAM decoder: nearest resize to 1024, per-image min-max to "
        "0-255 truncated as uint8, SAM mean/std. Upstream reads BGR; for grey images the channels are equal.",
        "lvm_med.md §c",
        (
            _resize_2d(1024, "nearest"),
            {"name": "minmax", "out_max": 255.0, "eps": 0.01, "floor": True},
            _RGB,
            {"name": "normalize", "mean": SAM_MEAN, "std": SAM_STD},
        ),
    ),
    Preset(
        "lvm-med-r50-segmentation",
        "LVM-Med R50 U-Net: nearest resize to 224, per-image min-max to 0-255 "
        "truncated as uint8, raw 0-255 floats (no mean/std).",
        "lvm_med.md §c",
        (_resize_2d(224, "nearest"), {"name": "minmax", "out_max": 255.0, "eps": 0.01, "floor": True}, _RGB),
    ),
    # --- VIS-MAE (specs/vis_mae.md §4) -------------------------------------------------------------
    Preset(
        "vis-mae-pretrain",
        "VIS-MAE pre-training / features: bilinear 224, /255, (x - 0.223) / 0.202.",
        "vis_mae.md §4",
        (_resize_2d(224, "bilinear"), _RGB, _DIV_255, {"name": "normalize", "mean": 0.223, "std": 0.202}),
    ),
    Preset(
        "vis-mae-segmentation",
        "VIS-MAE segmentation: bilinear 320, per-image min-max "
        "(x - min + 1e-6) / (max - min + 1e-6), no mean/std.",
        "vis_mae.md §4",
        (_resize_2d(320, "bilinear"), _RGB, {"name": "minmax", "offset": 1e-6, "eps": 1e-6}),
    ),
    Preset(
        "vis-mae-classification",
        "VIS-MAE classification: bilinear 224, /255, no mean/std.",
        "vis_mae.md §4",
        (_resize_2d(224, "bilinear"), _RGB, _DIV_255),
    ),
]

#: All presets by name.
PRESETS: dict[str, Preset] = {preset.name: preset for preset in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    """Look up a preset by name.

    Raises:
        ProcessorConfigError: Unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ProcessorConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def list_presets() -> list[Preset]:
    return list(PRESETS.values())
