"""medfm: medical-imaging foundation models as first-class Hugging Face citizens.

``import medfm`` registers medfm's configs, models and processors with transformers' Auto classes, so
``AutoModel.from_pretrained`` and ``AutoImageProcessor.from_pretrained`` resolve them.
"""

from __future__ import annotations

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
