"""Model cards for the Hub, written from the templates in ``medfm/model_cards`` with ``huggingface_hub``."""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from .io.atomic import atomic_output

__all__ = ["available_card_templates", "render_model_card", "write_model_card"]

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def available_card_templates() -> list[str]:
    folder = importlib.resources.files("medfm") / "model_cards"
    return sorted(p.name.removesuffix(".md") for p in folder.iterdir() if p.name.endswith(".md"))


def render_model_card(template: str, values: dict[str, Any]) -> ModelCard:
    """Fill ``{{ name }}`` placeholders of a packaged template and parse it as a :class:`ModelCard`.

    Raises:
        ValueError: Unknown template, or a placeholder without a value.
    """
    if template not in available_card_templates():
        raise ValueError(f"no model card template {template!r}; available: {available_card_templates()}")
    text = (importlib.resources.files("medfm") / "model_cards" / f"{template}.md").read_text()
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise ValueError(f"model card template {template!r} needs values for {missing}")
    return ModelCard(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text))


def write_model_card(
    template: str,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/README.md`` from a template (atomically).

    Args:
        template: Template name (``spad-vit-base``, ``spad-vt``...).
        folder: The model folder.
        repo_id: Hub id shown in the usage snippet; defaults to the folder name.
        base_model: Set as ``base_model`` in the card metadata (fine-tuned models).
        extra: More placeholder values (``source_checkpoint``...).
    """
    folder = Path(folder)
    values = {
        "model_name": folder.name,
        "repo_id": repo_id or folder.name,
        "source_checkpoint": "an original checkpoint",
    }
    values.update(extra or {})
    card = render_model_card(template, values)
    if base_model is not None:
        card.data.base_model = base_model
    with atomic_output(folder / "README.md") as tmp:
        Path(tmp).write_text(str(card))
    return folder / "README.md"
