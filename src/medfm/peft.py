"""PEFT presets: which layers of each family LoRA/DoRA adapt, and which new heads train in full.

    from peft import get_peft_model
    import medfm.peft

    model = get_peft_model(model, medfm.peft.lora_config(model, r=8))

Targets are a regex over the attention and MLP Linear layers of the transformer blocks (a bare suffix
such as ``proj`` would also catch convolutions); ``modules_to_save`` lists the heads a task adds, so they
train and save with the adapter.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from torch import nn

from .models.registry import family_of

__all__ = ["adapter_targets", "lora_config", "trainable_heads"]


def _unwrap(model: nn.Module) -> nn.Module:
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def _preset(model: nn.Module):
    model = _unwrap(model)
    try:
        family = family_of(model)
    except KeyError as error:
        raise ValueError(f"{type(model).__name__} is not a medfm model ({error.args[0]})") from None
    preset = family.peft_preset(type(model))
    if preset is None:
        raise ValueError(
            f"the {family.name} family has no adapter preset for {type(model).__name__} (no transformer blocks)"
        )
    return preset


def adapter_targets(model: nn.Module) -> str:
    """The regex of Linear layers to adapt in ``model`` (its family's preset for its class).

    Raises:
        ValueError: The model is not a medfm model, or its class has no preset.
    """
    return _preset(model).target_modules


def trainable_heads(model: nn.Module) -> list[str]:
    """Modules of ``model`` that are new for its task and train in full next to the adapters."""
    return list(_preset(model).modules_to_save)


def lora_config(
    model: nn.Module,
    r: int = 8,
    *,
    alpha: int | None = None,
    dropout: float = 0.0,
    use_dora: bool = False,
    **kwargs: Any,
) -> LoraConfig:
    """A :class:`peft.LoraConfig` for ``model``: its family's targets and its task's heads.

    Args:
        model: A medfm model (task head included).
        r: Adapter rank.
        alpha: LoRA alpha; ``2 * r`` by default.
        dropout: Dropout on the adapter input.
        use_dora: Weight-decomposed LoRA (DoRA).
        **kwargs: Any other :class:`peft.LoraConfig` field (they override the preset).
    """
    settings: dict[str, Any] = {
        "r": r,
        "lora_alpha": alpha if alpha is not None else 2 * r,
        "lora_dropout": dropout,
        "use_dora": use_dora,
        "target_modules": adapter_targets(model),
        "modules_to_save": trainable_heads(model) or None,
    }
    settings.update(kwargs)
    return LoraConfig(**settings)
