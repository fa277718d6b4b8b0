"""The ``medfm`` command line: ``inspect``, ``preprocess``, ``presets``, ``segment``, ``classify``, ``convert``,
``app``, ``demo``.

The error contract: every failure exits with status 2 and prints one line on stderr that names the input and
what to do, never a traceback (``medfm --debug ...`` prints the traceback). Errors of transformers and
huggingface_hub are caught here, at the boundary, and shortened to the line that names the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import (
    SELF_EXPLAINING_ERRORS,
    DeviceUnavailableError,
    MedfmError,
    ModelLoadError,
    ModelNotFoundError,
    one_line,
)
from .errors import first_line as _first_line

__all__ = ["check_device", "convert_main", "load_pipeline_quietly", "main", "parse_config_overrides"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .io import load_volume

    volume = load_volume(args.file, allow_multichannel=args.multichannel, series_uid=args.series_uid)
    if args.json:
        print(json.dumps(volume.to_dict(), indent=2))
        return 0
    info = volume.describe()
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .io import load_volume, write_nifti
    from .processing import MedicalImageProcessor

    if args.config:
        if not Path(args.config).expanduser().exists() and _looks_like_path(args.config):
            raise ModelNotFoundError(
                "no such folder or file; --config takes a saved processor's folder or its "
                "preprocessor_config.json (or use --preset)",
                args.config,
            )
        _refuse_adapter_without_processor(args.config)
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
    from .memory import reuse_freed_memory

    # A segmentation job allocates window-sized activations over and over: keep freed blocks for reuse (a
    # process-wide allocator setting, which is why the command sets it and the library does not).
    reuse_freed_memory()
    from .batch_segmentation import holds_dicom_slices

    if args.sw_batch_size < 1:
        raise ValueError(f"--sw-batch-size {args.sw_batch_size}: give at least 1 window per forward pass")
    source = Path(args.file)
    if source.is_dir() and not holds_dicom_slices(source):
        if not _names_nifti(args.out):
            return _segment_folder(args)
        _refuse_folder_of_cases_to_one_file(source, args.out)
    segmenter = _load_pipeline("medical-segmentation", args.model, args.device, args.file)
    options = {
        "save_to": args.out,
        "overlap": args.overlap,
        "bfloat16": args.bf16,
        "tta": args.tta,
        "sw_batch_size": args.sw_batch_size,
    }
    if args.roi_size:
        options["roi_size"] = args.roi_size
    if args.overlay:
        options["overlay_to"] = args.overlay
    if args.progress is not None:
        options["progress"] = args.progress
    result = segmenter(args.file, **options)
    print(f"wrote {result['saved_to']}" + (f" and {result['overlay']}" if args.overlay else ""))
    for label, stats in result["labels"].items():
        print(
            f"  {label:>3}  {stats['name']:<24} {stats['voxels']:>10} voxels  {stats['volume_ml']:>10.2f} ml"
        )
    return 0


def _names_nifti(path: str) -> bool:
    return path.lower().endswith((".nii", ".nii.gz"))


def _refuse_folder_of_cases_to_one_file(source: Path, out: str) -> None:
    """``medfm segment DIR --out x.nii.gz`` reads DIR as one DICOM series (its slices may lie in subfolders); a
    folder of cases (NIfTI files, or several series) cannot go to one file."""
    from .batch_segmentation import find_cases
    from .errors import OutputPathError

    cases = find_cases(source, exclude=out)
    if any(case.kind == "nifti" for case in cases) or len(cases) > 1:
        raise OutputPathError(
            f"names one NIfTI file, but {source} is a folder of cases ({len(cases)} found: NIfTI files or DICOM "
            "series); give --out an output folder (not ending in .nii or .nii.gz) to segment them all",
            out,
        )


def _segment_folder(args: argparse.Namespace) -> int:
    """``medfm segment IN_DIR --out OUT_DIR``: every NIfTI file and DICOM series under IN_DIR
    (:func:`medfm.batch_segmentation.segment_folder`)."""
    from .batch_segmentation import check_folders, find_cases, process_info, segment_folder

    if args.overlay:
        raise ValueError(
            "--overlay draws one volume; for a folder of inputs leave it out (the label maps and volumes.csv "
            "are written to --out)"
        )
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 (read in the main process) or more")
    cases = find_cases(args.file, exclude=args.out)
    check_folders(args.file, args.out, cases)  # before minutes of model loading
    processes = process_info()
    device = args.device
    if processes.device is not None and device in (None, "cuda"):
        device = processes.device  # each process of a launch on its own GPU
    segmenter = _load_pipeline("medical-segmentation", args.model, device, args.file)
    prog = getattr(args, "prog", None) or f"medfm {args.command}"
    if processes.is_main:
        series = sum(case.kind == "dicom" for case in cases)
        split = f", split across {processes.count} processes" if processes.count > 1 else ""
        print(
            f"{len(cases)} cases under {args.file} ({len(cases) - series} NIfTI, {series} DICOM series){split}"
        )

    def on_case(outcome) -> None:
        from tqdm.auto import tqdm

        if outcome.status == "failed":
            if getattr(args, "debug", False) and outcome.details:
                tqdm.write(outcome.details.rstrip(), file=sys.stderr)
            tqdm.write(f"{prog}: case {outcome.case.name} failed: {outcome.error}", file=sys.stderr)
        elif outcome.status == "skipped" and outcome.error:
            tqdm.write(f"{prog}: case {outcome.case.name} skipped: {outcome.error}", file=sys.stderr)
        elif outcome.status == "ok":
            tqdm.write(
                f"segmented {outcome.case.name} -> {outcome.output} ({outcome.seconds:.1f} s)",
                file=sys.stdout,
            )

    report = segment_folder(
        segmenter,
        args.file,
        args.out,
        overwrite=args.overwrite,
        workers=args.workers,
        tta=args.tta,
        sw_batch_size=args.sw_batch_size,
        roi_size=args.roi_size,
        overlap=args.overlap,
        bfloat16=args.bf16,
        progress=args.progress,
        processes=processes,
        cases=cases,
        on_case=on_case,
    )
    where = f"process {processes.index} of {processes.count}: " if processes.count > 1 else ""
    print(where + report.summary())
    if report.volumes_csv is not None:
        failed = f", {report.job_failed} failed" if report.job_failed else ""
        print(f"wrote {report.volumes_csv} ({report.total_cases} cases{failed})")
    return report.exit_status


def _cmd_classify(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: give at least 1")
    classifier = _load_pipeline("medical-image-classification", args.model, args.device, args.file)
    rows = [
        {"label": str(row["label"]), "score": float(row["score"])}
        for row in classifier(args.file, top_k=args.top_k)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['score']:.4f}  {row['label']}")
    return 0


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` that torch does not know or this machine does not have, before any loading.

    Args:
        device: ``None`` (the default device), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"N"`` (CUDA device N),
            ``"mps"``, or another torch device type.

    Raises:
        DeviceUnavailableError: The name is not a device, or the machine has no such device.
    """
    if device is None:
        return
    import torch

    name = f"cuda:{device}" if device.isdigit() else device
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceUnavailableError(
            f"--device {device}: not a device name; use cpu, cuda, cuda:N or mps (or leave --device out)"
        ) from None
    kind = parsed.type
    if kind == "cpu":
        return
    if kind == "mps":
        available, count = bool(torch.backends.mps.is_available()), 1
    else:
        backend = getattr(torch, kind, None)
        is_available = getattr(backend, "is_available", None)
        available = bool(is_available()) if callable(is_available) else False
        count = int(backend.device_count()) if available and hasattr(backend, "device_count") else 0
    if not available:
        raise DeviceUnavailableError(
            f"--device {device}: this machine has no {kind} device (torch {torch.__version__}); "
            "use --device cpu, or leave --device out"
        )
    if parsed.index is not None and parsed.index >= count:
        raise DeviceUnavailableError(
            f"--device {device}: this machine has {count} {kind} device{'s' if count != 1 else ''} "
            f"({kind}:0 to {kind}:{count - 1}); pick one of them"
        )


