"""``pipeline("medical-image-classification")`` and ``pipeline("medical-feature-extraction")``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import MedicalPipeline

__all__ = ["MedicalFeatureExtractionPipeline", "MedicalImageClassificationPipeline"]


class MedicalImageClassificationPipeline(MedicalPipeline):
    r"""Classify a 2D image or a 3D volume.

    Call parameters:
        top_k: How many labels to return (default 5, at most ``num_labels``).
        spacing: Spacing for array inputs.

    Returns:
        A list of ``{"label", "score"}`` per input, best first. Scores are a softmax over labels, or
        independent sigmoids for ``problem_type="multi_label_classification"``.
    """

    _default_task = "medical-image-classification"

    def _sanitize_parameters(
        self, top_k: int | None = None, spacing: Sequence[float] | None = None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for medical-image-classification")
        preprocess = {"spacing": spacing} if spacing is not None else {}
        postprocess = {}
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1; got {top_k}")
            postprocess["top_k"] = int(top_k)
        return preprocess, {}, postprocess

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        return {"logits": self.model(**self.model_kwargs(model_inputs)).logits}

    def postprocess(self, model_outputs: dict[str, Any], top_k: int = 5) -> list[dict[str, Any]]:
        logits = model_outputs["logits"][0].float()
        multi_label = getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        scores = logits.sigmoid() if multi_label else logits.softmax(-1)
        top = torch.topk(scores, k=min(top_k, scores.numel()))
        id2label = self.model.config.id2label
        return [
            {"label": id2label.get(int(i), str(int(i))), "score": float(s)}
            for s, i in zip(top.values, top.indices)
        ]


class MedicalFeatureExtractionPipeline(MedicalPipeline):
    r"""Embed a 2D image or a 3D volume with a medfm backbone.

    Call parameters:
        return_tokens: Also return the patch-token features (``last_hidden_state`` without prefix tokens).
        spacing: Spacing for array inputs.

    Returns:
        ``{"embedding": (hidden,) tensor}`` per input (the pooled output), plus ``"tokens"`` ``(N, hidden)``
        when asked.
    """

    def _sanitize_parameters(
        self, return_tokens: bool | None = None, spacing: Sequence[float] | None = None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for medical-feature-extraction")
        preprocess = {"spacing": spacing} if spacing is not None else {}
        postprocess = {"return_tokens": bool(return_tokens)} if return_tokens is not None else {}
        return preprocess, {}, postprocess

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        outputs = self.model(**self.model_kwargs(model_inputs))
        if getattr(outputs, "pooler_output", None) is None:
            raise ValueError(
                f"{type(self.model).__name__} is not a backbone (its output has no pooler_output); "
                "medical-feature-extraction needs a model folder whose AutoModel class is a backbone"
            )
        return {"pooled": outputs.pooler_output, "sequence": outputs.last_hidden_state}

    def postprocess(
        self, model_outputs: dict[str, Any], return_tokens: bool = False
    ) -> dict[str, torch.Tensor]:
        result = {"embedding": model_outputs["pooled"][0]}
        if return_tokens:
            result["tokens"] = model_outputs["sequence"][0, self.contract.num_prefix_tokens :]
        return result
