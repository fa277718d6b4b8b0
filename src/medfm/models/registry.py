"""The registry of model families: it lists the family modules and nothing else about them.

Each module in :data:`FAMILY_MODULES` exports a ``FAMILY`` record (:class:`~medfm.models.family.ModelFamily`);
``import medfm`` registers every record's configs, models and processor with transformers' Auto classes. A
family added at run time (:func:`register_family`) takes part in everything the listed ones do.
"""

from __future__ import annotations

import importlib

from .family import ModelFamily
from .modeling_utils import unwrap_model

#: The family packages, each exporting ``FAMILY``.
FAMILY_MODULES: tuple[str, ...] = ("medfm.models.spad", "medfm.models.mim")

__all__ = ["FAMILY_MODULES", "families", "family_named", "family_of", "register_all", "register_family"]

_extra: list[ModelFamily] = []


def families() -> tuple[ModelFamily, ...]:
    """Every family: those in :data:`FAMILY_MODULES`, then those registered at run time."""
    listed = [importlib.import_module(name).FAMILY for name in FAMILY_MODULES]
    return tuple(listed + [f for f in _extra if all(f.name != g.name for g in listed)])


def family_named(name: str) -> ModelFamily:
    """The family called ``name``.

    Raises:
        KeyError: No such family (the message lists those that exist).
    """
    for family in families():
        if family.name == name:
            return family
    raise KeyError(f"no medfm model family {name!r}; known: {[f.name for f in families()]}")


def family_of(model: object) -> ModelFamily:
    """The family a model (or model class, or config) belongs to, found by class, never by ``model_type``.

    A PEFT or DDP wrapper is looked through (:func:`~medfm.models.modeling_utils.unwrap_model`).

    Raises:
        KeyError: No family lists the class.
    """
    if not isinstance(model, type):
        model = unwrap_model(model)
    cls = model if isinstance(model, type) else type(model)
    for family in families():
        if any(issubclass(cls, known) for known in (*family.model_classes, *family.configs)):
            return family
    raise KeyError(f"{cls.__name__} belongs to no medfm model family; known: {[f.name for f in families()]}")


def _register(family: ModelFamily) -> None:
    from transformers import AutoConfig, AutoImageProcessor

    from ..processing import MedicalImageProcessor

    for config, models in family.configs.items():
        AutoConfig.register(config.model_type, config, exist_ok=True)
        for auto_class, model_class in models.items():
            auto_class.register(config, model_class, exist_ok=True)
        AutoImageProcessor.register(
            config,
            image_processor_classes={"pil": MedicalImageProcessor, "torchvision": MedicalImageProcessor},
            exist_ok=True,
        )
    for hook in family.load_hooks:
        hook()


def register_family(family: ModelFamily) -> None:
    """Add a family at run time (a plug-in, or a test) and register it with transformers."""
    _extra[:] = [f for f in _extra if f.name != family.name] + [family]
    _register(family)


def register_all() -> None:
    """Register every family's configs, models and processor with transformers (idempotent)."""
    for family in families():
        _register(family)
