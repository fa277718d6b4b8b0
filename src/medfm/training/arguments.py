"""Command-line options every fine-tuning script shares, and what they turn into."""

from __future__ import annotations

import argparse

from torch import nn

from .loop import TrainingConfig

__all__ = [
    "adapter_kind",
    "add_training_arguments",
    "load_for_task",
    "training_config",
    "wrap_with_adapters",
]


def add_training_arguments(parser: argparse.ArgumentParser, *, lr: float, batch_size: int) -> None:
    """Add the optimisation, validation, precision, adapter and seed options (script-specific defaults)."""
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (and the new heads) only")
    parser.add_argument("--dora", action="store_true", help="weight-decomposed LoRA")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


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
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


def load_for_task(auto_class: type, model: str, num_channels: int | None = None, **overrides) -> nn.Module:
    """A model of ``model``'s family for a task, built through ``auto_class`` (e.g.
    ``AutoModelForSemanticSegmentation``) from a folder or Hub id.

    The family's ``task_defaults`` for that Auto class apply first (how upstream fine-tunes the task), then
    ``num_channels`` (set on the config field the model class names), then ``overrides``. New head weights
    are initialised; weights whose shape changes (a new label count) are re-initialised.
    """
    from transformers import AutoConfig

    from ..models.registry import family_of

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
    if num_channels is not None:
        model_class = auto_class._model_mapping[type(config)]
        settings[model_class.channels_config_key] = int(num_channels)
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
