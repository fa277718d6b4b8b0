"""A pre-training run from the command line: data, objective by name, the shared loop, the final save.

``examples/pretrain_mim.py`` and ``examples/pretrain_tokenizer.py`` are thin wrappers around
:func:`pretraining_parser` and :func:`run_pretraining`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import PretrainingOptionError

__all__ = [
    "PretrainingOptionError",
    "check_pretraining_options",
    "pretraining_parser",
    "resolve_tokenizer",
    "run_pretraining",
]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every option's default, unless its help already says it."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Names such as spad-vit stay whole: wrap at spaces only.
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or (action.help and "default" in action.help):
            return action.help
        return super()._get_help_string(action)


class _PretrainingParser(argparse.ArgumentParser):
    """Checks the parsed options together (:func:`check_pretraining_options`) and reports a bad one as a usage
    error (exit status 2), in the options' own terms."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        try:
            check_pretraining_options(parsed)
        except PretrainingOptionError as error:
            self.error(str(error))
        return parsed


def pretraining_parser(description: str, *, objective: str) -> argparse.ArgumentParser:
    """The options of a pre-training run whose default objective is ``objective``.

    Crop, depth and learning-rate defaults come from the objective's
    :class:`~medfm.training.objectives.DataRecipe`; ``--tokenizer`` and ``--tokenizer-config`` exist only for
    objectives with a tokenizer (``tokenizer_model_type``). Parsing also checks the options together and
    reports a bad value as a usage error naming the option.
    """
    from .objectives import OBJECTIVES

    known = sorted(OBJECTIVES)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown pre-training objective {objective!r}; known: {known}")
    cls = OBJECTIVES[objective]
    parser = _PretrainingParser(description=description, formatter_class=_HelpFormatter)
    # A script trains tokenizers or models, not both: offer the objectives of the same kind as its default.
    choices = [name for name in known if OBJECTIVES[name].trains_tokenizer == cls.trains_tokenizer]
    recipes = {name: OBJECTIVES[name].data_recipe() for name in choices}

    def per_objective(attribute: str, fmt: str = "{}") -> str:
        return ", ".join(f"{fmt.format(getattr(r, attribute))} for {name}" for name, r in recipes.items())

    parser.add_argument(
        "--model",
        default=objective,
        choices=choices,
        help="pre-training objective",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="a folder of NIfTI files and DICOM series (searched recursively) or a dataset.json",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="run folder: checkpoints/, logs/ and, at the end, the trained model in model/",
    )
    parser.add_argument(
        "--pretrained",
        help="initial weights: a medfm model folder or Hub id (default: random initialisation)",
    )
    if cls.tokenizer_model_type is not None:
        parser.add_argument(
            "--tokenizer",
            help=(
                "the frozen tokenizer whose soft tokens are the MIM targets: the --output folder of a "
                "pretrain_tokenizer.py run, its model/ folder, or a converted model folder with a tokenizer/ "
                "subfolder (default: none; the targets then come from a random projection, fine for smoke "
                "tests only)"
            ),
        )
        parser.add_argument(
            "--tokenizer-config",
            default="{}",
            help="JSON object of config fields of the random-projection tokenizer used without --tokenizer",
        )
    parser.add_argument("--config", default="{}", help=cls.config_help)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps; the schedule spans them")
    parser.add_argument("--batch-size", type=int, default=2, help="volumes per batch, per process")
    parser.add_argument(
        "--accumulation-steps", type=int, default=1, help="batches accumulated into one optimizer step"
    )
    parser.add_argument(
        "--crop-size",
        type=int,
        help=(
            "crop edge in voxels (in-plane; every axis for objectives with cubic crops), a multiple of the "
            f"objective's stride ({per_objective('token_stride')}) (default: the objective's, "
            f"{per_objective('crop_size')})"
        ),
    )
    parser.add_argument(
        "--depth-tokens",
        type=int,
        help=(
            "tokens along depth in a 3D crop; unused by objectives with cubic crops "
            f"({', '.join(n for n, r in recipes.items() if r.cubic_crop) or 'none'}) (default: the objective's, "
            f"{per_objective('depth_tokens')})"
        ),
    )
    parser.add_argument(
        "--slice-probability",
        type=float,
        default=0.0,
        help="fraction of batches made of 2D slices, in [0, 1]",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate (default: the objective's, {per_objective('learning_rate', '{:g}')})",
    )
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=100,
        help="linear warm-up steps before the cosine decay; keep it below --steps",
    )
    parser.add_argument(
        "--grad-clip",
        type=float,
        help=(
            "max gradient norm; 0 turns clipping off (default: the objective's, "
            f"{per_objective('grad_clip', '{:g}')})"
        ),
    )
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="autocast precision"
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute the transformer blocks in the backward pass (less memory, more time)",
    )
    parser.add_argument(
        "--save-every", type=int, default=500, help="write a checkpoint every this many steps; 0: never"
    )
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--log-every", type=int, default=10, help="log metrics every this many steps")
    parser.add_argument(
        "--stop-after",
        type=int,
        help="stop after this step; the schedule still spans --steps (default: run all --steps)",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        "--resume-from-checkpoint",
        dest="resume",
        help="'latest' (the newest in OUTPUT/checkpoints) or a checkpoint folder (default: start afresh)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data stream, masks and initial weights"
    )
    parser.add_argument(
        "--losses-file",
        help="also write the losses (JSON) here; with N processes, one per rank (default: not written)",
    )
    parser.add_argument(
        "--weights-digest-dir",
        help="write each rank's final weight digest here, for DDP checks (default: not written)",
    )
    return parser


