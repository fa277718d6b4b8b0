"""What a model card says about a model folder, read from the folder itself.

Cards are written from templates (``medfm/model_cards``); the facts here fill them so that a card never
claims what its folder does not hold: the architecture and its size from ``config.json`` (a 48-wide model is
not called "base", a 64-code tokenizer does not claim 1024 codes), the parameter count from the weights'
header, labels from ``id2label``, the preprocessing and spacing from ``preprocessor_config.json``, and the
license, paper and citation from the family record. Metadata is kept valid for the Hub: ``base_model`` and
``datasets`` only as Hub ids, the task's ``pipeline_tag``, metric types without NaN.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "PIPELINE_TAGS",
    "folder_facts",
    "hub_ids",
    "metric_type",
    "pipeline_tag_for",
]

#: Architecture suffix -> Hub pipeline tag and the medfm pipeline task that serves it.
PIPELINE_TAGS: dict[str, tuple[str, str]] = {
    "ForSemanticSegmentation": ("image-segmentation", "medical-segmentation"),
    "ForImageClassification": ("image-classification", "medical-image-classification"),
    "ForMaskedImageModeling": ("image-feature-extraction", "medical-feature-extraction"),
    "ForPreTraining": ("image-feature-extraction", "medical-feature-extraction"),
    "Model": ("image-feature-extraction", "medical-feature-extraction"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# Config fields worth stating in a card, in this order, when a config has them.
_SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "in_channels",
    "codebook_size",
    "embedding_dim",
    "downsample_channels",
    "embed_dims",
    "depths",
    "image_size",
)


def hub_ids(values: list[str] | str | None) -> list[str]:
    """The values that are Hub ids (``org/name``), not local paths: what card metadata may name."""
    if values is None:
        return []
    values = [values] if isinstance(values, str) else list(values)
    return [v for v in values if _HUB_ID.match(v) and not os.path.exists(v)]


def metric_type(name: str) -> str:
    """The standard metric type of a result name: ``dice_spleen`` -> ``dice``, ``mean_dice`` -> ``dice``."""
    parts = [p for p in name.lower().split("_") if p not in ("mean", "val", "validation")]
    return parts[0] if parts else name.lower()


def pipeline_tag_for(architecture: str | None) -> tuple[str, str] | None:
    """``(Hub pipeline tag, medfm task)`` of an architecture class name, by its suffix."""
    if not architecture:
        return None
    for suffix, tags in PIPELINE_TAGS.items():
        if architecture.endswith(suffix):
            return tags
    return None


def _parameter_count(folder: Path, adapter: bool = False) -> int | None:
    """Parameters in the folder's full weights, or (``adapter``) in its adapter file."""
    from .models.modeling_utils import checkpoint_shapes

    shapes = checkpoint_shapes(folder, adapter=adapter)
    return sum(math.prod(shape) for shape in shapes.values()) if shapes else None


def _size_name(config: Any) -> str:
    """``base`` when the architecture is the family's released base size, else a plain description."""
    try:
        default = type(config)()
    except Exception:  # a config that cannot be built bare
        return "custom-size"
    fields = [f for f in _SIZE_FIELDS if hasattr(config, f)]
    same = all(getattr(config, f) == getattr(default, f) for f in fields if f != "in_channels")
    if same:
        return "base"
    width = getattr(config, "hidden_size", None) or getattr(config, "embedding_dim", None)
    return f"reduced ({width}-wide)" if width else "custom-size"


def _architecture(config: Any, parameters: int | None, adapter_parameters: int | None = None) -> str:
    fields = [f"{f.replace('_', ' ')} {getattr(config, f)}" for f in _SIZE_FIELDS if hasattr(config, f)]
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    count = f"; {parameters / 1e6:.2f} M parameters" if parameters is not None else ""
    text = f"`{architecture}` ({', '.join(fields)}{count})"
    if adapter_parameters is not None:
        base = getattr(config, "medfm_base_model", None) or "its base model"
        text += (
            f". This folder is an **adapter**: {adapter_parameters / 1e6:.2f} M trained parameters (LoRA/DoRA "
            f"weights and the task head) on the weights of `{base}`, which loading fetches; "
            "`peft.AutoPeftModel.from_pretrained` loads it too."
        )
    return text


def _labels_section(config: Any) -> str:
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    if not id2label or all(v == f"LABEL_{k}" for k, v in id2label.items()):
        return ""
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(id2label.items()))
    return f"## Labels\n\n| id | name |\n| --- | --- |\n{rows}\n"


def _preprocessing_section(folder: Path) -> str:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return ""
    steps = json.loads(path.read_text()).get("steps", [])
    spacing = next((s.get("spacing") for s in steps if s.get("name") == "resample"), None)
    grid = f"resampled to {tuple(spacing)} mm (z, y, x)" if spacing else "kept at the input's own spacing"
    lines = []
    for step in steps:
        settings = ", ".join(f"{k}={v}" for k, v in step.items() if k != "name" and v is not None)
        lines.append(f"1. `{step['name']}`" + (f" ({settings})" if settings else ""))
    return (
        "## Preprocessing\n\nThe processor saved beside the model (`preprocessor_config.json`) does it; volumes are "
        f"{grid}, and predictions are mapped back onto the input's own grid.\n\n" + "\n".join(lines) + "\n"
    )


def folder_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """Card placeholder values read from a model folder (empty strings where the folder does not tell).

    Keys: ``architecture``, ``size_name``, ``codebook_size``, ``labels_section``, ``preprocessing_section``,
    ``citation``, ``pipeline_task``, and, for card metadata, ``_pipeline_tag``, ``_license_name``,
    ``_license_link``.
    """
    folder = Path(folder)
    facts: dict[str, Any] = {
        "architecture": "",
        "size_name": "custom-size",
        "codebook_size": "",
        "labels_section": "",
        "preprocessing_section": _preprocessing_section(folder),
        "citation": "",
        "pipeline_task": "medical-feature-extraction",
    }
    if not (folder / "config.json").is_file():
        return facts
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    adapter = (folder / "adapter_config.json").is_file()
    facts["architecture"] = _architecture(
        config, _parameter_count(folder), _parameter_count(folder, adapter=True) if adapter else None
    )
    facts["size_name"] = _size_name(config)
    facts["codebook_size"] = str(getattr(config, "codebook_size", ""))
    facts["labels_section"] = _labels_section(config)
    tags = pipeline_tag_for((getattr(config, "architectures", None) or [None])[0])
    if tags is not None:
        facts["_pipeline_tag"], facts["pipeline_task"] = tags
    try:
        from .models.registry import family_of

        family = family_of(type(config))
    except KeyError:
        return facts
    facts["citation"] = family.citation
    facts["_license_name"], facts["_license_link"] = family.license_name, family.license_link
    return facts
