"""Command-line options every fine-tuning script shares, and what they turn into."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .loop import TrainingConfig

__all__ = [
    "adapter_kind",
    "add_training_arguments",
    "load_for_task",
    "parameter_counts",
    "run_script",
    "save_fine_tuned",
    "save_trainable_parameters_only",
    "spellings",
    "training_config",
    "wrap_with_adapters",
]


def spellings(name: str) -> list[str]:
    """An option's spellings: ``--resume-from-checkpoint`` and ``--resume_from_checkpoint``."""
    dashed = "--" + name.lstrip("-").replace("_", "-")
    underscored = dashed[:2] + dashed[2:].replace("-", "_")
    return [dashed] if underscored == dashed else [dashed, underscored]


def add_training_arguments(parser: argparse.ArgumentParser, *, lr: float, batch_size: int) -> None:
    """Add the optimisation, validation, precision, adapter, resume and seed options (script-specific
    defaults). Every option also takes the underscore spelling (``--resume_from_checkpoint``)."""
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument(*spellings("batch-size"), type=int, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    parser.add_argument(*spellings("weight-decay"), type=float, default=0.05, help="default 0.05")
    parser.add_argument(*spellings("warmup-steps"), type=int, default=100, help="default 100")
    parser.add_argument(*spellings("eval-every"), type=int, default=500, help="validate every N steps (500)")
    parser.add_argument(
        *spellings("val-fraction"), type=float, default=0.2, help="fraction held out for validation (0.2)"
    )
    parser.add_argument(
        *spellings("mixed-precision"), choices=["no", "bf16", "fp16"], default="no", help="default no"
    )
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (and the new heads) only")
    parser.add_argument("--dora", action="store_true", help="weight-decomposed LoRA")
    parser.add_argument(*spellings("lora-rank"), type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --lora/--dora: save the merged full model (with its processor) instead of the adapter",
    )
    parser.add_argument(
        *spellings("resume-from-checkpoint"),
        dest="resume_from_checkpoint",
        metavar="latest|FOLDER",
        help="continue a run: 'latest' (the newest checkpoint under OUTPUT/checkpoints) or a checkpoint folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="default 0")


def training_config(args: argparse.Namespace, **overrides) -> TrainingConfig:
    """The loop's settings from the shared options (``overrides`` set the others, e.g. ``output_dir``)."""
    settings = dict(
        steps=args.steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        resume_from=getattr(args, "resume_from_checkpoint", None),
        micro_batch_size=args.batch_size,
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


def load_for_task(
    auto_class: type,
    model: str,
    num_channels: int | None = None,
    input_size: Sequence[int] | None = None,
    **overrides,
) -> nn.Module:
    """A model of ``model``'s family for a task, built through ``auto_class`` (e.g.
    ``AutoModelForSemanticSegmentation``) from a folder or Hub id.

    The family's ``task_defaults`` for that Auto class apply first (how upstream fine-tunes the task), then
    ``num_channels`` (set on the config field the model class names), then ``input_size`` (the training crop,
    set on the config field of models built for one input window, e.g. MiM's ``image_size``; ignored by the
    others), then ``overrides``. New head weights are initialised; weights whose shape changes (a new label
    count) are re-initialised; the family's load hooks adapt pre-trained tables to the new config.
    """
    from transformers import AutoConfig

    from ..hub import check_model_source
    from ..models.registry import family_of

    check_model_source(model)
    config = AutoConfig.from_pretrained(model)
    try:
        family = family_of(type(config))
    except KeyError as error:
        raise ValueError(f"{model}: {error.args[0]}") from None
    if type(config) not in auto_class._model_mapping:
        raise ValueError(
            f"{model}: a {config.model_type} model has no {auto_class.__name__} class (the {family.name} family "
            f"offers {sorted(a.__name__ for a in family.configs[type(config)])})"
        )
    settings = dict(family.task_defaults.get(auto_class, {}))
    model_class = auto_class._model_mapping[type(config)]
    if num_channels is not None:
        settings[model_class.channels_config_key] = int(num_channels)
    size_key = getattr(model_class, "input_size_config_key", None)
    if input_size is not None and size_key is not None:
        settings[size_key] = [int(n) for n in input_size]
    settings.update(overrides)
    return auto_class.from_pretrained(model, ignore_mismatched_sizes=True, **settings)


def wrap_with_adapters(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The model itself, or a PEFT model with the family's LoRA/DoRA preset when ``--lora``/``--dora``."""
    if not (args.lora or args.dora):
        return model
    from peft import get_peft_model

    from .. import peft as presets

    return get_peft_model(model, presets.lora_config(model, r=args.lora_rank, use_dora=args.dora))


def adapter_kind(args: argparse.Namespace) -> str:
    return "DoRA" if args.dora else "LoRA" if args.lora else "none"


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters) of ``model``."""
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return total, trainable


def _is_adapter_model(model: nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def save_trainable_parameters_only(accelerator: Any) -> None:
    """Make ``accelerator.save_state`` checkpoints of an adapter model hold its trainable parameters only
    (adapters and new heads; the frozen base weights come from the base model) and ``load_state`` restore them.

    Full models are saved whole as before. Call once, before training.
    """
    from safetensors.torch import load_file

    def trainable_names(model: nn.Module) -> set[str]:
        return {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    def on_save(models: list, weights: list, output_dir: str) -> None:
        for model, state in zip(models, weights):
            model = accelerator.unwrap_model(model)
            if _is_adapter_model(model):
                keep = trainable_names(model)
                for key in [k for k in state if k not in keep]:
                    del state[key]

    def on_load(models: list, input_dir: str) -> None:
        for index, model in enumerate(list(models)):
            unwrapped = accelerator.unwrap_model(model)
            if not _is_adapter_model(unwrapped):
                continue
            name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
            state = load_file(os.path.join(input_dir, name))
            missing = trainable_names(unwrapped) - set(state)
            unexpected = set(state) - {n for n, _ in unwrapped.named_parameters()}
            if missing or unexpected:
                raise ValueError(
                    f"{input_dir}: the checkpoint does not match the adapter model (missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}): resume with the same --lora/--dora options"
                )
            unwrapped.load_state_dict(state, strict=False)
            models.remove(model)  # loaded here; Accelerate would want every frozen weight too

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def save_fine_tuned(
    model: nn.Module,
    output: str | os.PathLike,
    args: argparse.Namespace,
    *,
    auto_class: type,
    processor: Any,
) -> str:
    """Save what a fine-tuning run made, with its processor; return what it was (``"model"``, ``"adapter"``,
    ``"merged model"``).

    The processor is saved padded for the model (:meth:`~medfm.processing.MedicalImageProcessor.padded_for`).
    A full fine-tune saves the model. An adapter run saves a self-contained adapter folder
    (:func:`medfm.peft.save_adapter`: the trainable parameters and the fine-tuned config, loadable with no
    extra arguments), or with ``--merge`` the merged full model.
    """
    output = Path(output)
    if _is_adapter_model(model) and not getattr(args, "merge", False):
        from ..peft import save_adapter

        save_adapter(model, output, base_model=str(args.model), auto_class=auto_class)
        kind = "adapter"
    elif _is_adapter_model(model):
        import copy

        copy.deepcopy(model).merge_and_unload().save_pretrained(output)
        kind = "merged model"
    else:
        model.save_pretrained(output)
        kind = "model"
    # The processor saved beside it brings any input to what the fine-tuned model needs (its input multiple).
    from ..models.modeling_utils import model_contract

    processor.padded_for(model_contract(model).input_padding_step()).save_pretrained(output)
    return kind


def run_script(main: Callable[[], Any]) -> None:
    """Run an example script's ``main``: bad data or options (a :class:`~medfm.errors.MedfmError`) end as one
    line naming the file and the fix, with exit status 2, instead of a traceback."""
    from ..errors import MedfmError

    try:
        main()
    except MedfmError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
