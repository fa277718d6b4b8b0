"""The record a model family exports: everything outside its folder needs to know about it.

Each ``medfm/models/<family>/__init__.py`` defines ``FAMILY = ModelFamily(...)``. The CLI's ``convert``, the
conversion scripts, the pre-training objectives, the PEFT presets, the Auto classes, the pipelines and the
fine-tuning examples read these records, so a new family plugs in by adding its folder and one line to
:data:`medfm.models.registry.FAMILY_MODULES`.

Converters and objectives are named as ``"module:attribute"`` strings and imported only when used, so
reading the records stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConverterOption", "ModelFamily", "PeftPreset", "resolve_reference"]


def resolve_reference(reference: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted, e.g. ``Class.method``).

    Raises:
        ValueError: The reference is not of that form.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected 'package.module:attribute'; got {reference!r}")
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class PeftPreset:
    """Which layers LoRA/DoRA adapt in a model class, and which new modules train in full beside them.

    Attributes:
        target_modules: Regex over module names (the attention and MLP Linear layers of the blocks; a bare
            suffix such as ``proj`` would also catch convolutions).
        modules_to_save: Modules that are new for the task (heads, decoders) and train in full.
    """

    target_modules: str
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConverterOption:
    """An extra command-line option of a family's converter (``medfm convert <family> --NAME``).

    Attributes:
        name: Option name without dashes (``tokenizer``); passed to the converter as a keyword argument.
        help: Help text.
    """

    name: str
    help: str


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    Attributes:
        name: Short name (``spad``): the ``medfm convert`` choice and the fixtures folder name.
        title: Human-readable name with the paper reference.
        configs: Config class -> {transformers Auto class: model class}.
        converter: ``"module:function"`` converting an original checkpoint to a model folder; the function
            takes ``(checkpoint, output, *, config_overrides, trust_checkpoint, **options)``.
        converter_options: Family-specific converter options (e.g. SPAD's ``--tokenizer``).
        objectives: Pre-training objective name -> ``"module:Class"`` of a
            :class:`medfm.training.objectives.PretrainingObjective`.
        presets: Names of the processor presets that belong to this family.
        peft: Model class -> :class:`PeftPreset`. Keyed by class, never by ``model_type``, so a family may
            reuse transformers' own classes.
        task_defaults: Auto class -> config fields a fine-tuning run sets unless told otherwise (how upstream
            fine-tunes that task, e.g. SPAD's fixed patch for segmentation).
        model_cards: Model-card template names (in ``medfm/model_cards``) this family writes.
        load_hooks: Callables run once when the family is registered (weight-conversion hooks for
            ``from_pretrained``).
        citation: The paper's BibTeX entry, for model cards.
        license_name: The weights' license as the Hub names it (``license: other`` with this name).
        license_link: Where that license (or the statement of its absence) is.
    """

    name: str
    title: str
    configs: Mapping[type, Mapping[type, type]]
    converter: str | None = None
    converter_options: tuple[ConverterOption, ...] = ()
    objectives: Mapping[str, str] = field(default_factory=dict)
    presets: tuple[str, ...] = ()
    peft: Mapping[type, PeftPreset] = field(default_factory=dict)
    task_defaults: Mapping[type, Mapping[str, Any]] = field(default_factory=dict)
    model_cards: tuple[str, ...] = ()
    load_hooks: tuple[Callable[[], None], ...] = ()
    citation: str = ""
    license_name: str = "other"
    license_link: str = ""

    @property
    def model_classes(self) -> tuple[type, ...]:
        """Every model class of the family."""
        return tuple(dict.fromkeys(cls for models in self.configs.values() for cls in models.values()))

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(config.model_type for config in self.configs)

    def load_converter(self) -> Callable[..., Any]:
        """The converter function.

        Raises:
            ValueError: The family has none.
        """
        if self.converter is None:
            raise ValueError(f"the {self.name} family has no checkpoint converter")
        return resolve_reference(self.converter)

    def peft_preset(self, model_class: type) -> PeftPreset | None:
        """The preset of ``model_class`` or of its nearest base class listed here."""
        for cls in model_class.__mro__:
            if cls in self.peft:
                return self.peft[cls]
        return None
