"""The Hub: model cards from the templates in ``medfm/model_cards``, and pushing a model with its card.

``push_to_hub(model, "org/name", processor=processor, card=CardInfo(...))`` saves the model (or PEFT
adapter), its processor and a model card with what the run knows (base model, datasets, metrics as
model-index results, training settings) and uploads them in one commit.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard

from .io.atomic import atomic_output

__all__ = ["CardInfo", "available_card_templates", "push_to_hub", "render_model_card", "write_model_card"]

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


@dataclass
class CardInfo:
    """What a run knows about a model, for its card.

    Attributes:
        template: Card template (``available_card_templates()``).
        base_model: Hub id of the model this one was fine-tuned from.
        datasets: Hub ids or names of the training data.
        task_type: Hub task of the results, e.g. ``"image-segmentation"``.
        dataset_name: Name of the evaluation dataset.
        dataset_type: Hub id or kind of the evaluation dataset.
        metrics: Metric name -> value, written as model-index results.
        training: Training settings shown in a table (epochs, learning rate...).
        values: More template placeholder values.
    """

    template: str = "fine-tuned"
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    task_type: str = "image-segmentation"
    dataset_name: str | None = None
    dataset_type: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


def _enrich(card: ModelCard, info: CardInfo, model_name: str) -> ModelCard:
    if info.base_model:
        card.data.base_model = info.base_model
    if info.datasets:
        card.data.datasets = list(info.datasets)
    if info.metrics:
        card.data.model_name = model_name
        card.data.eval_results = [
            EvalResult(
                task_type=info.task_type,
                dataset_type=info.dataset_type or info.dataset_name or "custom",
                dataset_name=info.dataset_name or "custom",
                metric_type=name,
                metric_value=float(value),
            )
            for name, value in info.metrics.items()
        ]
    if info.training:
        rows = "\n".join(f"| {key} | {value} |" for key, value in info.training.items())
        card.text += f"\n## Training settings\n\n| setting | value |\n| --- | --- |\n{rows}\n"
    if info.metrics:
        rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in info.metrics.items())
        card.text += f"\n## Results\n\n| metric | value |\n| --- | --- |\n{rows}\n"
    return card


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    processor: Any = None,
    card: CardInfo | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload with medfm",
    api: HfApi | None = None,
) -> Any:
    """Save ``model`` (a medfm model or a PEFT model: then the adapter), its processor and a card; upload
    them to ``repo_id`` in one commit.

    Args:
        model: What to push (``save_pretrained`` is called on it).
        repo_id: ``org/name`` on the Hub.
        processor: The image processor to push beside it.
        card: What to write in the card; a plain card from the ``fine-tuned`` template by default.
        private: Create the repository as private.
        token: Hub token (else the logged-in one).
        commit_message: Message of the commit.
        api: The :class:`huggingface_hub.HfApi` to use (tests pass a recording one).

    Returns:
        What ``api.upload_folder`` returns (a ``CommitInfo``).
    """
    api = api or HfApi(token=token)
    info = card or CardInfo()
    with tempfile.TemporaryDirectory(prefix="medfm-push-") as folder:
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        write_model_card(info.template, folder, repo_id=repo_id, info=info)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, token=token
        )


def write_model_card(
    template: str,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
    info: CardInfo | None = None,
) -> Path:
    """Write ``folder/README.md`` from a template (atomically).

    Args:
        template: Template name (``spad-vit-base``, ``spad-vt``...).
        folder: The model folder.
        repo_id: Hub id shown in the usage snippet; defaults to the folder name.
        base_model: Set as ``base_model`` in the card metadata (fine-tuned models).
        extra: More placeholder values (``source_checkpoint``...).
        info: Run facts (datasets, metrics, training settings) to add; see :class:`CardInfo`.
    """
    folder = Path(folder)
    name = (repo_id or folder.name).split("/")[-1]
    base = base_model or (info.base_model if info is not None else None)
    values = {
        "model_name": name,
        "repo_id": repo_id or folder.name,
        "source_checkpoint": "an original checkpoint",
        "base_model": base or "a medfm model",
    }
    values.update(extra or {})
    if info is not None:
        values.update(info.values)
    card = render_model_card(template, values)
    if base is not None:
        card.data.base_model = base
    if info is not None:
        card = _enrich(card, info, name)
    with atomic_output(folder / "README.md") as tmp:
        Path(tmp).write_text(str(card))
    return folder / "README.md"
