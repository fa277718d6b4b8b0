"""PEFT presets: which layers of each family LoRA/DoRA adapt, and which new heads train in full.

    from peft import get_peft_model
    import medfm.peft

    model = get_peft_model(model, medfm.peft.lora_config(model, r=8))

Targets are a regex over the attention and MLP Linear layers of the transformer blocks (a bare suffix
such as ``proj`` would also catch convolutions); ``modules_to_save`` lists the heads a task adds, so they
train and save with the adapter.

:func:`save_adapter` writes a self-contained adapter folder: PEFT's adapter (the trainable parameters only),
the fine-tuned model's full ``config.json`` naming its base model, and (by the caller) the processor. It loads
with no further arguments through ``AutoModelFor*.from_pretrained(folder)``, ``pipeline(task, model=folder)``,
``medfm segment --model folder`` and ``peft.AutoPeftModel.from_pretrained(folder)``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from peft import LoraConfig
from torch import nn

from .models.modeling_utils import ADAPTER_BASE_MODEL_KEY, unwrap_model
from .models.registry import family_of

__all__ = ["adapter_targets", "lora_config", "save_adapter", "trainable_heads"]


def _preset(model: nn.Module):
    model = unwrap_model(model)
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


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, base_model: str, auto_class: type) -> Path:
    """Save a PEFT-wrapped medfm model as a self-contained adapter folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (LoRA/DoRA weights and the
    task heads of ``modules_to_save``: the trainable parameters only) and the fine-tuned model's full
    ``config.json`` (patch, channels, labels, decoder widths...), which names ``base_model`` under
    ``medfm_base_model``. The adapter config points PEFT at the folder itself and at the transformers Auto
    class of the task (``auto_mapping``), so ``AutoPeftModel.from_pretrained(folder)`` needs neither an import
    allow-list nor architecture overrides; the folder's own ``from_pretrained`` loads the base weights.

    Args:
        model: A :class:`peft.PeftModel` around a medfm model.
        folder: Output folder.
        base_model: Folder or Hub id of the weights the adapter was trained on (a local folder is stored as an
            absolute path).
        auto_class: The task's transformers Auto class (e.g. ``AutoModelForSemanticSegmentation``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    config = copy.deepcopy(model.get_base_model().config)
    config.architectures = [type(model.get_base_model()).__name__]  # what save_pretrained would record
    setattr(
        config,
        ADAPTER_BASE_MODEL_KEY,
        str(Path(base_model).resolve()) if Path(base_model).exists() else base_model,
    )
    config.save_pretrained(folder)
    adapter_file = folder / "adapter_config.json"
    adapter_config = json.loads(adapter_file.read_text())
    adapter_config["base_model_name_or_path"] = str(folder.resolve())
    adapter_config["auto_mapping"] = {
        "base_model_class": auto_class.__name__,
        "parent_library": "transformers",
    }
    temporary = adapter_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    os.replace(temporary, adapter_file)
    return folder
