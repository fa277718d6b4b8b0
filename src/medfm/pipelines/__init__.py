"""transformers pipelines for medical images, registered on ``import medfm``."""

from transformers import AutoModelForSemanticSegmentation
from transformers.pipelines import PIPELINE_REGISTRY

from .medical_segmentation import MedicalSegmentationPipeline

__all__ = ["MedicalSegmentationPipeline", "register_pipelines"]


def register_pipelines() -> None:
    """Register medfm's tasks with transformers' ``pipeline()`` (idempotent)."""
    if "medical-segmentation" not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            "medical-segmentation",
            pipeline_class=MedicalSegmentationPipeline,
            pt_model=AutoModelForSemanticSegmentation,
            type="image",
        )
