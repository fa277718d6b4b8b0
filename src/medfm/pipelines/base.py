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
    :class:`~medfm.processing.MedicalImageProcessor` prepares them. Subclasses name their task in
    ``_default_task``; a model of another task is refused when the pipeline is built."""

    _default_task: str = "medical-feature-extraction"

    _load_image_processor = True
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # A model of another task (a segmentation model given to the classifier) is refused here, not left to
        # produce plausible-looking numbers.
        from ..tasks import check_task

        task = getattr(self, "task", None) or self._default_task
        source = getattr(self.model, "name_or_path", None) or None
        # The saved architecture first: pipeline() builds the task's Auto class from any checkpoint (a
        # classifier with a random head from a segmentation folder), so the loaded class alone would pass.
        if getattr(self.model.config, "architectures", None):
            check_task(self.model.config, task, source=source)
        check_task(self.model, task, source=source)
        # A processor saved without the model's padding (a converted folder, a preset) still brings every
        # input to a size the model runs on; one that already pads or resizes to it is kept as it is.
        if self.image_processor is not None and hasattr(self.image_processor, "padded_for"):
            self.image_processor = self.image_processor.padded_for(self.contract.input_padding_step())

    def preprocess(self, inputs: Any, spacing: Sequence[float] | None = None) -> dict[str, Any]:
        if self.image_processor is None:
            raise ValueError(
                f"{type(self).__name__} needs the model's image processor: pass image_processor="
            )
        volume = as_volume(inputs, spacing)
        features = self.image_processor(volume)
        self._check_channels(features["pixel_values"], volume)
        return {
            "pixel_values": features["pixel_values"],
            "spacing": features["spacing"],
            "grid": features.grids[0],
            "volume": volume,
        }

    def _check_channels(self, pixel_values: Any, volume: Any) -> None:
        """The processed input has the channels the model takes (an RGB DICOM into a 1-channel model, or a
        processor that repeats grey to RGB for a 1-channel model, would otherwise fail deep in the model or,
        worse, run on the wrong data)."""
        from ..errors import ModelProcessorMismatchError

        try:
            expected = self.contract.num_input_channels
        except AttributeError:  # a model whose config names no channel count
            return
        got = int(pixel_values.shape[1])
        if got != expected:
            source = getattr(self.model, "name_or_path", None) or type(self.model).__name__
            raise ModelProcessorMismatchError(
                f"the processor makes {got}-channel inputs from this image ({volume.array.shape[0]} channel(s)) "
                f"but the model takes {expected}; fix preprocessor_config.json of {source} (e.g. a "
                f"repeat_channels step with num_channels={expected}) or give an image with the channels the "
                "model was trained on",
                volume.source_path,
            )

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