def _json_option(args: argparse.Namespace, name: str) -> dict[str, Any]:
    option = "--" + name.replace("_", "-")
    text = getattr(args, name, None)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PretrainingOptionError(
            f"{option} {text!r} is not valid JSON ({error.msg} at character {error.pos}); expected a JSON "
            f"object of config fields, e.g. {option} '{{\"hidden_size\": 384}}'"
        ) from None
    if not isinstance(value, dict):
        raise PretrainingOptionError(
            f"{option} {text!r} is a JSON {type(value).__name__}; expected a JSON object of config fields, "
            f"e.g. {option} '{{\"hidden_size\": 384}}'"
        )
    return value


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_tokenizer(value: str, model_type: str) -> str:
    """The folder (or Hub id) ``--tokenizer value`` names, for a tokenizer of ``model_type``.

    Accepted: the tokenizer folder itself, the ``--output`` folder of a tokenizer run (its ``model/``), a
    converted model folder or a MIM run's ``model/`` (its ``tokenizer/``), a MIM run folder
    (``model/tokenizer/``); a value that names no local path and looks like ``org/name`` is a Hub id.

    Raises:
        PretrainingOptionError: A local folder holding none of these (the message lists what was looked for).
    """
    path = Path(value).expanduser()
    candidates = ("", "model", "tokenizer", os.path.join("model", "tokenizer"))
    if path.is_dir():
        for sub in candidates:
            if _model_type(path / sub) == model_type:
                return str(path / sub)
        found = _model_type(path)
        held = f"it holds a {found!r} model, not a {model_type!r}; " if found else ""
        raise PretrainingOptionError(
            f"--tokenizer {value}: {held}expected a {model_type!r} tokenizer folder (config.json with "
            f"model_type {model_type!r}) here or in its model/, tokenizer/ or model/tokenizer/ subfolder: the "
            "--output folder of examples/pretrain_tokenizer.py, or a converted model folder"
        )
    first = Path(value).parts[0] if Path(value).parts else value
    hub_like = value.count("/") == 1 and not Path(first).exists() and not value.startswith((".", "/", "~"))
    if path.exists() or not hub_like:
        raise PretrainingOptionError(
            f"--tokenizer {value}: no such folder; expected the --output folder of "
            "examples/pretrain_tokenizer.py, its model/ folder, a converted model folder or a Hub id"
        )
    return value


