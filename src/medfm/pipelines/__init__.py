"""transformers pipelines for medical images, registered on ``import medfm``."""

from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation
from transformers.pipelines import PIPELINE_REGISTRY

from .medical_image_classification import MedicalFeatureExtractionPipeline, MedicalImageClassificationPipeline
from .medical_segmentation import MedicalSegmentationPipeline

__all__ = [
    "MedicalFeatureExtractionPipeline",
    "MedicalImageClassificationPipeline",
    "MedicalSegmentationPipeline",
    "register_pipelines",
]

_TASKS = {
    "medical-segmentation": (MedicalSegmentationPipeline, AutoModelForSemanticSegmentation),
    "medical-image-classification": (MedicalImageClassificationPipeline, AutoModelForImageClassification),
    "medical-feature-extraction": (MedicalFeatureExtractionPipeline, AutoModel),
}


def register_pipelines() -> None:
    """Register medfm's tasks with transformers' ``pipeline()`` (idempotent)."""
    for task, (pipeline_class, auto_model) in _TASKS.items():
        if task not in PIPELINE_REGISTRY.supported_tasks:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=pipeline_class, pt_model=auto_model, type="image"
            )
