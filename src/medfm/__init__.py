"""medfm: medical-imaging foundation models as first-class Hugging Face citizens.

``import medfm`` registers medfm's configs, models and processors with transformers' Auto classes, so
``AutoModel.from_pretrained`` and ``AutoImageProcessor.from_pretrained`` resolve them.

Every public name of a model family (its configs, models and outputs: what the family package lists in
``__all__``) is also a top-level name, ``from medfm import <Family>Model``, as in transformers. Those names
are resolved on first use (PEP 562 ``__getattr__``) from the family packages listed in
:data:`medfm.models.registry.FAMILY_MODULES`; this file names no family's classes.
"""

from __future__ import annotations

import importlib
import importlib.util

from transformers import AutoImageProcessor

from . import errors
from .io import MedicalVolume, load_volume, write_nifti
from .layers.varlen_attention import register_varlen_attention
from .models.registry import register_all
from .pipelines import register_pipelines
from .processing import MedicalImageProcessor

__version__ = "0.1.0.dev0"

__all__ = ["MedicalImageProcessor", "MedicalVolume", "__version__", "errors", "load_volume", "write_nifti"]

# transformers resolves a processor class by the name saved in preprocessor_config.json, searching the
# registered mappings. Model configs register the processor again as their families land; this key
# makes a bare processor folder loadable before any model exists.
_PROCESSOR_KEY = "medfm_medical_image"


def _register() -> None:
    AutoImageProcessor.register(
        _PROCESSOR_KEY,
        image_processor_classes={"pil": MedicalImageProcessor, "torchvision": MedicalImageProcessor},
        exist_ok=True,
    )
    register_all()
    register_pipelines()
    register_varlen_attention()


_register()


# Every family package exports its record under this name; the records stay in their packages (and in
# medfm.models.registry), they are not top-level names.
_FAMILY_RECORD = "FAMILY"
_family_names: dict[str, str] | None = None  # top-level name -> the family package that exports it


def _top_level_names() -> dict[str, str]:
    """Each family package's ``__all__`` but its ``FAMILY`` record, as name -> package (imports the family
    packages once)."""
    global _family_names
    if _family_names is None:
        from .models.registry import FAMILY_MODULES

        names: dict[str, str] = {}
        for module_name in FAMILY_MODULES:
            module = importlib.import_module(module_name)
            exported = getattr(module, "__all__", None)
            if exported is None:
                raise ImportError(
                    f"{module_name} (listed in FAMILY_MODULES) has no __all__ naming its public names"
                )
            for name in exported:
                if name == _FAMILY_RECORD:
                    continue
                if names.setdefault(name, module_name) != module_name:
                    raise ImportError(f"{name!r} is exported by both {names[name]} and {module_name}")
        _family_names = names
    return _family_names


def __getattr__(name: str):
    """``medfm.<name>`` for a family's public name: imported from its family package, then cached here."""
    if name.startswith("__") and name.endswith("__"):  # probes such as __wrapped__ or __path__: not ours
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    names = _top_level_names()
    module_name = names.get(name)
    if module_name is None:
        hint = ""
        if name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            hint = f"; {__name__}.{name} is a submodule: `import {__name__}.{name}`"
        else:
            import difflib

            close = difflib.get_close_matches(name, [*names, *__all__], n=3)
            if close:
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?"
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r} (top-level names are {__name__}'s own and each "
            f"family package's __all__ in medfm.models.registry.FAMILY_MODULES){hint}"
        )
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # the next lookup is an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_top_level_names()))