def _check_pretrained(value: str) -> None:
    """Refuse a ``--pretrained`` that can only be a local path and is no model folder.

    Raises:
        PretrainingOptionError: No such folder, a file, or a folder without ``config.json``.
    """
    from ..hub import looks_like_local_path

    path = Path(value).expanduser()
    if path.is_file():
        raise PretrainingOptionError(
            f"--pretrained {value} is a file; expected a model folder (with config.json) or a Hub id"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            run_model = path / "model"
            hint = (
                f" (a run folder? its model is {run_model})" if (run_model / "config.json").is_file() else ""
            )
            raise PretrainingOptionError(
                f"--pretrained {value}: the folder holds no config.json{hint}; expected a model folder or a Hub id"
            )
        return
    if looks_like_local_path(value):
        raise PretrainingOptionError(
            f"--pretrained {value}: no such folder; expected a model folder (with config.json) or a Hub id"
        )


def check_pretraining_options(args: argparse.Namespace) -> dict[str, Any]:
    """Check the options of a run (as :func:`pretraining_parser` makes them) together, before any data is read.

    Returns:
        The values the run uses: ``config`` and ``tokenizer_config`` (dicts), ``tokenizer`` (resolved by
        :func:`resolve_tokenizer`, or ``None``), ``crop_size``, ``depth_tokens`` and ``learning_rate`` (the
        objective's defaults filled in).

    Raises:
        PretrainingOptionError: The first bad option, named, with what is allowed (``--pretrained`` naming no
            model folder included).
    """
    from .objectives import OBJECTIVES

    if args.model not in OBJECTIVES:
        raise PretrainingOptionError(
            f"--model {args.model!r} is not a pre-training objective; choose one of {sorted(OBJECTIVES)}"
        )
    cls = OBJECTIVES[args.model]
    recipe = cls.data_recipe()
    stride = recipe.token_stride
    crop_size = args.crop_size if args.crop_size is not None else recipe.crop_size
    if crop_size < stride or crop_size % stride:
        lower, upper = (
            max(stride, crop_size // stride * stride),
            max(stride, -(-crop_size // stride) * stride),
        )
        nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise PretrainingOptionError(
            f"--crop-size {crop_size} must be a positive multiple of {stride}, the total stride of "
            f"{args.model}'s model (e.g. {nearest})"
        )
    depth_tokens = args.depth_tokens if args.depth_tokens is not None else recipe.depth_tokens
    learning_rate = args.lr if args.lr is not None else recipe.learning_rate
    grad_clip = args.grad_clip if args.grad_clip is not None else recipe.grad_clip
    at_least = {
        "--steps": (args.steps, 1),
        "--batch-size": (args.batch_size, 1),
        "--accumulation-steps": (args.accumulation_steps, 1),
        "--depth-tokens": (depth_tokens, 1),
        "--warmup-steps": (args.warmup_steps, 0),
        "--save-every": (args.save_every, 0),
        "--keep-last": (args.keep_last, 1),
        "--log-every": (args.log_every, 1),
        "--num-workers": (args.num_workers, 0),
        "--weight-decay": (args.weight_decay, 0),
        "--grad-clip": (grad_clip, 0),
    }
    if args.stop_after is not None:
        at_least["--stop-after"] = (args.stop_after, 1)
    for option, (value, low) in at_least.items():
        if value < low:
            raise PretrainingOptionError(f"{option} {value} must be at least {low}")
    if not learning_rate > 0:
        raise PretrainingOptionError(f"--lr {learning_rate} must be positive")
    if not 0 <= args.slice_probability <= 1:
        raise PretrainingOptionError(f"--slice-probability {args.slice_probability} must be in [0, 1]")
    if recipe.three_d_only and args.slice_probability > 0:
        raise PretrainingOptionError(
            f"--slice-probability {args.slice_probability}: --model {args.model} trains on 3D crops only; use 0"
        )
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer is not None:
        if cls.tokenizer_model_type is None:
            raise PretrainingOptionError(f"--tokenizer does not apply to --model {args.model} (it has none)")
        tokenizer = resolve_tokenizer(tokenizer, cls.tokenizer_model_type)
    pretrained = getattr(args, "pretrained", None)
    if pretrained is not None:
        _check_pretrained(pretrained)
    return {
        "config": _json_option(args, "config"),
        "tokenizer_config": _json_option(args, "tokenizer_config"),
        "tokenizer": tokenizer,
        "crop_size": crop_size,
        "depth_tokens": depth_tokens,
        "learning_rate": learning_rate,
        "grad_clip": grad_clip,
    }


def run_pretraining(args: argparse.Namespace) -> list[float]:
    """Run a pre-training job described by :func:`pretraining_parser`'s options; return this rank's losses.

    Raises:
        PretrainingOptionError: A bad option (checked before any data is read or model built): those
            :func:`check_pretraining_options` refuses, then those the objective's ``check_options`` (if it has
            one) refuses, e.g. MiM's ``--config`` fields and ``--crop-size``.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed
    from torch.utils.data import DataLoader

    from ..data import (
        AnisotropyBatchSampler,
        PretrainingDataset,
        collate_samples,
        discover_volumes,
        probe_volumes,
    )
    from ..processing import MedicalImageProcessor
    from .loop import TrainingConfig, train
    from .objectives import OBJECTIVES, build_objective

    options = check_pretraining_options(args)
    cls = OBJECTIVES[args.model]
    check = getattr(cls, "check_options", None)  # the objective's own checks of --config and --crop-size
    if check is not None:  # before any data is read or process group made
        check(options["config"], options["crop_size"], pretrained=args.pretrained)
    # The process-wide state is made here, before the Accelerator: pass the CPU flag the launcher set, or a
    # CPU multi-process run would not form its process group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    recipe = cls.data_recipe()
    if cls.tokenizer_model_type is not None and options["tokenizer"] is None:
        warnings.warn(
            f"no --tokenizer given: the {args.model} targets come from a random projection (an untrained "
            f"{cls.tokenizer_model_type} tokenizer), fine for a smoke test but not for real pre-training; "
            "pass --tokenizer with the --output folder of examples/pretrain_tokenizer.py or a converted model",
            UserWarning,
            stacklevel=2,
        )
    if args.warmup_steps >= args.steps:
        warnings.warn(
            f"--warmup-steps {args.warmup_steps} >= --steps {args.steps}: the learning rate never reaches its "
            "peak and never decays; use fewer warm-up steps than --steps",
            UserWarning,
            stacklevel=2,
        )
    # Data first: an empty or unreadable source fails before any model is built.
    infos = probe_volumes(discover_volumes(args.data))
    data_processor = MedicalImageProcessor(steps=[dict(step) for step in recipe.steps])
    dataset = PretrainingDataset(infos, data_processor, patch=recipe.token_stride, flips=recipe.random_flips)
    sampler = AnisotropyBatchSampler(
        infos,
        args.batch_size,
        crop_size=options["crop_size"],
        depth_tokens=options["depth_tokens"],
        patch=recipe.token_stride,
        slice_probability=args.slice_probability,
        seed=args.seed,
        rank=state.process_index,
        world_size=state.num_processes,
        cubic=recipe.cubic_crop,
    )
    state.print(
        f"{len(infos)} volumes in anisotropy groups "
        + json.dumps({k: len(v) for k, v in sampler.groups.items()})
    )

    set_seed(args.seed)
    objective = build_objective(
        args.model,
        model=args.pretrained,
        tokenizer=options["tokenizer"],
        config=options["config"],
        tokenizer_config=options["tokenizer_config"],
        crop=sampler.crop_for(0),
        steps=args.steps,
    )
    if args.activation_checkpointing:
        objective.enable_activation_checkpointing()

    def batches():
        # Its own generator: a loader otherwise draws a seed from the global RNG, which would shift the random
        # masks of a resumed run by one draw.
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=args.num_workers,
            collate_fn=collate_samples,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=args.num_workers > 0,
            generator=torch.Generator().manual_seed(args.seed + state.process_index),
        )
        return iter(loader)

    config = TrainingConfig(
        steps=args.steps,
        learning_rate=options["learning_rate"],
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=options["grad_clip"] or None,  # 0: no clipping
        accumulation_steps=args.accumulation_steps,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        output_dir=args.output,
        save_every=args.save_every,
        keep_last=args.keep_last,
        log_every=args.log_every,
        resume_from=args.resume,
        stop_after=args.stop_after,
        micro_batch_size=args.batch_size,
    )
    history = train(
        objective,
        batches,
        config,
        description=f"pre-training {args.model}",
        data_position=lambda consumed: sampler.load_state_dict({"batches_drawn": consumed}),
        tokens_per_batch=objective.tokens_per_batch,
    )

    if args.losses_file:
        target = Path(args.losses_file)
        if state.num_processes > 1:
            target = target.with_name(f"{target.stem}.rank{state.process_index}{target.suffix}")
        target.write_text(json.dumps({"first_step": history.first_step, "losses": history.losses}))
    if args.weights_digest_dir:
        digest = hashlib.sha256()
        for name, tensor in sorted(objective.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        folder = Path(args.weights_digest_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{state.process_index}.sha256").write_text(digest.hexdigest())
    if state.is_main_process:
        objective.save_pretrained(Path(args.output) / "model")
        state.print(f"saved {Path(args.output) / 'model'}")
    state.wait_for_everyone()
    return history.losses
