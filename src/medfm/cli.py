"""The ``medfm`` command line: ``inspect``, ``preprocess``, ``presets``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import MedfmError

__all__ = ["convert_main", "main", "parse_config_overrides"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .io import load_volume

    volume = load_volume(args.file, allow_multichannel=args.multichannel, series_uid=args.series_uid)
    info = volume.describe()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .io import load_volume, write_nifti
    from .processing import MedicalImageProcessor

    if args.config:
        processor = MedicalImageProcessor.from_pretrained(args.config)
    else:
        processor = MedicalImageProcessor.from_preset(args.preset)
    volume = load_volume(args.file, allow_multichannel=args.multichannel, series_uid=args.series_uid)
    inputs = processor(volume)
    processed = inputs.grids[0].processed_volume(inputs["pixel_values"][0])
    # The processed grid is not the input's: it is written in canonical orientation with its own affine.
    out = write_nifti(processed, args.out, protect=[args.file])
    print(
        f"wrote {out}: shape (C, D, H, W) {tuple(processed.array.shape)}, "
        f"spacing (z, y, x) {tuple(round(s, 4) for s in processed.spacing)} mm"
    )
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .processing import list_presets

    for preset in list_presets():
        print(f"{preset.name:<26} {preset.description}")
        if args.verbose:
            print(f"{'':<26} source: {preset.source}")
            for step in preset.steps:
                print(f"{'':<28} {json.dumps(step)}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from transformers import pipeline

    import medfm  # noqa: F401  (registers the models and pipelines)

    segmenter = pipeline("medical-segmentation", model=args.model, device=args.device)
    options = {"save_to": args.out, "overlap": args.overlap, "bfloat16": args.bf16}
    if args.roi_size:
        options["roi_size"] = args.roi_size
    if args.overlay:
        options["overlay_to"] = args.overlay
    result = segmenter(args.file, **options)
    print(f"wrote {result['saved_to']}" + (f" and {result['overlay']}" if args.overlay else ""))
    for label, stats in result["labels"].items():
        print(
            f"  {label:>3}  {stats['name']:<24} {stats['voxels']:>10} voxels  {stats['volume_ml']:>10.2f} ml"
        )
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from transformers import pipeline

    import medfm  # noqa: F401

    classifier = pipeline("medical-image-classification", model=args.model, device=args.device)
    for row in classifier(args.file, top_k=args.top_k):
        print(f"{row['score']:.4f}  {row['label']}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models.registry import family_named

    family = family_named(args.family)
    own = {option.name for option in family.converter_options}
    options = {}
    for name in _converter_option_names():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in own:
            raise ValueError(f"--{name.replace('_', '-')} is not an option of the {family.name} converter")
        options[name] = value
    out = family.load_converter()(
        args.checkpoint,
        args.output,
        config_overrides=parse_config_overrides(args.config),
        trust_checkpoint=args.trust_checkpoint,
        **options,
    )
    print(f"wrote {out}")
    return 0


def parse_config_overrides(text: str) -> dict:
    """A ``--config`` value: a JSON object, or the path of a ``.json`` file holding one.

    Raises:
        ValueError: Not JSON, or not an object (the message names the option or file).
        OSError: A ``.json`` file that cannot be read.
    """
    from pathlib import Path

    source = "--config"
    if text.endswith(".json"):
        source, text = text, Path(text).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object of config fields; got {type(value).__name__}")
    return value


def convert_main(family: str, argv: Sequence[str] | None = None) -> int:
    """``medfm convert FAMILY ...`` as a stand-alone script (``conversion/convert_<family>_original_to_hf.py``):
    the same options and errors, under the script's own name."""
    import os

    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or "convert",
        description=f"Convert an original {family} checkpoint to a medfm model folder (as `medfm convert {family}`).",
    )
    _add_convert_arguments(parser, only=family)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.family, args.command, args.prog = family, "convert", parser.prog
    return _run(args)


def _converter_option_names() -> list[str]:
    from .models.registry import families

    return list(dict.fromkeys(o.name for f in families() for o in f.converter_options))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def _families_line() -> str:
    from .models.registry import families

    return "Families: " + "; ".join(f"{f.name}: {f.title}" for f in families() if f.converter is not None)