def _looks_like_path(name: str) -> bool:
    """:func:`medfm.hub.looks_like_local_path`, imported when first needed (it loads huggingface_hub)."""
    from .hub import looks_like_local_path

    return looks_like_local_path(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path.name} ({_first_line(error)})", path.parent) from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path.name} is not a JSON object", path.parent)
    return value


def _refuse_adapter_without_processor(folder: str) -> None:
    """``preprocess --config`` needs a processor: an adapter folder without one gets a message saying so."""
    path = Path(folder)
    if (
        path.is_dir()
        and (path / "adapter_config.json").is_file()
        and not (path / "preprocessor_config.json").is_file()
    ):
        raise ModelLoadError(
            "is a PEFT adapter folder with no preprocessor_config.json; pass its base model's folder "
            "(base_model_name_or_path in adapter_config.json) or a --preset",
            folder,
        )


def _adapter_base_model(folder: Path) -> str | None:
    """The base model a self-contained adapter folder (``medfm.peft.save_adapter``) names, if it is one."""
    try:
        from .models.modeling_utils import adapter_base_model
    except ImportError:  # a medfm without self-contained adapters
        return None
    return adapter_base_model(folder)


def _model_config(model: str, task: str) -> Any:
    """Resolve ``--model`` (a folder, an adapter folder or a Hub id), load its config and check its task.

    Raises:
        ModelNotFoundError: No such folder (and not a Hub id that resolves).
        ModelLoadError: The folder or Hub id holds no usable model or adapter.
        WrongTaskError: The model is of another task.
    """
    from transformers import AutoConfig

    from .hub import check_model_source
    from .tasks import check_task

    check_model_source(model)
    path = Path(model).expanduser()
    local = path.exists()
    if local and not path.is_dir():
        raise ModelLoadError(
            "is a file; --model takes the folder save_pretrained wrote (config.json, weights, "
            "preprocessor_config.json) or a Hub id",
            model,
        )
    architecture = None
    config_source = model
    if local and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        adapter = _read_json(path / "adapter_config.json")
        architecture = (adapter.get("auto_mapping") or {}).get("base_model_class")
        config_source = adapter.get("base_model_name_or_path")
        if not config_source:
            raise ModelLoadError(
                "is a PEFT adapter folder whose adapter_config.json names no base_model_name_or_path; "
                "merge the adapter (merge_and_unload) or save it with its base model",
                model,
            )
        base = Path(config_source).expanduser()
        if not base.is_dir() and _looks_like_path(config_source):
            raise ModelNotFoundError(
                f"is a PEFT adapter of base model {config_source}, which is not there; put the base model "
                "there, or set base_model_name_or_path in adapter_config.json to its folder or Hub id",
                model,
            )
    elif local and not (path / "config.json").is_file():
        raise ModelLoadError(
            "has no config.json; --model takes the folder save_pretrained wrote (or a PEFT adapter folder)",
            model,
        )
    elif local and not (path / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            "has no preprocessor_config.json; save the model's processor beside it "
            "(processor.save_pretrained(folder)), as the fine-tuning examples do",
            model,
        )
    base_model = _adapter_base_model(path) if local else None
    if base_model and not Path(base_model).expanduser().is_dir() and _looks_like_path(base_model):
        raise ModelNotFoundError(
            f"is an adapter of base model {base_model}, which is not there; put the base model back, or "
            "merge the adapter into a full model folder (merge_and_unload, save_pretrained)",
            model,
        )
    try:
        config = AutoConfig.from_pretrained(config_source)
    except Exception as error:  # transformers and huggingface_hub raise OSError, ValueError, HTTP errors...
        if config_source != model:
            raise ModelLoadError(f"its base model {config_source}: {_first_line(error)}", model) from error
        if not local:
            raise ModelNotFoundError(
                f"no such folder, and not loadable from the Hub or its cache ({_first_line(error)})", model
            ) from error
        raise ModelLoadError(_first_line(error), model) from error
    check_task(config, task, source=model, architecture=architecture)
    return config


