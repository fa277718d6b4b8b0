"""What medfm's pipelines share: input handling through the model's processor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import Pipeline

from ..io import as_volume
from ..models.modeling_utils import MedfmModelMixin, model_contract

__all__ = ["MedicalPipeline"]


class MedicalPipeline(Pipeline):
    """Base of medfm's pipelines: inputs are paths, volumes or arrays with ``spacing=``; the model's
    :class:`~medfm.processing.MedicalImageProcessor` prepares them."""

    _load_image_processor = True
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def preprocess(self, inputs: Any, spacing: Sequence[float] | None = None) -> dict[str, Any]:
        if self.image_processor is None:
            raise ValueError(
                f"{type(self).__name__} needs the model's image processor: pass image_processor="
            )
        volume = as_volume(inputs, spacing)
        features = self.image_processor(volume)
        return {
            "pixel_values": features["pixel_values"],
            "spacing": features["spacing"],
            "grid": features.grids[0],
            "volume": volume,
        }

    @property
    def contract(self) -> MedfmModelMixin:
        """The model's medfm contract (input dims, spacing, prefix tokens, input multiple)."""
        return model_contract(self.model)

    def model_kwargs(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        """The forward's keyword arguments: the pixel values in the layout the model takes, and ``spacing``
        for models whose forward takes it."""
        contract = self.contract
        return contract.model_inputs(
            contract.as_model_input(model_inputs["pixel_values"]), model_inputs["spacing"]
        )