def _add_convert_arguments(parser: argparse.ArgumentParser, only: str | None = None) -> None:
    """The ``convert`` options: the family (unless the script is one family's), its checkpoint and output, and
    each family's own options."""
    from .models.registry import families

    convertible = [f for f in families() if f.converter is not None and (only is None or f.name == only)]
    if only is None:
        parser.add_argument("family", choices=[f.name for f in convertible], help="model family")
    parser.add_argument("--checkpoint", required=True, help="original checkpoint (.ckpt, .pth, .safetensors)")
    for family in convertible:
        for option in family.converter_options:
            parser.add_argument(f"--{option.name.replace('_', '-')}", help=f"{family.name}: {option.help}")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--config", default="{}", help="JSON object (or .json file) of config fields shapes cannot tell"
    )
    parser.add_argument("--trust-checkpoint", action="store_true", help="full unpickling for a trusted file")
    parser.set_defaults(func=_cmd_convert)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="medfm", description="Medical-imaging foundation models for transformers."
    )
    parser.add_argument("--version", action="version", version=f"medfm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_reader_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("file", help="NIfTI file, DICOM file, or folder of DICOM slices")
        command.add_argument(
            "--multichannel", action="store_true", help="read a 4D NIfTI's 4th axis as channels"
        )
        command.add_argument(
            "--series-uid", help="SeriesInstanceUID to read from a folder with several series"
        )

    inspect = commands.add_parser(
        "inspect", help="print geometry, spacing, orientation and intensity statistics"
    )
    add_reader_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_inspect)

    preprocess = commands.add_parser("preprocess", help="run a preset (or a saved processor) and write NIfTI")
    add_reader_options(preprocess)
    source = preprocess.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="preset name (see `medfm presets`)")
    source.add_argument("--config", help="folder or preprocessor_config.json of a saved processor")
    preprocess.add_argument("--out", required=True, help="output .nii or .nii.gz")
    preprocess.set_defaults(func=_cmd_preprocess)

    presets = commands.add_parser("presets", help="list preprocessing presets")
    presets.add_argument("-v", "--verbose", action="store_true", help="show each preset's steps")
    presets.set_defaults(func=_cmd_presets)

    segment = commands.add_parser(
        "segment", help="segment a volume with a medfm model, write NIfTI (and a PNG)"
    )
    segment.add_argument("file", help="NIfTI file, DICOM file, or folder of DICOM slices")
    segment.add_argument("--model", required=True, help="model folder or Hub id (with its processor)")
    segment.add_argument("--out", required=True, help="output .nii or .nii.gz (on the input's grid)")
    segment.add_argument("--overlay", help="also write a PNG of three orthogonal slices")
    segment.add_argument("--roi-size", type=int, nargs=3, metavar=("D", "H", "W"), help="sliding window")
    segment.add_argument("--overlap", type=float, default=0.5, help="window overlap (default 0.5)")
    segment.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    segment.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    segment.set_defaults(func=_cmd_segment)

    classify = commands.add_parser("classify", help="classify a 2D image or 3D volume with a medfm model")
    classify.add_argument("file", help="NIfTI file, DICOM file, or folder of DICOM slices")
    classify.add_argument("--model", required=True, help="model folder or Hub id (with its processor)")
    classify.add_argument("--top-k", type=int, default=5, help="labels to print")
    classify.add_argument("--device", default=None, help="e.g. cpu, cuda")
    classify.set_defaults(func=_cmd_classify)

    convert = commands.add_parser(
        "convert", help="convert an original checkpoint to a medfm model folder", description=_families_line()
    )
    _add_convert_arguments(convert)
    convert.set_defaults(func=_cmd_convert)

    demo = commands.add_parser(
        "demo", help="fine-tune and run a SPAD-ViT on the MNI152 template nilearn ships"
    )
    demo.add_argument("--out", default="demo_outputs", help="output folder")
    demo.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medfm`` console script; returns the exit status."""
    return _run(_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (MedfmError, ValueError, OSError) as error:
        print(f"{getattr(args, 'prog', None) or 'medfm ' + args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