def _load_pipeline(task: str, model: str, device: str | None, file: str) -> Any:
    """The task's pipeline for ``--model`` on ``--device``, after checking them and the input ``file``."""
    import medfm  # noqa: F401  (registers the models and pipelines)

    from .errors import VolumeNotFoundError

    if not Path(file).exists():  # before minutes of model loading
        raise VolumeNotFoundError("no such file or folder", file)
    check_device(device)
    _model_config(model, task)
    return load_pipeline_quietly(task, model, device)


def load_pipeline_quietly(task: str, model: str, device: str | None = None) -> Any:
    """``transformers.pipeline(task, model=model, device=device)`` without the weight-loading progress bar
    (noise on a command line or a server log), its errors shortened to a :class:`ModelLoadError`.

    Raises:
        MedfmError: As raised by the pipeline (a model of another task...).
        ModelLoadError: transformers or huggingface_hub could not load the model.
    """
    from transformers import pipeline
    from transformers.utils import logging as transformers_logging

    import medfm  # noqa: F401  (registers the models and pipelines)

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return pipeline(task, model=model, device=device)
    except MedfmError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot load the model: {_first_line(error)}", model) from error
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


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
    parser = _ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or "convert",
        description=f"Convert an original {family} checkpoint to a medfm model folder (as `medfm convert {family}`).",
    )
    _add_convert_arguments(parser, only=family)
    _add_debug(parser)
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


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a usage error is one line on stderr, status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_debug(parser: argparse.ArgumentParser, default: Any = False) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="on an error, print the full traceback"
    )


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _ArgumentParser(prog="medfm", description="Medical-imaging foundation models for transformers.")
    parser.add_argument("--version", action="version", version=f"medfm {__version__}")
    _add_debug(parser)
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
    segment.add_argument(
        "file",
        help="NIfTI file, DICOM file, folder of DICOM slices, or a folder of cases (NIfTI files and DICOM series "
        "folders, searched recursively)",
    )
    segment.add_argument("--model", required=True, help="model folder or Hub id (with its processor)")
    segment.add_argument(
        "--out",
        required=True,
        help="output .nii or .nii.gz (on the input's grid); for a folder of cases, an output folder (label maps "
        "under the inputs' relative paths, a record per case, volumes.csv)",
    )
    segment.add_argument("--overlay", help="also write a PNG of three orthogonal slices (one volume)")
    segment.add_argument("--roi-size", type=int, nargs=3, metavar=("D", "H", "W"), help="sliding window")
    segment.add_argument("--overlap", type=float, default=0.5, help="window overlap (default 0.5)")
    segment.add_argument(
        "--sw-batch-size", type=int, default=1, metavar="N", help="windows per forward pass (default 1)"
    )
    segment.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the logits over flips of every window axis (nnU-Net's "
        "mirroring; 8 forward passes per 3D window)",
    )
    segment.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    segment.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    segment.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="folder of cases: processes reading the next cases while the model runs (default min(2, CPUs); "
        "0: read in the main process)",
    )
    segment.add_argument(
        "--overwrite", action="store_true", help="folder of cases: redo the cases an earlier run finished"
    )
    segment.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal, not in CI or tests)",
    )
    segment.set_defaults(func=_cmd_segment)

    classify = commands.add_parser("classify", help="classify a 2D image or 3D volume with a medfm model")
    classify.add_argument("file", help="NIfTI file, DICOM file, or folder of DICOM slices")
    classify.add_argument("--model", required=True, help="model folder or Hub id (with its processor)")
    classify.add_argument("--top-k", type=int, default=5, help="labels to print (default 5)")
    classify.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    classify.add_argument("--json", action="store_true", help="print a JSON list of {label, score}")
    classify.set_defaults(func=_cmd_classify)

    convert = commands.add_parser(
        "convert", help="convert an original checkpoint to a medfm model folder", description=_families_line()
    )
    _add_convert_arguments(convert)
    convert.set_defaults(func=_cmd_convert)

    from .app.launcher import add_app_arguments  # no Gradio import until the command runs

    add_app_arguments(
        commands.add_parser("app", help="serve the web viewer in a browser (pip install 'medfm[app]')")
    )

    demo = commands.add_parser(
        "demo", help="fine-tune and run a SPAD-ViT on the MNI152 template nilearn ships"
    )
    demo.add_argument("--out", default="demo_outputs", help="output folder")
    demo.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    demo.set_defaults(func=_cmd_demo)
    # --debug is accepted after the command too (`medfm segment ... --debug`).
    for command in commands.choices.values():
        _add_debug(command, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medfm`` console script; returns the exit status."""
    return _run(_parser().parse_args(argv))


def _message(error: BaseException) -> str:
    line = one_line(error)
    if not isinstance(error, SELF_EXPLAINING_ERRORS):
        line = f"{line} (run with --debug for the traceback)"
    return line


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _run(args: argparse.Namespace) -> int:
    prog = getattr(args, "prog", None) or f"medfm {args.command}"
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`medfm presets -v | head -1`): nothing more to say, and nowhere to say it.
        _silence_stdout()
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            traceback.print_exc()
        else:
            print(f"{prog}: error: {_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
