"""Which task a model (or a saved config) was built for, and a check that it fits the task asked for.

A model folder's ``config.json`` names its class in ``architectures``; loading it through another task's Auto
class silently builds a fresh, random head (a segmentation model given to a classifier prints random scores).
:func:`check_task` refuses that before any weight is loaded. Tasks are read from transformers' Auto mappings,
where every medfm family registers its classes, so the check knows transformers' own models too and never
names a family's classes.

    from medfm.tasks import check_task
    check_task(AutoConfig.from_pretrained(path), "medical-segmentation")   # raises WrongTaskError
"""

from __future__ import annotations

from typing import Any

from .errors import WrongTaskError
from .models.modeling_utils import unwrap_model

__all__ = ["TASKS", "check_task", "model_task"]

#: The tasks of medfm's pipelines, with what a model of that task is called in messages.
TASKS: dict[str, str] = {
    "medical-segmentation": "a segmentation model",
    "medical-image-classification": "an image classifier",
    "medical-feature-extraction": "a backbone",
}

_ALIASES = {
    "segmentation": "medical-segmentation",
    "semantic-segmentation": "medical-segmentation",
    "classification": "medical-image-classification",
    "image-classification": "medical-image-classification",
    "feature-extraction": "medical-feature-extraction",
    "image-feature-extraction": "medical-feature-extraction",
}

# What each head is called in messages, and how to get a model of the task from it.
_KINDS = {
    "medical-segmentation": "a segmentation model",
    "medical-image-classification": "an image classifier",
    "masked-image-modeling": "a pre-training (masked image modeling) model with no task head",
    "pre-training": "a pre-training model with no task head",
    "medical-feature-extraction": "a backbone with no task head",
}

_FIX = {
    "medical-segmentation": (
        "use `medfm segment` for it, or pass a model fine-tuned for segmentation "
        "(examples/finetune_segmentation.py makes one from a backbone)"
    ),
    "medical-image-classification": (
        "use `medfm classify` for it, or pass a model fine-tuned for classification "
        "(examples/finetune_classification.py makes one from a backbone)"
    ),
}


def _mappings() -> list[tuple[str, Any]]:
    """(task, Auto mapping) pairs, task heads before the bare backbone (a head class is no backbone class)."""
    from transformers.models.auto import modeling_auto

    return [
        ("medical-segmentation", modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING),
        ("medical-image-classification", modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING),
        ("masked-image-modeling", modeling_auto.MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING),
        ("pre-training", modeling_auto.MODEL_FOR_PRETRAINING_MAPPING),
        ("medical-feature-extraction", modeling_auto.MODEL_MAPPING),
    ]


# A PEFT adapter may record the task's Auto class (``auto_mapping.base_model_class``) instead of a model class.
_AUTO_CLASS_TASKS = {
    "AutoModelForSemanticSegmentation": "medical-segmentation",
    "AutoModelForImageClassification": "medical-image-classification",
    "AutoModelForMaskedImageModeling": "masked-image-modeling",
    "AutoModelForPreTraining": "pre-training",
    "AutoModel": "medical-feature-extraction",
}


def _normalise(task: str) -> str:
    task = _ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return task


def _describe(
    model_or_config: Any, architecture: str | None = None
) -> tuple[str | None, str | None, type | None]:
    """(task, class name, config class) of a model, a config, or a config plus an architecture name."""
    from transformers import PretrainedConfig

    item = unwrap_model(model_or_config)
    if isinstance(item, PretrainedConfig):
        config = item
        if architecture is None:
            architecture = (config.architectures or [None])[0]
        model_class = None
    else:
        config = getattr(item, "config", None)
        if not isinstance(config, PretrainedConfig):
            return None, type(item).__name__, None
        model_class = type(item)
        architecture = model_class.__name__
    if architecture is None:
        return None, None, type(config)
    if model_class is None and architecture in _AUTO_CLASS_TASKS:
        return _AUTO_CLASS_TASKS[architecture], architecture, type(config)
    for task, mapping in _mappings():
        known = mapping.get(type(config), None)
        if known is None:
            continue
        if model_class is not None and issubclass(model_class, known):
            return task, architecture, type(config)
        if model_class is None and known.__name__ == architecture:
            return task, architecture, type(config)
    return None, architecture, type(config)


def model_task(model_or_config: Any, architecture: str | None = None) -> str | None:
    """The task a model, or a saved config, was built for; ``None`` when it cannot tell.

    Args:
        model_or_config: A model (PEFT and DDP wrappers are looked through) or a config; a config's task is
            that of the first class in its ``architectures``.
        architecture: Class name to use instead of the config's ``architectures`` (a PEFT adapter records the
            class it adapts, or the task's Auto class, in ``adapter_config.json``).

    Returns:
        ``"medical-segmentation"``, ``"medical-image-classification"``, ``"masked-image-modeling"``,
        ``"pre-training"`` (another pre-training head, e.g. MiM's), ``"medical-feature-extraction"`` (a bare
        backbone), or ``None``.
    """
    return _describe(model_or_config, architecture)[0]


def check_task(
    model_or_config: Any, task: str, *, source: str | None = None, architecture: str | None = None
) -> None:
    """Refuse a model whose head is not the one ``task`` needs.

    A segmentation or classification task needs a model of that task: loading another model's folder
    through the task's Auto class would build a random head and predict noise. Feature extraction takes any
    model (the backbone is inside every head). A model whose task cannot be told (a config without
    ``architectures``, a class no Auto mapping lists) passes.

    Args:
        model_or_config: A model or its config (``AutoConfig.from_pretrained(path)``).
        task: A pipeline task (``"medical-segmentation"``, ``"medical-image-classification"``,
            ``"medical-feature-extraction"``; ``"segmentation"`` and ``"classification"`` also work).
        source: The folder or Hub id the model comes from, named in the message.
        architecture: Class name to check instead of the config's ``architectures``.

    Raises:
        WrongTaskError: The model is of another task, or has no task head.
        ValueError: ``task`` is not one of :data:`TASKS`.
    """
    task = _normalise(task)
    if task == "medical-feature-extraction":
        return
    found, name, _ = _describe(model_or_config, architecture)
    if found is None or found == task:
        return
    fix = (
        _FIX.get(found)
        if found in _FIX
        else (
            f"fine-tune it for the task first (examples/finetune_{'segmentation' if task == 'medical-segmentation' else 'classification'}.py)"
        )
    )
    raise WrongTaskError(f"{_KINDS[found]} ({name}), not {TASKS[task]}; {fix}", source)
